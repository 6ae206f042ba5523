"""The deployment controller: from declared state to replicas, placements and tables.

`Controller.reconcile(state, now)` is a pure function of the cluster state (plus the
injected rng that names replicas and breaks scheduling ties): it returns the `Txn` that
moves the state one step toward what users declared. The leader's shell commits it and
calls again whenever the state changes; a reconcile that finds nothing to do returns an
empty transaction, so the loop settles.

One pass does, in order:
1. Replica count: each deployment gets `spec.replicas` replicas of its current pod
   template. Extra replicas are removed (not-ready and newest first). When the template
   changes, `Recreate` removes every old replica at once; `RollingUpdate` (the default)
   adds new replicas up to `maxSurge` above the count and removes old ones as new ones
   turn ready, never below `replicas - maxUnavailable` ready (Kubernetes' rules).
2. Orphans: replicas whose deployment is gone are removed.
3. Placement: pending replicas go to the scheduler core; what fits is assigned a node
   and a host port; what does not is reported on the deployment with the reason.
4. Tables: each service's table lists the ready replicas its selector matches, at their
   node's address and host port, ordered by replica id so every agent agrees.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import string
from collections import Counter
from collections.abc import Iterable
from typing import Any

from shoal.errors import ManifestError
from shoal.leader.balancer import Endpoint, Table, build_table
from shoal.leader.records import (
    DeploymentRecord,
    NodeRecord,
    Phase,
    ReplicaRecord,
    ServiceRecord,
    TableRecord,
)
from shoal.leader.scheduler import NodeInfo, PlacementRequest, Scheduler, SchedulerConfig
from shoal.leader.state import ClusterState, Delete, NewEvent, Put, Txn
from shoal.manifest import parse_raw
from shoal.model import (
    ANNOTATION_WEIGHT,
    Algorithm,
    DeploymentSpec,
    Resources,
    RollingUpdate,
    ServiceSpec,
)

__all__ = ["Controller", "rolling_bounds", "service_matches"]

_ID_ALPHABET = string.ascii_lowercase + string.digits


def service_matches(service: ServiceSpec, deployment: DeploymentSpec) -> bool:
    """A service selects a deployment's replicas when its selector ⊆ their labels."""
    labels = dict(deployment.template_labels)
    return bool(service.selector) and all(labels.get(k) == v for k, v in service.selector)


def _resolve_target_port(service_target: int | str, spec: DeploymentSpec) -> int | None:
    """The container port a service port targets, if the deployment exposes it."""
    for p in spec.container.ports:
        if service_target == p.container_port or (isinstance(service_target, str) and service_target == p.name):
            return p.container_port
    return None


NODE_LOST_GRACE = 1.0
"""Seconds a node stays Down (dead in gossip, not refuted) before its replicas are
replaced elsewhere. Gossip already waited out a suspicion timeout that the member could
refute, so this only absorbs a flap; short, because a dead host's replicas serve nobody
(they leave every table as soon as the node is Down)."""


