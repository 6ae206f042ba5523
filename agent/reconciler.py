"""The agent's reconciler: make what runs on this host match what the leader assigned.

Rules:
- Until the first assignment set arrives, nothing is stopped: a restarted agent adopts
  what is running and waits to hear what it should run (the leader may be unreachable,
  and the workloads must outlive that).
- A running replica with an assigned id is adopted as it is, never restarted.
- A replica that is running and not assigned is stopped.
- An assigned replica that is missing is started at once; one that exited is restarted
  after an exponential back-off (`backoff_delay`), reset once it has run for
  `backoff_reset` seconds.
- A replica the agent `kill()`s (it failed its liveness or startup probe) counts as a
  crash: it is stopped at once and restarted by the next plan after its back-off.
- The planning step (`plan`) is pure: observed state + desired state + per-replica
  history + now → actions. `Reconciler` executes the actions on the runtimes.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from shoal.agent.runtime.base import Observed, Runtime
from shoal.errors import HostPortInUse, ShoalError
from shoal.model import Driver, RunSpec

__all__ = [
    "BackoffConfig",
    "backoff_delay",
    "ActionKind",
    "Action",
    "History",
    "plan",
    "Reconciler",
    "ReplicaView",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class BackoffConfig:
    """Restart back-off, in seconds.

    `base`: the first restart waits this long — short, so a one-off crash costs well under
    the 5 s replacement budget. `cap`: the longest wait, so a crash-looping replica
    costs the host almost nothing (Kubernetes uses 10 s doubling to 5 min; shoal starts
    lower because its first restart is the common, transient case). `reset`: a replica
    that ran this long is considered healthy again and its next crash starts over.
    """

    base: float = 0.2
    cap: float = 60.0
    reset: float = 30.0


# `History.last_exit_seen` after a start that raised, or a kill for a failed probe: the
# failure is counted already, and what is observed next is its aftermath.
_START_FAILED = "start-failed:"
_KILLED = "killed:"
_COUNTED = (_START_FAILED, _KILLED)


def backoff_delay(failures: int, config: BackoffConfig) -> float:
    """Seconds to wait before restart number `failures` (1 = first restart)."""
    if failures <= 0:
        return 0.0
    return float(min(config.cap, config.base * (2 ** (failures - 1))))


class ActionKind(enum.Enum):
    START = "start"
    RESTART = "restart"
    STOP = "stop"


@dataclass(frozen=True, slots=True, kw_only=True)
class Action:
    kind: ActionKind
    replica_id: str
    driver: Driver
    spec: RunSpec | None = None


@dataclass(slots=True)
class History:
    """What the agent remembers of one replica across reconcile passes."""

    failures: int = 0  # consecutive crashes since it last ran `reset` seconds
    restarts: int = 0  # total restarts, reported to the leader
    next_start: float = 0.0  # earliest time the next restart may happen
    last_exit_seen: str = ""  # the handle whose exit was already counted
    message: str = ""
    reason: str = ""  # why the agent killed it (a failed probe), until it restarts


def plan(
    desired: Mapping[str, RunSpec] | None,
    observed: Mapping[str, Observed],
    history: dict[str, History],
    now: float,
    config: BackoffConfig,
) -> list[Action]:
    """What to do now. Mutates `history` (failure counts, back-off deadlines)."""
    actions: list[Action] = []
    if desired is None:
        return actions  # never heard from the leader: adopt everything, stop nothing
    for rid, obs in sorted(observed.items()):
        if rid not in desired:
            actions.append(Action(kind=ActionKind.STOP, replica_id=rid, driver=obs.driver))
    for rid, spec in sorted(desired.items()):
        obs = observed.get(rid)
        h = history.setdefault(rid, History())
        if obs is not None and obs.driver != spec.driver:
            actions.append(Action(kind=ActionKind.STOP, replica_id=rid, driver=obs.driver))
            obs = None
        if obs is None:
            if h.restarts == 0 and h.failures == 0 and not h.last_exit_seen:
                actions.append(Action(kind=ActionKind.START, replica_id=rid, driver=spec.driver, spec=spec))
                continue
            # It existed before and vanished (removed behind our back): a crash.
            obs_handle = "<missing>"
        elif obs.running:
            if h.last_exit_seen.startswith(_COUNTED):
                h.last_exit_seen = ""  # it runs after all: its next exit is a new crash
                h.next_start = 0.0  # and no restart is pending (next_deadline must not fire)
            if obs.started_at is not None and now - obs.started_at >= config.reset:
                h.failures = 0
            continue
        else:
            obs_handle = obs.handle
        if h.last_exit_seen != obs_handle:
            if h.last_exit_seen.startswith(_COUNTED):
                # The executor already counted this failure (a start that raised, a kill)
                # and set its back-off; what is observed now is its aftermath, not a new
                # crash.
                h.last_exit_seen = obs_handle
            else:
                h.last_exit_seen = obs_handle
                h.failures += 1
                h.next_start = now + backoff_delay(h.failures, config)
        if now >= h.next_start:
            actions.append(Action(kind=ActionKind.RESTART, replica_id=rid, driver=spec.driver, spec=spec))
            h.restarts += 1
            h.next_start = 0.0
            h.last_exit_seen = ""  # whatever exits next is a new crash
            h.reason = ""
        else:
            h.message = f"back-off {h.next_start - now:.1f}s restarting failed replica"
            if h.reason:
                h.message += f" ({h.reason})"
    for rid in list(history):
        if rid not in desired:
            del history[rid]
    return actions


@dataclass(slots=True)
class ReplicaView:
    """What the agent reports about one replica."""

    replica_id: str
    generation: int
    state: str  # starting | running | exited | failed
    ready: bool
    handle: str
    restarts: int
    exit_code: int
    message: str
    started_at: float
    port_conflict: int = 0  # the host port that was taken, when that is why it cannot start


class Reconciler:
    """Executes `plan` against the runtimes; the agent shell calls `reconcile()`."""

    def __init__(
        self,
        runtimes: Mapping[Driver, Runtime],
        *,
        config: BackoffConfig = BackoffConfig(),
        clock: Callable[[], float] = time.time,
        logger: Any = None,
    ) -> None:
        self.runtimes = dict(runtimes)
        self.config = config
        self._clock = clock
        self._log = logger or structlog.get_logger("shoal.reconciler")
        self.desired: dict[str, RunSpec] | None = None
        self.history: dict[str, History] = {}
        self.observed: dict[str, Observed] = {}
        self.errors: dict[str, str] = {}  # replica id → why its last start failed
        self.port_conflicts: dict[str, int] = {}  # replica id → host port found taken
        self._lock = asyncio.Lock()

    def set_desired(self, desired: dict[str, RunSpec]) -> None:
        self.desired = desired

    async def observe(self) -> dict[str, Observed]:
        observed: dict[str, Observed] = {}
        for driver, runtime in self.runtimes.items():
            try:
                for o in await runtime.list():
                    observed[o.replica_id] = o
            except ShoalError as exc:
                self._log.warning("reconciler.list_failed", driver=driver.value, error=str(exc))
        return observed

    async def reconcile(self) -> list[Action]:
        """One pass: observe, plan, act. Returns what it did."""
        async with self._lock:
            self.observed = await self.observe()
            actions = plan(self.desired, self.observed, self.history, self._clock(), self.config)
            if self.desired is not None:
                for rid in [r for r in self.errors if r not in self.desired]:
                    del self.errors[rid]
                for rid in [r for r in self.port_conflicts if r not in self.desired]:
                    del self.port_conflicts[rid]
            # Each action concerns a different replica: run them together, so stopping
            # ten replicas that ignore SIGTERM costs one grace period, not ten.
            await asyncio.gather(*(self._execute(a) for a in actions))
            if actions:
                self.observed = await self.observe()
            return actions

    async def _execute(self, action: Action) -> None:
        runtime = self.runtimes.get(action.driver)
        if runtime is None:
            self.errors[action.replica_id] = f"no {action.driver.value} runtime on this host"
            return
        try:
            if action.kind is ActionKind.STOP:
                await runtime.stop(action.replica_id)
                self._log.info("reconciler.stopped", replica=action.replica_id)
            else:
                assert action.spec is not None
                await runtime.start(action.spec)
                self.errors.pop(action.replica_id, None)
                self.port_conflicts.pop(action.replica_id, None)
                self._log.info(f"reconciler.{action.kind.value}ed", replica=action.replica_id,
                               restarts=self.history.get(action.replica_id, History()).restarts)
        except ShoalError as exc:
            self.errors[action.replica_id] = str(exc)
            if isinstance(exc, HostPortInUse):
                self.port_conflicts[action.replica_id] = exc.port or (action.spec.host_port if action.spec else 0) or 0
            h = self.history.setdefault(action.replica_id, History())
            if action.kind is not ActionKind.STOP:
                # A failed start counts as a crash so retries back off too.
                h.failures += 1
                h.last_exit_seen = f"{_START_FAILED}{h.failures}"
                h.next_start = self._clock() + backoff_delay(h.failures, self.config)
            self._log.warning("reconciler.action_failed", action=action.kind.value, replica=action.replica_id, error=str(exc))

    async def kill(self, replica_id: str, reason: str, *, handle: str | None = None, timeout: float = 10.0) -> bool:
        """Stop a running replica that failed its liveness or startup probe, counted as a
        crash, so the next `reconcile()` restarts it after its back-off.

        `handle`: kill only that incarnation (a verdict on an older one is moot).
        `timeout`: seconds between SIGTERM and SIGKILL. False when there was nothing to
        kill (not assigned, not running, another incarnation).
        """
        async with self._lock:
            spec = (self.desired or {}).get(replica_id)
            runtime = self.runtimes.get(spec.driver) if spec is not None else None
            if runtime is None:
                return False
            self.observed = await self.observe()
            obs = self.observed.get(replica_id)
            if obs is None or not obs.running or (handle is not None and obs.handle != handle):
                return False
            # Counted before the stop, so a stop that fails or is cancelled half-way
            # still leaves the back-off in place.
            h = self.history.setdefault(replica_id, History())
            h.failures += 1
            h.last_exit_seen = f"{_KILLED}{h.failures}"
            h.next_start = self._clock() + backoff_delay(h.failures, self.config)
            h.reason = reason
            self._log.info("reconciler.killing", replica=replica_id, reason=reason, failures=h.failures)
            try:
                await runtime.stop(replica_id, timeout=timeout)
            except ShoalError as exc:
                self._log.warning("reconciler.kill_failed", replica=replica_id, error=str(exc))
            self.observed = await self.observe()
            return True

    def next_deadline(self) -> float | None:
        """When the earliest pending back-off ends (for the shell's timer), if any."""
        pending = [h.next_start for h in self.history.values() if h.next_start > 0.0]
        return min(pending) if pending else None

    def views(self, ready: Mapping[str, bool]) -> list[ReplicaView]:
        """The status of every desired replica, for the leader."""
        out: list[ReplicaView] = []
        for rid, spec in sorted((self.desired or {}).items()):
            obs = self.observed.get(rid)
            h = self.history.get(rid, History())
            err = self.errors.get(rid, "")
            if obs is None:
                state, handle, code, started = ("failed" if err else "starting"), "", 0, 0.0
            elif obs.running:
                state, handle, code, started = "running", obs.handle, 0, obs.started_at or 0.0
            else:
                state, handle, code, started = "exited", obs.handle, obs.exit_code or 0, obs.started_at or 0.0
            message = err or (h.message if state != "running" else "") or obs_error(obs)
            out.append(
                ReplicaView(
                    replica_id=rid,
                    generation=spec.generation,
                    state=state,
                    ready=state == "running" and ready.get(rid, False),
                    handle=handle,
                    restarts=h.restarts,
                    exit_code=code,
                    message=message,
                    started_at=started,
                    port_conflict=self.port_conflicts.get(rid, 0) if err else 0,
                )
            )
        return out


def obs_error(obs: Observed | None) -> str:
    if obs is None or obs.running:
        return ""
    return obs.error or (f"exited with code {obs.exit_code}" if obs.exit_code is not None else "exited")
