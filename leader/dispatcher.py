"""The `Agent` gRPC service: streams each agent its assignments and every table, and
records what agents report.

Rules:
- The first message on a stream must be `Hello`; it registers (or re-registers) the node.
- The leader sends *full* sets, level-triggered: the agent's assignments whenever they
  change, every table whenever any changes. A message is sent only when its content
  differs from the last one sent on this stream.
- Status reports update replica records only where something changed, so an idle cluster
  does not write.
- When the stream ends, the node is marked NotReady: nothing new is placed on it, and
  what runs there keeps running (the agent keeps its last assignments and tables).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc
import structlog

from shoal.leader.records import NodeRecord, Phase, ReplicaRecord, TableRecord
from shoal.leader.state import ClusterState, NewEvent, Put, Txn
from shoal.leader.store import Store
from shoal.leader import convert
from shoal.leader.controller import Controller
from shoal.leader.records import DeploymentRecord
from shoal.model import Probe
from shoal.v1 import agent_pb2, agent_pb2_grpc, types_pb2

if TYPE_CHECKING:
    from shoal.leader.server import ServerRole

__all__ = ["AgentService", "apply_report", "assignments_for", "probe_pb"]

_PHASES = {
    "starting": Phase.STARTING,
    "running": Phase.RUNNING,
    "exited": Phase.FAILED,
    "failed": Phase.FAILED,
}


# Host ports found taken by something shoal does not manage, remembered per node so the
# scheduler avoids them; a bounded list, since such ports are few and may be freed.
BLOCKED_PORTS_KEPT = 256


def apply_report(state: ClusterState, node: str, report: agent_pb2.StatusReport, now: float) -> Txn:
    """The transaction that records an agent's status report (pure)."""
    ops: list[Put] = []
    events: list[NewEvent] = []
    blocked: list[int] = []
    for st in report.replicas:
        raw = state.get("replicas", st.replica_id)
        if raw is None:
            continue
        rec = ReplicaRecord.from_dict(raw)
        if rec.node != node:
            continue  # fenced: a node reporting on a replica it no longer owns
        if st.port_conflict and st.port_conflict == rec.host_port:
            # Something shoal does not manage holds the port: remember it for this node
            # and send the replica back to the scheduler for another one.
            blocked.append(rec.host_port)
            moved = dataclasses.replace(rec, node="", host_port=0, phase=int(Phase.PENDING), ready=False,
                                        handle="", message=st.message)
            ops.append(Put(kind="replicas", name=rec.id, value=moved.to_dict()))
            events.append(NewEvent(time=now, type="Warning", reason="PortInUse", object=f"pod/{rec.id}",
                                   message=f"{st.message}; choosing another port"))
            continue
        phase = _PHASES.get(st.state, Phase(rec.phase))
        new = dataclasses.replace(
            rec,
            phase=int(phase),
            ready=st.ready and phase == Phase.RUNNING,
            handle=st.handle,
            restarts=st.restarts,
            exit_code=st.exit_code,
            message=st.message,
            started_at=st.started_at,
        )
        if new != rec:
            ops.append(Put(kind="replicas", name=rec.id, value=new.to_dict()))
    for e in report.events:
        events.append(NewEvent(time=e.time or now, type=e.type or "Normal", reason=e.reason, object=e.object, message=e.message))
    node_raw = state.get("nodes", node)
    if node_raw is not None:
        n = NodeRecord.from_dict(node_raw)
        changed = n
        if blocked:
            ports = sorted(set(n.blocked_ports) | set(blocked))[-BLOCKED_PORTS_KEPT:]
            changed = dataclasses.replace(changed, blocked_ports=ports)
        if report.HasField("usage"):
            u = report.usage
            usage = {"cpu_percent": u.cpu_percent, "memory_used_bytes": u.memory_used_bytes,
                     "disk_used_bytes": u.disk_used_bytes, "disk_total_bytes": u.disk_total_bytes}
            if usage != n.usage:
                changed = dataclasses.replace(changed, usage=usage)
        if changed != n:
            ops.append(Put(kind="nodes", name=node, value=changed.to_dict()))
    return Txn(ops=tuple(ops), events=tuple(events))