class Controller:
    """Turns declared deployments and services into replicas, placements and tables."""

    def __init__(self, scheduler: Scheduler, rng: random.Random, *, node_lost_grace: float = NODE_LOST_GRACE) -> None:
        self._scheduler = scheduler
        self._rng = rng
        self.node_lost_grace = node_lost_grace
        # (kind, name) -> (generation, manifest, spec). The manifest is compared too: a
        # deleted and re-created object starts again at generation 1 with new content.
        self._specs: dict[tuple[str, str], tuple[int, dict[str, Any], DeploymentSpec | ServiceSpec | None]] = {}

    @property
    def scheduler_config(self) -> SchedulerConfig:
        """The placement settings this controller's scheduler uses (`shoal plan` reuses them)."""
        return self._scheduler.config

    # -- parsing, cached by (kind, name, generation) -------------------------------------

    def deployment_spec(self, record: DeploymentRecord) -> DeploymentSpec | None:
        spec = self._spec("deployments", record.name, record.generation, record.manifest)
        return spec if isinstance(spec, DeploymentSpec) else None

    def service_spec(self, record: ServiceRecord) -> ServiceSpec | None:
        spec = self._spec("services", record.name, record.generation, record.manifest)
        return spec if isinstance(spec, ServiceSpec) else None

    def _spec(self, kind: str, name: str, generation: int, raw: dict[str, Any]) -> DeploymentSpec | ServiceSpec | None:
        key = (kind, name)
        cached = self._specs.get(key)
        if cached is not None and cached[0] == generation and cached[1] == raw:
            return cached[2]
        spec: DeploymentSpec | ServiceSpec | None
        try:
            spec = parse_raw(raw, source=f"{kind}/{name}")
        except ManifestError:
            # Stored manifests were validated on apply; one that no longer parses
            # (a downgrade) is left alone rather than acted on.
            spec = None
        self._specs[key] = (generation, copy.deepcopy(raw), spec)
        return spec

    def new_replica_id(self, deployment: str, taken: set[str]) -> str:
        while True:
            suffix = "".join(self._rng.choice(_ID_ALPHABET) for _ in range(5))
            rid = f"{deployment}-{suffix}"
            if rid not in taken:
                taken.add(rid)
                return rid

    # -- the reconcile pass -----------------------------------------------------------

    @staticmethod
    def _remove(
        r: ReplicaRecord,
        ops: list[Put | Delete],
        events: list[NewEvent],
        replicas: dict[str, ReplicaRecord],
        now: float,
        why: str,
    ) -> None:
        ops.append(Delete(kind="replicas", name=r.id))
        replicas.pop(r.id, None)
        events.append(_event(now, "Normal", "Killing", f"pod/{r.id}", why))

    def reconcile(self, state: ClusterState, now: float) -> Txn:
        ops: list[Put | Delete] = []
        events: list[NewEvent] = []
        deployments = {d["name"]: DeploymentRecord.from_dict(d) for d in state.list("deployments")}
        replicas = {r["id"]: ReplicaRecord.from_dict(r) for r in state.list("replicas")}
        nodes = {n["name"]: NodeRecord.from_dict(n) for n in state.list("nodes")}
        taken = set(replicas)
        specs = {name: self.deployment_spec(rec) for name, rec in deployments.items()}

        # 0: replicas on a host that has been Down for the grace period are lost: forget
        # them, so the counts below replace them elsewhere. If the host comes back, it is
        # no longer assigned them and its agent stops them.
        for r in sorted(replicas.values(), key=lambda r: r.id):
            node = nodes.get(r.node) if r.node else None
            if node is None or node.status != "Down" or now - node.down_since < self.node_lost_grace:
                continue
            ops.append(Delete(kind="replicas", name=r.id))
            replicas.pop(r.id)
            events.append(_event(now, "Warning", "NodeLost", f"pod/{r.id}",
                                 f"node {node.name} is down; replacing the replica on another node"))
        by_deployment: dict[str, list[ReplicaRecord]] = {}
        for r in replicas.values():
            by_deployment.setdefault(r.deployment, []).append(r)

        drained = {n.name for n in nodes.values() if n.draining}

        # 1 + 2: replica counts, rollover and orphans.
        for dep_name, reps in sorted(by_deployment.items()):
            if dep_name not in deployments:
                for r in reps:
                    ops.append(Delete(kind="replicas", name=r.id))
                    replicas.pop(r.id)
        for dep_name, rec in sorted(deployments.items()):
            spec = specs[dep_name]
            if spec is None:
                continue
            reps = by_deployment.get(dep_name, [])
            # Replicas on a draining node are replaced first and leave once enough of
            # their replacements are ready; they do not count toward `want` meanwhile.
            draining = [r for r in reps if r.node in drained]
            reps = [r for r in reps if r.node not in drained]
            current = [r for r in reps if r.generation == rec.template_generation]
            old = [r for r in reps if r.generation != rec.template_generation]
            want = spec.replicas
            create = want - len(current)
            if old:
                if spec.strategy == "Recreate":
                    # Every old replica goes first; new ones start in the same pass.
                    for r in old:
                        self._remove(r, ops, events, replicas, now, f"recreating {dep_name} with a new template")
                    old = []
                else:
                    surge, unavailable = rolling_bounds(spec.rolling_update, want)
                    create = min(create, want + surge - len(current) - len(old))
            for _ in range(max(0, create)):
                rid = self.new_replica_id(dep_name, taken)
                new = ReplicaRecord(id=rid, deployment=dep_name, generation=rec.template_generation, created_at=now)
                replicas[rid] = new
                ops.append(Put(kind="replicas", name=rid, value=new.to_dict()))
            if len(current) > want:
                # Remove what serves least first: not ready, then not running, then newest.
                victims = sorted(current, key=_removal_order)
                for r in victims[: len(current) - want]:
                    self._remove(r, ops, events, replicas, now, f"scaled down {dep_name}")
            if old:
                # Old replicas leave as new ones turn ready, never taking the ready count
                # below want - maxUnavailable; ones that are not ready serve nobody and
                # leave at once.
                min_available = max(0, want - unavailable)
                available = sum(1 for r in current if r.ready) + sum(1 for r in old if r.ready)
                for r in sorted(old, key=_removal_order):
                    if r.ready:
                        if available - 1 < min_available:
                            continue
                        available -= 1
                    self._remove(r, ops, events, replicas, now, f"replaced by a newer template of {dep_name}")
            if draining:
                # Never below the ready count the deployment had: a draining replica
                # that serves leaves only when the others cover `want` without it.
                ready_elsewhere = sum(1 for r in current if r.ready)
                for r in sorted(draining, key=_removal_order):
                    if r.ready and ready_elsewhere < want:
                        continue
                    self._remove(r, ops, events, replicas, now, f"node {r.node} is draining")

        # 3: placement.
        pending = sorted((r for r in replicas.values() if r.phase == Phase.PENDING and not r.node), key=lambda r: r.id)
        unschedulable: dict[str, str] = {}
        if pending:
            infos = _node_infos(nodes.values(), replicas.values(), specs)
            requests = []
            for r in pending:
                spec = specs.get(r.deployment)
                if spec is None:
                    continue
                requests.append(
                    PlacementRequest(
                        replica_id=r.id,
                        deployment=r.deployment,
                        requests=spec.requests,
                        node_selector=spec.node_selector,
                        placement=spec.placement,
                        needs_port=spec.container_port is not None,
                    )
                )
            plan = self._scheduler.schedule(infos, requests)
            for a in plan.assignments:
                r = replicas[a.replica_id]
                placed = dataclasses.replace(r, node=a.node, host_port=a.host_port or 0, phase=int(Phase.ASSIGNED))
                replicas[r.id] = placed
                ops.append(Put(kind="replicas", name=r.id, value=placed.to_dict()))
                events.append(_event(now, "Normal", "Scheduled", f"pod/{r.id}", f"assigned to {a.node} port {a.host_port}"))
            for u in plan.unplaced:
                unschedulable.setdefault(replicas[u.replica_id].deployment, u.explanation)
        for dep_name, rec in sorted(deployments.items()):
            reason = unschedulable.get(dep_name, "")
            has_pending = any(r.deployment == dep_name and r.phase == Phase.PENDING for r in replicas.values())
            if not has_pending:
                reason = ""
            elif not reason:
                reason = rec.unschedulable  # still pending from an earlier pass
            if reason != rec.unschedulable:
                ops.append(Put(kind="deployments", name=dep_name, value=dataclasses.replace(rec, unschedulable=reason).to_dict()))
                # One event when it becomes unschedulable; the explanation's figures
                # ("largest free 7.8Gi") move with every other placement, and each move
                # is not news worth an event.
                if reason and not rec.unschedulable:
                    events.append(_event(now, "Warning", "FailedScheduling", f"deployment/{dep_name}", reason))

        # 4: tables.
        ops.extend(self._tables(state, deployments, specs, replicas, nodes))
        return Txn(ops=tuple(ops), events=tuple(events))

    def _tables(
        self,
        state: ClusterState,
        deployments: dict[str, DeploymentRecord],
        specs: dict[str, DeploymentSpec | None],
        replicas: dict[str, ReplicaRecord],
        nodes: dict[str, NodeRecord],
    ) -> list[Put | Delete]:
        ops: list[Put | Delete] = []
        services = {s["name"]: ServiceRecord.from_dict(s) for s in state.list("services")}
        for name in list(state.names("tables")):
            if name not in services:
                ops.append(Delete(kind="tables", name=name))
        for name, srec in sorted(services.items()):
            sspec = self.service_spec(srec)
            if sspec is None:
                continue
            endpoints: list[Endpoint] = []
            target_ports: dict[str, int] = {}
            for dep_name, dspec in sorted(specs.items()):
                if dspec is None or not service_matches(sspec, dspec):
                    continue
                weight = int(dict(dspec.annotations).get(ANNOTATION_WEIGHT, "1"))
                for sp in sspec.ports:
                    resolved = _resolve_target_port(sp.target_port, dspec)
                    if resolved is not None:
                        target_ports[str(sp.port)] = resolved
                for r in replicas.values():
                    node = nodes.get(r.node)
                    if r.deployment != dep_name or not r.ready or node is None or not r.host_port:
                        continue
                    if node.status == "Down":
                        continue  # a dead host serves nobody, ready or not when it died
                    endpoints.append(Endpoint(replica_id=r.id, address=node.address, port=r.host_port, weight=weight))
            prev_raw = state.get("tables", name)
            previous = _table_from_record(TableRecord.from_dict(prev_raw)) if prev_raw else None
            table = build_table(name, sspec.algorithm, endpoints, previous)
            ports = [
                {
                    "name": sp.name,
                    "port": sp.port,
                    "target_port": target_ports.get(str(sp.port), sp.target_port if isinstance(sp.target_port, int) else 0),
                    "node_port": sp.node_port or 0,
                    "protocol": sp.protocol,
                    "app_protocol": sp.app_protocol.value,
                }
                for sp in sspec.ports
            ]
            record = TableRecord(
                service=name,
                algorithm=table.algorithm.value,
                version=table.version,
                endpoints=[
                    {"pod": e.replica_id, "address": e.address, "port": e.port, "weight": e.weight}
                    for e in table.endpoints
                ],
                ports=ports,
                dataplane=sspec.dataplane.value,
                hash_header=sspec.hash_header,
            )
            if prev_raw is None or record.to_dict() != prev_raw:
                if previous is not None and record.version <= previous.version:
                    # A change build_table does not version (e.g. the service's ports).
                    record = dataclasses.replace(record, version=previous.version + 1)
                ops.append(Put(kind="tables", name=name, value=record.to_dict()))
        return ops


