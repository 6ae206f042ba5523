"""The probe state machine (agent/probe_state.py), as scripts of ticks and results.

Each case is a list of steps, one a line:

    T tick: ROLES            tick(T) launches ROLES (comma-separated; "-" for none)
    T ROLE ok|fail: CHANGES  observe(ROLE, ...) at T returns CHANGES ("-" for none):
                             started | ready | unready | restart ROLE xN
    deadline: T              next_deadline() is T ("none" for None)
    state: started|starting|failed, ready|unready
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from shoal.agent.probe_state import (
    Change,
    ProbeStateError,
    ReadinessChanged,
    ReplicaProbes,
    Restart,
    Role,
    Started,
    first_ready_retry,
    validate_probe,
)
from shoal.errors import ConfigError
from shoal.model import Probe, ProbeKind


def probe(**kw: float) -> Probe:
    fields = {"period_seconds": 1.0, "timeout_seconds": 1.0, "success_threshold": 1, "failure_threshold": 3}
    fields.update(kw)
    return Probe(kind=ProbeKind.TCP, port=80, **fields)  # type: ignore[arg-type]


def render(changes: tuple[Change, ...]) -> str:
    out: list[str] = []
    for c in changes:
        if isinstance(c, Started):
            out.append("started")
        elif isinstance(c, ReadinessChanged):
            out.append("ready" if c.ready else "unready")
        elif isinstance(c, Restart):
            out.append(f"restart {c.role.value} x{c.failures}")
    return ", ".join(out) or "-"


@dataclass
class Case:
    name: str
    steps: str
    startup: Probe | None = None
    liveness: Probe | None = None
    readiness: Probe | None = None
    started_at: float = 0.0


CASES = [
    Case(
        "no probes: started at once, nothing to run",
        """
        state: started, unready
        0 tick: -
        deadline: none
        """,
    ),
    Case(
        "readiness: first run after the initial delay, then every period",
        """
        deadline: 5
        4.9 tick: -
        5 tick: readiness
        deadline: none
        5.2 readiness ok: ready
        deadline: 6
        5.5 tick: -
        6 tick: readiness
        """,
        readiness=probe(initial_delay_seconds=5, failure_threshold=1),
    ),
    Case(
        "readiness: successThreshold passes in a row to turn ready, failureThreshold to lose it",
        """
        0 tick: readiness
        0 readiness ok: -
        1 tick: readiness
        1 readiness fail: -
        2 tick: readiness
        2 readiness ok: -
        3 tick: readiness
        3 readiness ok: ready
        state: started, ready
        4 tick: readiness
        4 readiness fail: -
        5 tick: readiness
        5 readiness fail: -
        6 tick: readiness
        6 readiness ok: -
        7 tick: readiness
        7 readiness fail: -
        8 tick: readiness
        8 readiness fail: -
        9 tick: readiness
        9 readiness fail: unready
        state: started, unready
        10 tick: readiness
        10 readiness fail: -
        11 tick: readiness
        11 readiness ok: -
        12 tick: readiness
        12 readiness ok: ready
        """,
        readiness=probe(success_threshold=2, failure_threshold=3),
    ),
    Case(
        "readiness: failureThreshold 1 drops it on the first failure",
        """
        0 tick: readiness
        0 readiness ok: ready
        1 tick: readiness
        1 readiness fail: unready
        2 tick: readiness
        2 readiness ok: ready
        """,
        readiness=probe(failure_threshold=1),
    ),
    Case(
        "liveness: failureThreshold failures in a row restart; a pass resets the run",
        """
        1 tick: liveness
        1 liveness fail: -
        2 tick: liveness
        2 liveness fail: -
        3 tick: liveness
        3 liveness ok: -
        4 tick: liveness
        4 liveness fail: -
        5 tick: liveness
        5 liveness fail: -
        6 tick: liveness
        6 liveness fail: restart liveness x3
        state: failed, unready
        7 tick: -
        deadline: none
        """,
        liveness=probe(failure_threshold=3),
    ),
    Case(
        "liveness first runs a period after its initial delay; its restart takes readiness with it",
        """
        0 tick: readiness
        0.1 readiness ok: ready
        deadline: 1
        1 tick: liveness, readiness
        1.1 readiness ok: -
        1.2 liveness fail: restart liveness x1
        state: failed, unready
        2 tick: -
        """,
        liveness=probe(failure_threshold=1),
        readiness=probe(),
    ),
    Case(
        "a result that arrives after the restart was asked for changes nothing",
        """
        1 tick: liveness, readiness
        1.2 liveness fail: restart liveness x1
        1.3 readiness ok: -
        state: failed, unready
        """,
        liveness=probe(failure_threshold=1),
        readiness=probe(),
    ),
    Case(
        "startup gates liveness and readiness, which then run at once",
        """
        state: starting, unready
        0 tick: startup
        deadline: none
        0.1 startup fail: -
        1 tick: startup
        1.1 startup fail: -
        2 tick: startup
        2.1 startup ok: started
        state: started, unready
        2.1 tick: liveness, readiness
        2.2 readiness ok: ready
        2.2 liveness ok: -
        3.1 tick: liveness, readiness
        """,
        startup=probe(failure_threshold=3),
        liveness=probe(),
        readiness=probe(),
    ),
    Case(
        "startup never runs again once passed",
        """
        0 tick: startup
        0 startup ok: started
        deadline: 1
        1 tick: liveness
        1 liveness ok: -
        2 tick: liveness
        5 tick: -
        """,
        startup=probe(),
        liveness=probe(),
    ),
    Case(
        "startup failing failureThreshold times restarts, and liveness never ran",
        """
        0 tick: startup
        0 startup fail: -
        1 tick: startup
        1 startup fail: restart startup x2
        state: failed, unready
        2 tick: -
        """,
        startup=probe(failure_threshold=2),
        liveness=probe(),
    ),
    Case(
        "initial delays count from the replica's start, not from startup passing",
        """
        100 tick: startup
        100.5 startup ok: started
        deadline: 111
        100.5 tick: -
        111 tick: liveness
        """,
        startup=probe(),
        liveness=probe(initial_delay_seconds=10),
        started_at=100.0,
    ),
    Case(
        "one probe of a kind in flight: a slow one delays the next, which goes at once",
        """
        1 tick: liveness
        2 tick: -
        3 tick: -
        deadline: none
        3.5 liveness ok: -
        deadline: 2
        3.5 tick: liveness
        deadline: none
        """,
        liveness=probe(period_seconds=1, timeout_seconds=5),
    ),
    Case(
        "never ready yet: failed readiness probes are retried sooner, doubling up to the period",
        """
        0 tick: readiness
        0 readiness fail: -
        deadline: 0.05
        0.05 tick: readiness
        0.05 readiness fail: -
        deadline: 0.15
        0.16 tick: readiness
        0.16 readiness fail: -
        deadline: 0.36
        0.4 tick: readiness
        0.4 readiness ok: -
        deadline: 1.4
        1.4 tick: readiness
        1.4 readiness ok: ready
        deadline: 2.4
        2.4 tick: readiness
        2.4 readiness fail: -
        deadline: 3.4
        """,
        readiness=probe(success_threshold=2, period_seconds=1),
    ),
    Case(
        "an adopted replica (started long ago) is probed at once",
        """
        1000 tick: readiness
        """,
        readiness=probe(initial_delay_seconds=30),
        started_at=0.0,
    ),
]


def run_script(case: Case) -> None:
    machine = ReplicaProbes(
        started_at=case.started_at, startup=case.startup, liveness=case.liveness, readiness=case.readiness
    )
    for lineno, raw in enumerate(case.steps.strip().splitlines(), 1):
        line = raw.strip()
        where = f"{case.name}, step {lineno}: {line!r}"
        head, _, expected = line.partition(":")
        expected = expected.strip()
        words = head.split()
        if words[0] == "deadline":
            got = machine.next_deadline()
            want = None if expected == "none" else float(expected)
            assert got == (want if want is None else pytest.approx(want)), f"{where}: got {got}"
        elif words[0] == "state":
            phase = "failed" if machine.failed else "started" if machine.started else "starting"
            got_state = f"{phase}, {'ready' if machine.ready else 'unready'}"
            assert got_state == expected, f"{where}: got {got_state}"
        elif words[1] == "tick":
            roles = machine.tick(float(words[0]))
            assert (", ".join(r.value for r in roles) or "-") == expected, f"{where}: got {roles}"
        else:
            now, role, result = float(words[0]), Role(words[1]), words[2]
            changes = machine.observe(role, result == "ok", now, f"{role.value} said {result}")
            assert render(changes) == expected, f"{where}: got {render(changes)}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_script(case: Case) -> None:
    run_script(case)


def test_restart_carries_the_last_message_and_count() -> None:
    m = ReplicaProbes(started_at=0.0, liveness=probe(failure_threshold=2))
    assert m.tick(1.0) == (Role.LIVENESS,)
    m.observe(Role.LIVENESS, False, 1.1, "status 500")
    m.tick(2.0)
    assert m.observe(Role.LIVENESS, False, 2.1, "status 503") == (
        Restart(role=Role.LIVENESS, failures=2, message="status 503"),
    )
    assert Role.LIVENESS.label == "Liveness"


def test_readiness_change_carries_the_message() -> None:
    m = ReplicaProbes(started_at=0.0, readiness=probe(failure_threshold=1))
    m.tick(0.0)
    assert m.observe(Role.READINESS, True, 0.0, "status 200") == (ReadinessChanged(ready=True, message="status 200"),)


def test_a_result_for_a_probe_not_in_flight_is_a_bug() -> None:
    m = ReplicaProbes(started_at=0.0, readiness=probe())
    with pytest.raises(ProbeStateError):
        m.observe(Role.READINESS, True, 0.0)
    with pytest.raises(ProbeStateError):
        m.observe(Role.LIVENESS, True, 0.0)  # not configured at all
    m.tick(0.0)
    m.observe(Role.READINESS, True, 0.0)
    with pytest.raises(ProbeStateError):
        m.observe(Role.READINESS, True, 0.0)  # the same result twice


@pytest.mark.parametrize(
    ("failures", "period", "delay"),
    [(1, 10.0, 0.05), (2, 10.0, 0.1), (3, 10.0, 0.2), (8, 10.0, 6.4), (9, 10.0, 10.0), (40, 10.0, 10.0), (3, 0.1, 0.1)],
)
def test_first_ready_retry(failures: int, period: float, delay: float) -> None:
    assert first_ready_retry(failures, period) == pytest.approx(delay)


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"period_seconds": 0}, "periodSeconds"),
        ({"timeout_seconds": -1}, "timeoutSeconds"),
        ({"initial_delay_seconds": -1}, "initialDelaySeconds"),
        ({"success_threshold": 0}, "thresholds"),
        ({"failure_threshold": 0}, "thresholds"),
    ],
)
def test_unusable_timings_are_refused(fields: dict[str, float], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        validate_probe(probe(**fields))
    with pytest.raises(ConfigError):
        ReplicaProbes(started_at=0.0, readiness=probe(**fields))


def test_phases_only_move_forward() -> None:
    from shoal.agent.probe_state import _TRANSITIONS, Phase

    assert set(_TRANSITIONS) == set(Phase)
    for phase, targets in _TRANSITIONS.items():
        assert all(t > phase for t in targets), f"{phase.name} may only move forward"
    assert _TRANSITIONS[Phase.FAILED] == frozenset()
    m = ReplicaProbes(started_at=0.0, liveness=probe(failure_threshold=1))
    m.tick(1.0)
    m.observe(Role.LIVENESS, False, 1.0)
    assert m.failed
    with pytest.raises(ProbeStateError):
        m._become(Phase.STARTED)
