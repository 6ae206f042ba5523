"""The probe state machine of one replica incarnation: when to probe, and what results mean.

Sans-I/O: it runs no probe and reads no clock. The agent shell (`shoal.agent.probes`
for the executors, `shoal.agent.agent` for the loop) launches what `tick(now)` says,
feeds each result back with `observe(...)`, and carries out the changes it gets back,
in the order given.

Rules (Kubernetes semantics):
- Three probes, each optional: startup, liveness, readiness. Each counts *consecutive*
  passes and failures; a pass resets the failure run and a failure the pass run.
- A probe first runs `initial_delay_seconds` after the replica started, then every
  `period_seconds` after it was last launched (a result that takes longer than a
  period makes the next launch wait for it: one probe of a kind in flight at a time).
- Liveness waits one period more before its first run: a replica is never judged dead
  before it had a period to come up. (Kubernetes' probe worker starts with the pod, so
  a container's first liveness probe falls anywhere in its first period; shoal takes
  the end of that range, so a liveness probe with `failureThreshold: 1` cannot kill a
  replica that is a few milliseconds from listening.)
- Until the replica is ready for the first time, a failed readiness probe is retried
  sooner than its period (`first_ready_retry`: 50 ms doubling up to the period), so a
  replica that listens after 200 ms is ready after about 200 ms, not a period later
  (Kubernetes' start-up latency, 10 s with the default period). Until then failures
  change nothing (the replica is not ready yet), and passes keep the period, so
  `success_threshold` still means that many periods.
- Startup gates the others: until the startup probe passes, liveness and readiness do
  not run. Its first pass emits `Started` and it never runs again; `failure_threshold`
  consecutive failures emit `Restart`. With no startup probe the replica is started
  from the beginning. Once started, liveness and readiness run at once if their initial
  delay has passed (Kubernetes waits for their next tick; sooner is better for
  readiness).
- Readiness starts false. `success_threshold` consecutive passes make it true,
  `failure_threshold` consecutive failures make it false again; each flip emits
  `ReadinessChanged`. With no readiness probe the machine says nothing about readiness
  (the shell has its own default check).
- Liveness failing `failure_threshold` times in a row emits `Restart`. A restart
  implies "not ready" (`ready` turns false without a `ReadinessChanged`): the shell
  takes the replica out of its tables before it stops it, whatever decided readiness.
- After `Restart` the machine is finished: `tick` launches nothing and late results of
  probes already in flight are ignored. A new incarnation gets a new machine.
- A result for a probe that is not in flight is a bug in the shell: `ProbeStateError`.

How it works: one `_ProbeTrack` per configured probe holds its run counters, when it is
next due and whether it is in flight. `tick` launches every due probe the phase allows;
`observe` updates the counters and applies the thresholds in one function per role.
The phase moves only along `_TRANSITIONS` (STARTING → STARTED → FAILED, or STARTING →
FAILED); anything else raises.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from shoal.errors import ConfigError, ShoalError
from shoal.model import Probe

__all__ = [
    "Role",
    "Phase",
    "Started",
    "ReadinessChanged",
    "Restart",
    "Change",
    "ProbeStateError",
    "ReplicaProbes",
    "validate_probe",
    "first_ready_retry",
]

# The first retry of a failed readiness probe before the replica was ever ready: about
# the time a small server takes to listen, so a fast replica is ready almost at once.
FIRST_READY_RETRY_BASE = 0.05


class Role(enum.Enum):
    """What a probe decides."""

    STARTUP = "startup"
    LIVENESS = "liveness"
    READINESS = "readiness"

    @property
    def label(self) -> str:
        """As Kubernetes' events name it: "Liveness probe failed: ..."."""
        return self.value.capitalize()


class Phase(enum.IntEnum):
    """Where the incarnation is; ordered, with gaps, like the task lifecycle."""

    STARTING = 10  # the startup probe has not passed yet
    STARTED = 20  # liveness and readiness run
    FAILED = 30  # a restart was asked for; nothing runs any more


_TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.STARTING: frozenset({Phase.STARTED, Phase.FAILED}),
    Phase.STARTED: frozenset({Phase.FAILED}),
    Phase.FAILED: frozenset(),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Started:
    """The startup probe passed: liveness and readiness run from now on."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadinessChanged:
    """The readiness probe's verdict flipped. `message`: the last result's reason."""

    ready: bool
    message: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Restart:
    """`role` failed `failures` times in a row: the replica must be restarted (and is
    not ready from now on). `message`: the last failure's reason."""

    role: Role
    failures: int
    message: str = ""


Change = Started | ReadinessChanged | Restart


class ProbeStateError(ShoalError):
    """A bug in the shell: a result for a probe that was not launched."""


def validate_probe(p: Probe) -> None:
    """Raise ConfigError for timings the machine cannot work with (manifests never
    produce them; a hand-built RunSpec might)."""
    if p.period_seconds <= 0:
        raise ConfigError(f"probe periodSeconds must be > 0, got {p.period_seconds:g}")
    if p.timeout_seconds <= 0:
        raise ConfigError(f"probe timeoutSeconds must be > 0, got {p.timeout_seconds:g}")
    if p.initial_delay_seconds < 0:
        raise ConfigError(f"probe initialDelaySeconds must be ≥ 0, got {p.initial_delay_seconds:g}")
    if p.success_threshold < 1 or p.failure_threshold < 1:
        raise ConfigError(
            f"probe thresholds must be ≥ 1, got successThreshold {p.success_threshold} "
            f"and failureThreshold {p.failure_threshold}"
        )