def _table_from_record(rec: TableRecord) -> Table:
    return Table(
        service=rec.service,
        algorithm=Algorithm(rec.algorithm),
        version=rec.version,
        endpoints=tuple(
            Endpoint(replica_id=e["pod"], address=e["address"], port=e["port"], weight=e.get("weight", 1))
            for e in rec.endpoints
        ),
    )


def _node_infos(
    nodes: Iterable[NodeRecord],
    replicas: Iterable[ReplicaRecord],
    specs: dict[str, DeploymentSpec | None],
) -> list[NodeInfo]:
    cpu: Counter[str] = Counter()
    mem: Counter[str] = Counter()
    ports: dict[str, set[int]] = {}
    per_dep: dict[str, Counter[str]] = {}
    for r in replicas:
        if not r.node:
            continue
        spec = specs.get(r.deployment)
        if spec is not None:
            req = spec.requests
            cpu[r.node] += req.cpu_millis or 0
            mem[r.node] += req.memory_bytes or 0
        if r.host_port:
            ports.setdefault(r.node, set()).add(r.host_port)
        per_dep.setdefault(r.node, Counter())[r.deployment] += 1
    return [
        NodeInfo(
            name=n.name,
            ready=n.status == "Ready",
            cordoned=n.cordoned,
            labels=tuple(sorted(n.labels.items())),
            capacity=Resources(cpu_millis=n.cpu_millis, memory_bytes=n.memory_bytes),
            allocated=Resources(cpu_millis=cpu[n.name], memory_bytes=mem[n.name]),
            used_ports=frozenset(ports.get(n.name, ())) | frozenset(n.blocked_ports),
            replicas_by_deployment=tuple(sorted(per_dep.get(n.name, Counter()).items())),
        )
        for n in sorted(nodes, key=lambda n: n.name)
    ]


