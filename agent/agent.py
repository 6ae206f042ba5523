"""The agent shell: holds the watch stream to the leader and drives the reconciler,
the readiness checks and the service proxy from what arrives on it.

Rules:
- One `Agent.Watch` stream at a time; when it breaks, reconnect with back-off. While
  disconnected, nothing stops: replicas keep running and the proxy keeps its last tables.
- Fencing: an assignment set older than the last applied one (lower term, or same term
  and lower revision) is ignored.
- Status goes up as a full report whenever it changes, and at least every
  `report_interval` seconds.
- A replica is ready once its published port accepts a TCP connection (the default
  readiness check for replicas without a readiness probe); it stops being ready when it
  exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from shoal.agent.proxy import ServiceProxy
from shoal.agent.reconciler import Reconciler
from shoal.model import Driver, Resources, RunSpec
from shoal.v1 import agent_pb2, agent_pb2_grpc, types_pb2

__all__ = ["AgentIdentity", "AgentShell", "run_spec_from_pb"]


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentIdentity:
    node: str
    address: str  # where other hosts reach this host's published ports
    role: str
    capacity: Resources
    labels: tuple[tuple[str, str], ...] = ()
    version: str = ""


def run_spec_from_pb(a: agent_pb2.Assignment) -> RunSpec:
    s = a.spec
    return RunSpec(
        replica_id=a.replica_id,
        deployment=a.deployment,
        generation=a.generation,
        driver=Driver(s.driver or "docker"),
        image=s.image,
        command=tuple(s.command),
        args=tuple(s.args),
        env=tuple(sorted(s.env.items())),
        container_port=s.container_port or None,
        host_port=a.host_port or None,
        limits=Resources(cpu_millis=s.limits.cpu_millis or None, memory_bytes=s.limits.memory_bytes or None),
    )


class AgentShell:
    def __init__(
        self,
        identity: AgentIdentity,
        leader_addr: str,
        reconciler: Reconciler,
        proxy: ServiceProxy,
        *,
        report_interval: float = 10.0,
        resync_interval: float = 2.0,
        clock: Callable[[], float] = time.time,
        logger: Any = None,
    ) -> None:
        self.identity = identity
        self.leader_addr = leader_addr
        self.reconciler = reconciler
        self.proxy = proxy
        self.report_interval = report_interval
        self.resync_interval = resync_interval
        self._clock = clock
        self._log = logger or structlog.get_logger("shoal.agent")
        self._fence: tuple[int, int] = (0, -1)
        self._tables_revision = -1
        self.ready: dict[str, str] = {}  # replica id → the handle found ready
        self._checks: dict[str, asyncio.Task[None]] = {}
        self._checks_handle: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._report_dirty = asyncio.Event()
        self._pending_events: list[types_pb2.Event] = []
        self.connected = asyncio.Event()
        self.tables: list[types_pb2.Table] = []

    # -- events the agent reports --------------------------------------------------

    def record_event(self, type_: str, reason: str, obj: str, message: str) -> None:
        self._pending_events.append(
            types_pb2.Event(time=self._clock(), type=type_, reason=reason, object=obj, message=message)
        )
        self._report_dirty.set()

    # -- main loops ---------------------------------------------------------------

    async def run(self) -> None:
        tasks = [
            asyncio.create_task(self._stream_loop(), name="agent-stream"),
            asyncio.create_task(self._reconcile_loop(), name="agent-reconcile"),
        ]
        for driver, runtime in self.reconciler.runtimes.items():
            tasks.append(asyncio.create_task(self._watch_changes(driver), name=f"agent-changes-{driver.value}"))
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            for t in self._checks.values():
                t.cancel()

    async def _watch_changes(self, driver: Driver) -> None:
        runtime = self.reconciler.runtimes[driver]
        while True:
            try:
                async for _rid in runtime.changes():
                    self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a runtime hiccup must not stop the agent
                self._log.warning("agent.changes_failed", driver=driver.value, error=str(exc))
            await asyncio.sleep(1.0)

    async def _reconcile_loop(self) -> None:
        last: bytes = b""
        while True:
            timeout = self.resync_interval
            deadline = self.reconciler.next_deadline()
            if deadline is not None:
                timeout = max(0.0, min(timeout, deadline - self._clock()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            try:
                await self.reconciler.reconcile()
            except Exception as exc:
                self._log.error("agent.reconcile_failed", error=str(exc))
                continue
            self._update_checks()
            report = self._status_report()
            key = report.SerializeToString(deterministic=True)
            if key != last:
                last = key
                self._report_dirty.set()

    def _update_checks(self) -> None:
        observed = self.reconciler.observed
        desired = self.reconciler.desired or {}
        for rid in list(self.ready):
            obs = observed.get(rid)
            if rid not in desired or obs is None or not obs.running or obs.handle != self.ready[rid]:
                del self.ready[rid]
                self.proxy.endpoint_down(rid)
                self._wake.set()
        for rid in list(self._checks):
            obs = observed.get(rid)
            if rid not in desired or obs is None or not obs.running or self._checks[rid].done() or self._checks_handle.get(rid) != obs.handle:
                task = self._checks.pop(rid)
                task.cancel()
        for rid, spec in desired.items():
            obs = observed.get(rid)
            if obs is None or not obs.running or self.ready.get(rid) or rid in self._checks:
                continue
            self._checks[rid] = asyncio.create_task(self._check_ready(rid, spec, obs.handle))
            self._checks_handle[rid] = obs.handle

    async def _check_ready(self, rid: str, spec: RunSpec, handle: str) -> None:
        """Default readiness: the published port accepts a connection (polled)."""
        if not spec.host_port:
            self.ready[rid] = handle
            self._wake.set()
            return
        delay = 0.05
        while True:
            try:
                _, w = await asyncio.wait_for(asyncio.open_connection(self.identity.address, spec.host_port), 1.0)
                w.close()
                self.ready[rid] = handle
                self._log.info("agent.replica_ready", replica=rid, port=spec.host_port)
                self._wake.set()
                return
            except (OSError, TimeoutError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _status_report(self) -> agent_pb2.StatusReport:
        report = agent_pb2.StatusReport()
        for v in self.reconciler.views({rid: True for rid in self.ready}):
            report.replicas.append(
                agent_pb2.ReplicaStatus(
                    replica_id=v.replica_id, generation=v.generation, state=v.state, ready=v.ready,
                    handle=v.handle, restarts=v.restarts, exit_code=v.exit_code, message=v.message,
                    started_at=v.started_at,
                )
            )
        return report

    # -- the stream to the leader ---------------------------------------------------

    async def _stream_loop(self) -> None:
        delay = 0.1
        while True:
            started = self._clock()
            try:
                await self._one_stream()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                self._log.info("agent.stream_broken", leader=self.leader_addr, code=exc.code().name, detail=exc.details())
            except Exception as exc:
                self._log.warning("agent.stream_failed", leader=self.leader_addr, error=repr(exc))
            self.connected.clear()
            if self._clock() - started > 5.0:
                delay = 0.1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _one_stream(self) -> None:
        async with grpc.aio.insecure_channel(self.leader_addr) as channel:
            stub = agent_pb2_grpc.AgentStub(channel)
            call = stub.Watch(self._outgoing())
            async for msg in call:
                self.connected.set()
                body = msg.WhichOneof("body")
                if body == "assignments":
                    self._on_assignments(msg.assignments)
                elif body == "tables":
                    await self._on_tables(msg.tables)

    async def _outgoing(self) -> AsyncIterator[agent_pb2.AgentMessage]:
        ident = self.identity
        hello = agent_pb2.Hello(
            node=ident.node, address=ident.address, role=ident.role, version=ident.version,
            capacity=types_pb2.Resources(cpu_millis=ident.capacity.cpu_millis or 0, memory_bytes=ident.capacity.memory_bytes or 0),
        )
        hello.labels.update(dict(ident.labels))
        yield agent_pb2.AgentMessage(hello=hello)
        while True:
            report = self._status_report()
            events, self._pending_events = self._pending_events, []
            report.events.extend(events)
            self._report_dirty.clear()
            yield agent_pb2.AgentMessage(status=report)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._report_dirty.wait(), self.report_interval)

    def _on_assignments(self, a: agent_pb2.Assignments) -> None:
        fence = (a.term, a.revision)
        if fence < self._fence:
            self._log.warning("agent.stale_assignments_ignored", term=a.term, revision=a.revision, current=self._fence)
            return
        self._fence = fence
        desired = {x.replica_id: run_spec_from_pb(x) for x in a.assignments}
        self.reconciler.set_desired(desired)
        self._log.info("agent.assignments", count=len(desired), term=a.term, revision=a.revision)
        self._wake.set()

    async def _on_tables(self, t: agent_pb2.Tables) -> None:
        if t.revision < self._tables_revision:
            return
        self._tables_revision = t.revision
        self.tables = list(t.tables)
        await self.proxy.update(t.tables)