def first_ready_retry(failures: int, period: float, base: float = FIRST_READY_RETRY_BASE) -> float:
    """Seconds until the next readiness probe after `failures` (≥ 1) consecutive
    failures of a replica that was never ready: base * 2^(failures-1), at most `period`."""
    return float(min(period, base * 2 ** max(0, failures - 1)))


@dataclass(slots=True)
class _ProbeTrack:
    probe: Probe
    due: float  # earliest time of the next launch
    in_flight: bool = False
    passes: int = 0  # consecutive
    failures: int = 0  # consecutive


class ReplicaProbes:
    """The probes of one replica incarnation; see the module docstring."""

    def __init__(
        self,
        *,
        started_at: float,
        startup: Probe | None = None,
        liveness: Probe | None = None,
        readiness: Probe | None = None,
    ) -> None:
        self._tracks: dict[Role, _ProbeTrack] = {}
        for role, probe in ((Role.STARTUP, startup), (Role.LIVENESS, liveness), (Role.READINESS, readiness)):
            if probe is not None:
                validate_probe(probe)
                due = started_at + probe.initial_delay_seconds
                if role is Role.LIVENESS:
                    due += probe.period_seconds
                self._tracks[role] = _ProbeTrack(probe=probe, due=due)
        self.phase = Phase.STARTING if startup is not None else Phase.STARTED
        self.ready = False
        self._was_ready = False

    @property
    def started(self) -> bool:
        """The startup probe passed (or there is none) and the replica was not failed."""
        return self.phase is Phase.STARTED

    @property
    def failed(self) -> bool:
        return self.phase is Phase.FAILED

    def probe(self, role: Role) -> Probe:
        return self._tracks[role].probe

    def _become(self, phase: Phase) -> None:
        if phase not in _TRANSITIONS[self.phase]:
            raise ProbeStateError(f"probe phase cannot go from {self.phase.name} to {phase.name}")
        self.phase = phase

    def _allowed(self, role: Role) -> bool:
        if self.phase is Phase.STARTING:
            return role is Role.STARTUP
        if self.phase is Phase.STARTED:
            return role is not Role.STARTUP
        return False

    def tick(self, now: float) -> tuple[Role, ...]:
        """The probes to launch now. Each is in flight until its result is observed."""
        launch: list[Role] = []
        for role, track in self._tracks.items():
            if self._allowed(role) and not track.in_flight and track.due <= now:
                track.in_flight = True
                track.due = now + track.probe.period_seconds
                launch.append(role)
        return tuple(launch)

    def next_deadline(self) -> float | None:
        """When `tick` will next launch something; None while nothing can be launched
        (every allowed probe in flight, or the machine finished)."""
        dues = [t.due for r, t in self._tracks.items() if self._allowed(r) and not t.in_flight]
        return min(dues) if dues else None

    def observe(self, role: Role, ok: bool, now: float, message: str = "") -> tuple[Change, ...]:
        """The result of a launched probe; returns what changed, in the order to act on."""
        track = self._tracks.get(role)
        if track is None or not track.in_flight:
            raise ProbeStateError(f"a {role.value} probe result arrived, but no {role.value} probe is in flight")
        track.in_flight = False
        if ok:
            track.passes, track.failures = track.passes + 1, 0
        else:
            track.passes, track.failures = 0, track.failures + 1
        if self.phase is Phase.FAILED:
            return ()  # launched before the restart was asked for: moot
        if self.phase is Phase.STARTING and role is not Role.STARTUP:
            raise ProbeStateError(f"a {role.value} probe ran before the startup probe passed")
        if role is Role.STARTUP:
            return self._startup(track, message)
        if role is Role.LIVENESS:
            return self._liveness(track, message)
        return self._readiness(track, now, message)

    def _startup(self, track: _ProbeTrack, message: str) -> tuple[Change, ...]:
        if track.passes >= track.probe.success_threshold:
            self._become(Phase.STARTED)
            return (Started(),)
        if track.failures >= track.probe.failure_threshold:
            return self._fail(Role.STARTUP, track, message)
        return ()

    def _liveness(self, track: _ProbeTrack, message: str) -> tuple[Change, ...]:
        if track.failures >= track.probe.failure_threshold:
            return self._fail(Role.LIVENESS, track, message)
        return ()

    def _readiness(self, track: _ProbeTrack, now: float, message: str) -> tuple[Change, ...]:
        if not self.ready and track.passes >= track.probe.success_threshold:
            self.ready = self._was_ready = True
            return (ReadinessChanged(ready=True, message=message),)
        if not self._was_ready and track.failures:
            track.due = min(track.due, now + first_ready_retry(track.failures, track.probe.period_seconds))
        if self.ready and track.failures >= track.probe.failure_threshold:
            self.ready = False
            return (ReadinessChanged(ready=False, message=message),)
        return ()

    def _fail(self, role: Role, track: _ProbeTrack, message: str) -> tuple[Change, ...]:
        self._become(Phase.FAILED)
        self.ready = False
        return (Restart(role=role, failures=track.failures, message=message),)
