"""The one adapter between stored records and `shoal.v1` protobuf messages."""

from __future__ import annotations

import json
from typing import Any

from shoal.leader.records import DeploymentRecord, NodeRecord, Phase, ReplicaRecord, ServiceRecord, TableRecord
from shoal.model import DeploymentSpec, ServiceSpec
from shoal.v1 import types_pb2

__all__ = ["deployment_pb", "service_pb", "pod_pb", "table_pb", "node_pb", "event_pb", "service_port_pb"]


def deployment_pb(rec: DeploymentRecord, spec: DeploymentSpec | None, replicas: list[ReplicaRecord]) -> types_pb2.Deployment:
    current = [r for r in replicas if r.generation == rec.template_generation]
    msg = types_pb2.Deployment(
        name=rec.name,
        generation=rec.generation,
        manifest_json=json.dumps(rec.manifest, sort_keys=True),
        replicas=spec.replicas if spec else 0,
        running=sum(1 for r in replicas if r.phase == Phase.RUNNING),
        ready=sum(1 for r in replicas if r.ready),
        updated=len(current),
        image=spec.container.image if spec else "",
        driver=spec.driver.value if spec else "",
        created_at=rec.created_at,
    )
    if rec.unschedulable:
        msg.conditions.append(f"Unschedulable: {rec.unschedulable}")
    return msg


def service_port_pb(p: dict[str, Any]) -> types_pb2.ServicePort:
    return types_pb2.ServicePort(
        name=p.get("name", ""),
        port=int(p["port"]),
        target_port=str(p.get("target_port", "")),
        node_port=int(p.get("node_port") or 0),
        protocol=p.get("protocol", "TCP"),
        app_protocol=p.get("app_protocol", "tcp"),
    )


def service_pb(rec: ServiceRecord, spec: ServiceSpec | None, table: TableRecord | None) -> types_pb2.Service:
    msg = types_pb2.Service(
        name=rec.name,
        manifest_json=json.dumps(rec.manifest, sort_keys=True),
        type=spec.type if spec else "",
        algorithm=spec.algorithm.value if spec else "",
        endpoints=len(table.endpoints) if table else 0,
        created_at=rec.created_at,
    )
    if spec is not None:
        msg.selector.update(dict(spec.selector))
        for sp in spec.ports:
            msg.ports.append(
                types_pb2.ServicePort(
                    name=sp.name,
                    port=sp.port,
                    target_port=str(sp.target_port),
                    node_port=sp.node_port or 0,
                    protocol=sp.protocol,
                    app_protocol=sp.app_protocol.value,
                )
            )
    return msg


def pod_pb(r: ReplicaRecord, node: NodeRecord | None, spec: DeploymentSpec | None) -> types_pb2.Pod:
    return types_pb2.Pod(
        name=r.id,
        deployment=r.deployment,
        generation=r.generation,
        node=r.node,
        host_ip=node.address if node else "",
        host_port=r.host_port,
        phase=Phase(r.phase).label,
        ready=r.ready,
        restarts=r.restarts,
        container_id=r.handle,
        message=r.message,
        driver=spec.driver.value if spec else "",
        image=spec.container.image if spec else "",
        created_at=r.created_at,
        started_at=r.started_at,
    )


def table_pb(t: TableRecord) -> types_pb2.Table:
    return types_pb2.Table(
        service=t.service,
        algorithm=t.algorithm,
        version=t.version,
        endpoints=[
            types_pb2.Endpoint(pod=e["pod"], address=e["address"], port=int(e["port"]), weight=int(e.get("weight", 1)))
            for e in t.endpoints
        ],
        ports=[service_port_pb(p) for p in t.ports],
        dataplane=t.dataplane,
        hash_header=t.hash_header,
    )


def node_pb(n: NodeRecord, allocated_cpu: int, allocated_mem: int, pods: int) -> types_pb2.Node:
    msg = types_pb2.Node(
        name=n.name,
        address=n.address,
        role=n.role,
        status=n.status,
        cordoned=n.cordoned,
        draining=n.draining,
        metrics_port=n.metrics_port,
        capacity=types_pb2.Resources(cpu_millis=n.cpu_millis, memory_bytes=n.memory_bytes),
        allocated=types_pb2.Resources(cpu_millis=allocated_cpu, memory_bytes=allocated_mem),
        pods=pods,
        last_seen=n.last_seen,
        version=n.version,
        usage=types_pb2.Usage(
            cpu_percent=float(n.usage.get("cpu_percent", 0.0)),
            memory_used_bytes=int(n.usage.get("memory_used_bytes", 0)),
            disk_used_bytes=int(n.usage.get("disk_used_bytes", 0)),
            disk_total_bytes=int(n.usage.get("disk_total_bytes", 0)),
        ),
    )
    msg.labels.update(n.labels)
    return msg


def event_pb(e: dict[str, Any]) -> types_pb2.Event:
    return types_pb2.Event(
        seq=int(e["seq"]),
        time=float(e["time"]),
        type=e["type"],
        reason=e["reason"],
        object=e["object"],
        message=e["message"],
    )
