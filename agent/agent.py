"""The agent shell: holds the watch stream to the leader and drives the reconciler,
the readiness checks and the service proxy from what arrives on it.

Rules:
- One `Agent.Watch` stream at a time; when it breaks, reconnect with back-off. While
  disconnected, nothing stops: replicas keep running and the proxy keeps its last tables.
- Fencing: an assignment set older than the last applied one (lower term, or same term
  and lower revision) is ignored.
- Status goes up as a full report whenever it changes, and at least every
  `report_interval` seconds.
- Readiness: a replica with a readiness probe is ready while the probe says so
  (`shoal.agent.probe_state`); one without is ready once its published port accepts a
  TCP connection (the default check, run once). Either way, not before its startup
  probe passed, and never once it exits.
- Losing readiness is reported at once: the proxy drops the endpoint's waiting
  connections and the reconcile loop wakes, so the leader hears it and every table
  loses the endpoint within one probe period plus about a second.
- A replica that fails its liveness or startup probe `failureThreshold` times in a row
  is reported (Warning `Unhealthy`), taken out of readiness and killed through the
  reconciler, which restarts it with its crash back-off.
- One supervising task per running replica incarnation runs its probes (or the default
  check); it is cancelled when the replica stops, changes handle or changes probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from shoal.agent.probe_state import Change, ReadinessChanged, ReplicaProbes, Restart, Role, Started
from shoal.agent.probes import ProbeExecutor, ProbeResult, run_probes
from shoal.agent.proxy import ServiceProxy
from shoal.agent.reconciler import Reconciler
from shoal.agent.runtime.base import Observed
from shoal.errors import ShoalError
from shoal.metadata import LEADER_HINT
from shoal.model import Driver, Probe, ProbeKind, Resources, RunSpec
from shoal.table_feed import TableFeed
from shoal.v1 import agent_pb2, agent_pb2_grpc, types_pb2

__all__ = ["AgentIdentity", "AgentShell", "probe_from_pb", "run_spec_from_pb"]


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentIdentity:
    node: str
    address: str  # where other hosts reach this host's published ports
    role: str
    capacity: Resources
    labels: tuple[tuple[str, str], ...] = ()
    version: str = ""
    metrics_port: int = 0
    grpc_port: int = 0


def probe_from_pb(p: agent_pb2.Probe) -> Probe:
    """The model form of a wire probe; ValueError for a kind this agent does not know."""
    return Probe(
        kind=ProbeKind(p.kind),
        port=p.port or None,
        path=p.path or "/",
        command=tuple(p.command),
        service=p.service,
        initial_delay_seconds=p.initial_delay_seconds,
        period_seconds=p.period_seconds,
        timeout_seconds=p.timeout_seconds,
        success_threshold=p.success_threshold,
        failure_threshold=p.failure_threshold,
    )


def _probe_field(s: agent_pb2.RunSpec, name: str) -> Probe | None:
    if not s.HasField(name):
        return None
    return probe_from_pb(getattr(s, name))


def run_spec_from_pb(a: agent_pb2.Assignment) -> RunSpec:
    """The model form of an assignment; ValueError when it asks for what this agent
    cannot do (an unknown driver or probe kind), rather than running it half-way."""
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
        liveness=_probe_field(s, "liveness"),
        readiness=_probe_field(s, "readiness"),
        startup=_probe_field(s, "startup"),
    )


class AgentShell:
    def __init__(
        self,
        identity: AgentIdentity,
        leader_addr: str | Callable[[], str | None],
        reconciler: Reconciler,
        proxy: ServiceProxy,
        *,
        report_interval: float = 10.0,
        resync_interval: float = 2.0,
        clock: Callable[[], float] = time.time,
        logger: Any = None,
        usage: Callable[[], types_pb2.Usage] | None = None,
        table_feed: TableFeed | None = None,
    ) -> None:
        self.identity = identity
        # Where `Control.WatchTable` streams each table set this agent receives from.
        self.table_feed = table_feed if table_feed is not None else TableFeed()
        # The host's live resource use, sampled for every report (None: not reported).
        self._usage = usage
        # A fixed address (a server talks to itself), or a function that names a server
        # from the gossip view at each connection attempt (None: none known yet).
        self._leader_addr = leader_addr
        self.reconciler = reconciler
        self.proxy = proxy
        self.report_interval = report_interval
        self.resync_interval = resync_interval
        self._clock = clock
        self._log = logger or structlog.get_logger("shoal.agent")
        self._fence: tuple[int, int] = (0, -1)
        # Where a follower said the leader is; used until a stream to it fails.
        self._hint: str | None = None
        self._tables_revision = -1
        self.ready: dict[str, str] = {}  # replica id → the handle found ready
        # One supervising task per running replica (probes, or the default check), and
        # what it was started for: a new handle or new probes need a new one.
        self._checks: dict[str, asyncio.Task[None]] = {}
        self._checks_key: dict[str, tuple[str, tuple[Probe | None, ...]]] = {}
        self._wake = asyncio.Event()
        self._report_dirty = asyncio.Event()
        self._pending_events: list[types_pb2.Event] = []
        self._unsupported: set[str] = set()  # replica ids already reported as unsupported
        self.connected = asyncio.Event()
        self.tables: list[types_pb2.Table] = []

    @property
    def leader_addr(self) -> str | None:
        if self._hint:
            return self._hint
        return self._leader_addr() if callable(self._leader_addr) else self._leader_addr

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
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation
            # that arrives as the event is set, and this loop (woken often by probes)
            # would then outlive its cancellation.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
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
                self._not_ready(rid)
        for rid in list(self._checks):
            obs = observed.get(rid)
            spec = desired.get(rid)
            if (
                spec is None or obs is None or not obs.running or self._checks[rid].done()
                or self._checks_key.get(rid) != _check_key(obs.handle, spec)
            ):
                task = self._checks.pop(rid)
                self._checks_key.pop(rid, None)
                task.cancel()
        for rid, spec in desired.items():
            obs = observed.get(rid)
            if obs is None or not obs.running or rid in self._checks:
                continue
            if self.ready.get(rid) == obs.handle and not _probes_of(spec):
                continue  # the default check is done for this incarnation
            self._checks[rid] = asyncio.create_task(self._supervise(rid, spec, obs), name=f"agent-probes-{rid}")
            self._checks_key[rid] = _check_key(obs.handle, spec)

    def _not_ready(self, rid: str) -> None:
        """Take a replica out of readiness now; the next report tells the leader."""
        if self.ready.pop(rid, None) is not None:
            self.proxy.endpoint_down(rid)
            self._wake.set()

    async def _supervise(self, rid: str, spec: RunSpec, obs: Observed) -> None:
        """Readiness and health of one running incarnation, until cancelled or killed."""
        handle = obs.handle
        try:
            if not _probes_of(spec):
                await self._check_ready(rid, spec, handle)
                return
            now = self._clock()
            try:
                machine = ReplicaProbes(
                    started_at=min(obs.started_at or now, now),
                    startup=spec.startup, liveness=spec.liveness, readiness=spec.readiness,
                )
            except ShoalError as exc:
                self.record_event("Warning", "FailedProbe", f"pod/{rid}", f"probes not run: {exc}")
                await self._check_ready(rid, spec, handle)
                return
            await self._run_probes(rid, spec, handle, machine)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not take the agent down; retried next pass
            self._log.error("agent.probes_failed", replica=rid, error=repr(exc))
            self._wake.set()

    async def _run_probes(self, rid: str, spec: RunSpec, handle: str, machine: ReplicaProbes) -> None:
        runtime = self.reconciler.runtimes[spec.driver]
        executor = ProbeExecutor(spec, runtime, self.identity.address)
        default_check: asyncio.Task[None] | None = None

        def started() -> None:
            nonlocal default_check
            if spec.readiness is None and default_check is None:
                default_check = asyncio.create_task(self._check_ready(rid, spec, handle))

        async def on_changes(role: Role, result: ProbeResult, changes: tuple[Change, ...]) -> None:
            nonlocal default_check
            for change in changes:
                if isinstance(change, Started):
                    self._log.info("agent.replica_started", replica=rid, probe=result.message)
                    started()
                elif isinstance(change, ReadinessChanged) and change.ready:
                    self.ready[rid] = handle
                    self._log.info("agent.replica_ready", replica=rid, probe=result.message)
                    self._wake.set()
                elif isinstance(change, ReadinessChanged):
                    self._log.info("agent.replica_not_ready", replica=rid, probe=change.message)
                    self._not_ready(rid)
                    self.record_event("Warning", "Unhealthy", f"pod/{rid}", f"Readiness probe failed: {change.message}")
                elif isinstance(change, Restart):
                    if default_check is not None:
                        default_check.cancel()
                    self._not_ready(rid)
                    why = f"{change.role.label} probe failed {change.failures} time{'s' if change.failures != 1 else ''} in a row: {change.message}"
                    self.record_event("Warning", "Unhealthy", f"pod/{rid}", f"{why}; restarting")
                    self._log.warning("agent.replica_unhealthy", replica=rid, reason=why)
                    await self.reconciler.kill(rid, why, handle=handle)
                    self._wake.set()

        if machine.started:
            started()
        try:
            await run_probes(machine, executor.run, on_changes, clock=self._clock)
        finally:
            if default_check is not None:
                default_check.cancel()

    async def _check_ready(self, rid: str, spec: RunSpec, handle: str) -> None:
        """Default readiness: the published port accepts a connection (polled)."""
        if not spec.host_port:
            self.ready[rid] = handle
            self._wake.set()
            return
        delay = 0.05
        while True:
            try:
                async with asyncio.timeout(1.0):
                    _, w = await asyncio.open_connection(self.identity.address, spec.host_port)
                w.close()
                self.ready[rid] = handle
                self._log.info("agent.replica_ready", replica=rid, port=spec.host_port)
                self._wake.set()
                return
            except (OSError, TimeoutError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _status_report(self, *, usage: bool = False) -> agent_pb2.StatusReport:
        """What the leader is told. With `usage`, the host's resource use too: sampled only
        for a report that is sent, so it never by itself makes a report due."""
        report = agent_pb2.StatusReport()
        if usage and self._usage is not None:
            report.usage.CopyFrom(self._usage())
        for v in self.reconciler.views({rid: True for rid in self.ready}):
            report.replicas.append(
                agent_pb2.ReplicaStatus(
                    replica_id=v.replica_id, generation=v.generation, state=v.state, ready=v.ready,
                    handle=v.handle, restarts=v.restarts, exit_code=v.exit_code, message=v.message,
                    started_at=v.started_at, port_conflict=v.port_conflict,
                )
            )
        return report

    # -- the stream to the leader ---------------------------------------------------

    async def _stream_loop(self) -> None:
        delay = RETRY_FIRST
        lost_at: float | None = None  # when the last healthy stream ended
        while True:
            started = self._clock()
            try:
                await self._one_stream()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                self._log.info("agent.stream_broken", leader=self.leader_addr, code=exc.code().name, detail=exc.details())
                hint = _leader_hint(exc)
                if hint and hint != self._hint:
                    # A follower named the leader: go there at once.
                    self._hint = hint
                    self.connected.clear()
                    continue
                self._hint = None
            except Exception as exc:
                self._log.warning("agent.stream_failed", leader=self.leader_addr, error=repr(exc))
                self._hint = None
            self.connected.clear()
            now = self._clock()
            if lost_at is None or now - started > HEALTHY_STREAM:
                delay, lost_at = RETRY_FIRST, now  # a new outage
            # Jittered, so agents that lost one leader together do not retry in step.
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            # While a new leader is being elected (about a second), retry often: the
            # delay before the first stream to it is time its replacements wait. Only an
            # outage that lasts (no quorum) backs off further.
            cap = RETRY_CAP_ELECTION if now - lost_at < ELECTION_WINDOW else RETRY_CAP
            delay = min(delay * 2, cap)

    async def _one_stream(self) -> None:
        target = self.leader_addr
        if target is None:
            raise ConnectionError("no server known yet (waiting for gossip)")
        async with grpc.aio.insecure_channel(target, options=_STREAM_OPTIONS) as channel:
            try:
                await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT)
            except TimeoutError:
                raise ConnectionError(f"no answer from {target} within {CONNECT_TIMEOUT:g} s") from None
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
            metrics_port=ident.metrics_port, grpc_port=ident.grpc_port,
            capacity=types_pb2.Resources(cpu_millis=ident.capacity.cpu_millis or 0, memory_bytes=ident.capacity.memory_bytes or 0),
        )
        hello.labels.update(dict(ident.labels))
        yield agent_pb2.AgentMessage(hello=hello)
        while True:
            report = self._status_report(usage=True)
            events, self._pending_events = self._pending_events, []
            report.events.extend(events)
            self._report_dirty.clear()
            yield agent_pb2.AgentMessage(status=report)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.report_interval):
                    await self._report_dirty.wait()

    def _on_assignments(self, a: agent_pb2.Assignments) -> None:
        fence = (a.term, a.revision)
        if fence < self._fence:
            self._log.warning("agent.stale_assignments_ignored", term=a.term, revision=a.revision, current=self._fence)
            return
        self._fence = fence
        desired: dict[str, RunSpec] = {}
        for x in a.assignments:
            try:
                desired[x.replica_id] = run_spec_from_pb(x)
            except ValueError as exc:
                # A newer leader asking for something this agent cannot do: not run at
                # all rather than run without it (a probe silently dropped). Said once.
                if x.replica_id not in self._unsupported:
                    self._unsupported.add(x.replica_id)
                    self._log.warning("agent.assignment_unsupported", replica=x.replica_id, error=str(exc))
                    self.record_event("Warning", "Unsupported", f"pod/{x.replica_id}",
                                      f"agent {self.identity.node} (version {self.identity.version or '?'}) cannot run it: {exc}")
        self.reconciler.set_desired(desired)
        self._log.info("agent.assignments", count=len(desired), term=a.term, revision=a.revision)
        self._wake.set()

    async def _on_tables(self, t: agent_pb2.Tables) -> None:
        if t.revision < self._tables_revision:
            return
        self._tables_revision = t.revision
        self.tables = list(t.tables)
        self.table_feed.publish(self.tables)
        await self.proxy.update(t.tables)


CONNECT_TIMEOUT = 2.0
# The stream to the leader is retried after RETRY_FIRST s, doubling up to
# RETRY_CAP_ELECTION s during the first ELECTION_WINDOW s of an outage and up to RETRY_CAP
# s after it. A stream that lived HEALTHY_STREAM s counts as healthy: its end starts a new
# outage. Measured on the netns cluster: with one cap of 5 s, a replica replaced after
# its leader's host died could wait 6 s more for its new host to reach the new leader.
RETRY_FIRST = 0.1
RETRY_CAP_ELECTION = 0.5
ELECTION_WINDOW = 15.0
RETRY_CAP = 5.0
HEALTHY_STREAM = 5.0
"""Seconds to reach a server before trying the next: a server that went dark and is not
yet declared dead by gossip must not hold an agent for gRPC's default 20 s."""

_STREAM_OPTIONS = [
    # A leader whose host went silent is noticed in about 2 s by keepalive, not by TCP's
    # retransmission timeouts (minutes): the agent then follows the new leader.
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 1000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_http_proxy", 0),
]


def _leader_hint(exc: grpc.aio.AioRpcError) -> str | None:
    """The leader's address a follower put in its refusal, if any."""
    for key, value in exc.trailing_metadata() or ():
        if key == LEADER_HINT:
            return str(value)
    return None


def _probes_of(spec: RunSpec) -> tuple[Probe | None, ...] | None:
    """The replica's probes, or None when it has none (the default check applies)."""
    probes = (spec.startup, spec.liveness, spec.readiness)
    return probes if any(p is not None for p in probes) else None


def _check_key(handle: str, spec: RunSpec) -> tuple[str, tuple[Probe | None, ...]]:
    return (handle, (spec.startup, spec.liveness, spec.readiness))