def probe_pb(p: Probe) -> agent_pb2.Probe:
    """The wire form of a probe (the agent converts back in `run_spec_from_pb`)."""
    return agent_pb2.Probe(
        kind=p.kind.value,
        port=p.port or 0,
        path=p.path,
        command=list(p.command),
        service=p.service,
        initial_delay_seconds=p.initial_delay_seconds,
        period_seconds=p.period_seconds,
        timeout_seconds=p.timeout_seconds,
        success_threshold=p.success_threshold,
        failure_threshold=p.failure_threshold,
    )


def assignments_for(state: ClusterState, controller: Controller, node: str, term: int) -> agent_pb2.Assignments:
    """The full set of replicas `node` must run, as of `state`."""
    out = agent_pb2.Assignments(term=term, revision=state.revision)
    deployments = {d["name"]: DeploymentRecord.from_dict(d) for d in state.list("deployments")}
    for raw in state.list("replicas"):
        r = ReplicaRecord.from_dict(raw)
        if r.node != node:
            continue
        rec = deployments.get(r.deployment)
        spec = controller.deployment_spec(rec) if rec else None
        if spec is None:
            continue
        c = spec.container
        run = agent_pb2.RunSpec(
            driver=spec.driver.value,
            image=c.image,
            command=list(c.command),
            args=list(c.args),
            container_port=spec.container_port or 0,
            limits=types_pb2.Resources(cpu_millis=c.limits.cpu_millis or 0, memory_bytes=c.limits.memory_bytes or 0),
        )
        run.env.update(dict(c.env))
        for field, probe in (("liveness", c.liveness_probe), ("readiness", c.readiness_probe), ("startup", c.startup_probe)):
            if probe is not None:
                getattr(run, field).CopyFrom(probe_pb(probe))
        out.assignments.append(
            agent_pb2.Assignment(replica_id=r.id, deployment=r.deployment, generation=r.generation, host_port=r.host_port, spec=run)
        )
    return out


def tables_of(state: ClusterState) -> agent_pb2.Tables:
    return agent_pb2.Tables(
        revision=state.revision,
        tables=[convert.table_pb(TableRecord.from_dict(t)) for t in state.list("tables")],
    )