def _resolve(value: int | str, total: int, *, round_up: bool) -> int:
    """An absolute count or a percentage of `total` (Kubernetes rounds surge up and
    unavailability down)."""
    if isinstance(value, int):
        return value
    percent = int(value.rstrip("%"))
    scaled = total * percent / 100
    return math.ceil(scaled) if round_up else math.floor(scaled)


def rolling_bounds(rolling: RollingUpdate, want: int) -> tuple[int, int]:
    """(maxSurge, maxUnavailable) as replica counts for a deployment of `want`.

    Both zero cannot make progress; as Kubernetes does, one replica may then be
    unavailable.
    """
    surge = _resolve(rolling.max_surge, want, round_up=True)
    unavailable = _resolve(rolling.max_unavailable, want, round_up=False)
    if surge == 0 and unavailable == 0:
        unavailable = 1
    return surge, unavailable


def _removal_order(r: ReplicaRecord) -> tuple[bool, bool, float, str]:
    """Which replicas go first when some must: not ready, then not running (FAILED sorts
    after RUNNING by number, but a crash-looping replica serves least), then newest."""
    return (r.ready, r.phase == Phase.RUNNING, -r.created_at, r.id)


def _event(now: float, type_: str, reason: str, obj: str, message: str) -> NewEvent:
    return NewEvent(time=now, type=type_, reason=reason, object=obj, message=message)