class AgentService(agent_pb2_grpc.AgentServicer):
    def __init__(
        self,
        store: Store,
        controller: Controller,
        *,
        term: Callable[[], int] = lambda: 1,
        cluster: ServerRole | None = None,
        clock: Callable[[], float] = time.time,
        logger: Any = None,
    ) -> None:
        self._store = store
        self._cluster = cluster
        self._controller = controller
        self._term = term
        self._clock = clock
        self._log = logger or structlog.get_logger("shoal.dispatcher")
        # The newest stream of each node. An agent that reconnects opens its new stream
        # before the server notices the old one is gone; only the newest may mark the
        # node NotReady when it ends.
        self._streams: dict[str, object] = {}

    async def Watch(
        self, request_iterator: AsyncIterator[agent_pb2.AgentMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.LeaderMessage]:
        if self._cluster is not None and not self._cluster.is_leader():
            # Agents follow the leader: tell this one where it is.
            code, message, trailers = self._cluster.refusal()
            context.set_trailing_metadata(trailers)
            await context.abort(code, message)
        it = request_iterator.__aiter__()
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            return
        if first.WhichOneof("body") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message on an agent stream must be Hello")
            return
        hello = first.hello
        node = hello.node
        if not node or not hello.address:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Hello needs a node name and an address")
            return
        await self._register(hello)
        stream = self._streams[node] = object()
        self._log.info("dispatcher.agent_connected", node=node, address=hello.address)
        reader = asyncio.create_task(self._read_reports(node, it))
        last_assign: bytes | None = None
        last_tables: bytes | None = None
        seen = -1  # the state revision last turned into messages
        try:
            while not reader.done():
                if self._cluster is not None and not self._cluster.is_leader():
                    # Deposed: end the stream so the agent finds the new leader (its
                    # assignments from here would carry a stale term anyway).
                    code, message, trailers = self._cluster.refusal()
                    context.set_trailing_metadata(trailers)
                    await context.abort(code, message)
                state = self._store.state
                revision = state.revision
                if revision != seen:
                    # Wakes without a new revision (the leadership check's) cost nothing.
                    seen = revision
                    assign = assignments_for(state, self._controller, node, self._term())
                    key = _without_revision(assign)
                    if key != last_assign:
                        last_assign = key
                        yield agent_pb2.LeaderMessage(assignments=assign)
                    tables = tables_of(state)
                    tkey = _without_revision(tables)
                    if tkey != last_tables:
                        last_tables = tkey
                        yield agent_pb2.LeaderMessage(tables=tables)
                waiter = asyncio.ensure_future(
                    self._store.wait(revision, timeout=10.0 if self._cluster is None else 0.5))
                await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
        finally:
            reader.cancel()
            self._log.info("dispatcher.agent_disconnected", node=node)
            if self._streams.get(node) is stream:
                del self._streams[node]
                await self._set_status(node, "NotReady")

    async def _register(self, hello: agent_pb2.Hello) -> None:
        now = self._clock()

        def build(state: ClusterState) -> Txn:
            old_raw = state.get("nodes", hello.node)
            old = NodeRecord.from_dict(old_raw) if old_raw else None
            rec = NodeRecord(
                name=hello.node,
                address=hello.address,
                role=hello.role or "client",
                status="Ready",
                cordoned=old.cordoned if old else False,
                draining=old.draining if old else False,
                blocked_ports=old.blocked_ports if old else [],
                cpu_millis=hello.capacity.cpu_millis,
                memory_bytes=hello.capacity.memory_bytes,
                labels=dict(hello.labels),
                last_seen=now,
                version=hello.version,
                metrics_port=hello.metrics_port,
                grpc_port=hello.grpc_port,
            )
            event = NewEvent(time=now, type="Normal", reason="NodeReady" if old else "NodeRegistered",
                             object=f"node/{hello.node}", message=f"agent connected from {hello.address}")
            return Txn(ops=(Put(kind="nodes", name=rec.name, value=rec.to_dict()),), events=(event,))

        await self._store.update(build)

    async def _set_status(self, node: str, status: str) -> None:
        now = self._clock()

        def build(state: ClusterState) -> Txn:
            raw = state.get("nodes", node)
            if raw is None or raw.get("status") == status:
                return Txn()
            if raw.get("status") == "Down" and status == "NotReady":
                # Gossip already declared the host dead; its stream ending (possibly much
                # later, for a silent host) says nothing new and must not undo that.
                return Txn()
            rec = dataclasses.replace(NodeRecord.from_dict(raw), status=status, last_seen=now)
            return Txn(ops=(Put(kind="nodes", name=node, value=rec.to_dict()),))

        try:
            await self._store.update(build)
        except Exception:  # the server may be shutting down; the next Hello fixes it
            self._log.warning("dispatcher.status_not_recorded", node=node, status=status)

    async def _read_reports(self, node: str, it: AsyncIterator[agent_pb2.AgentMessage]) -> None:
        async for msg in it:
            if msg.WhichOneof("body") != "status":
                continue
            status, now = msg.status, self._clock()
            await self._store.update(lambda st: apply_report(st, node, status, now))


def _without_revision(msg: agent_pb2.Assignments | agent_pb2.Tables) -> bytes:
    copy = type(msg)()
    copy.CopyFrom(msg)
    copy.revision = 0
    return copy.SerializeToString(deterministic=True)
