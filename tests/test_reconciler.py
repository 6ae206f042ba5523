"""The agent's reconciler: the pure `plan()` and the `Reconciler` on the fake runtime."""

from __future__ import annotations

import pytest

from shoal.agent.reconciler import (
    Action,
    ActionKind,
    BackoffConfig,
    History,
    Reconciler,
    backoff_delay,
    plan,
)
from shoal.agent.runtime.base import Observed
from shoal.agent.runtime.fake import FakeRuntime
from shoal.errors import ImageNotFound, RuntimeDriverError
from shoal.model import Driver, RunSpec

CFG = BackoffConfig(base=0.2, cap=60.0, reset=30.0)
T0 = 5000.0


def spec(rid: str, driver: Driver = Driver.DOCKER) -> RunSpec:
    return RunSpec(replica_id=rid, deployment="web", generation=1, driver=driver, image="img:1", host_port=20000)


def running(rid: str, handle: str = "h1", started_at: float = T0, driver: Driver = Driver.DOCKER) -> Observed:
    return Observed(replica_id=rid, deployment="web", generation=1, driver=driver, handle=handle,
                    running=True, started_at=started_at)


def exited(rid: str, handle: str = "h1", code: int = 1, started_at: float = T0) -> Observed:
    return Observed(replica_id=rid, deployment="web", generation=1, driver=Driver.DOCKER, handle=handle,
                    running=False, exit_code=code, started_at=started_at)


def kinds(actions: list[Action]) -> list[tuple[str, str]]:
    return [(a.kind.value, a.replica_id) for a in actions]


# -- backoff_delay ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("failures", "expected"),
    [(-1, 0.0), (0, 0.0), (1, 0.2), (2, 0.4), (3, 0.8), (4, 1.6), (9, 51.2), (10, 60.0), (50, 60.0)],
)
def test_backoff_delay(failures: int, expected: float) -> None:
    assert backoff_delay(failures, CFG) == pytest.approx(expected)


# -- plan ---------------------------------------------------------------------------


def test_nothing_is_stopped_before_the_first_desired_set() -> None:
    observed = {"a": running("a"), "b": exited("b", "h2")}
    history: dict[str, History] = {}
    assert plan(None, observed, history, T0, CFG) == []
    assert history == {}


def test_running_replicas_are_adopted_not_restarted() -> None:
    observed = {"a": running("a", started_at=T0 - 5)}
    assert plan({"a": spec("a")}, observed, {}, T0, CFG) == []


@pytest.mark.parametrize(
    ("desired", "observed", "expected"),
    [
        (["a"], [], [("start", "a")]),
        (["a", "b"], ["a"], [("start", "b")]),
        (["a"], ["a", "b"], [("stop", "b")]),
        ([], ["a", "b"], [("stop", "a"), ("stop", "b")]),
        (["b"], ["a"], [("stop", "a"), ("start", "b")]),  # stops come first
        ([], [], []),
    ],
)
def test_start_missing_and_stop_unassigned(desired: list[str], observed: list[str], expected: list[tuple[str, str]]) -> None:
    actions = plan({r: spec(r) for r in desired}, {r: running(r) for r in observed}, {}, T0, CFG)
    assert kinds(actions) == expected
    for a in actions:
        assert (a.spec is not None) == (a.kind is not ActionKind.STOP)


def test_a_replica_on_another_driver_is_replaced() -> None:
    observed = {"a": running("a", driver=Driver.PROCESS)}
    actions = plan({"a": spec("a", Driver.DOCKER)}, observed, {}, T0, CFG)
    assert [(a.kind, a.driver) for a in actions] == [(ActionKind.STOP, Driver.PROCESS), (ActionKind.START, Driver.DOCKER)]


def test_history_of_replicas_no_longer_desired_is_dropped() -> None:
    history = {"gone": History(failures=3, restarts=3)}
    plan({"a": spec("a")}, {}, history, T0, CFG)
    assert set(history) == {"a"}


def test_crash_restarts_with_exponential_backoff() -> None:
    desired = {"a": spec("a")}
    history: dict[str, History] = {}
    now = T0
    for n in range(1, 6):
        observed = {"a": exited("a", handle=f"h{n}")}
        delay = backoff_delay(n, CFG)
        # Seen: counted once, however often it is looked at before the deadline.
        for t in (now, now + delay / 2, now + delay * 0.99):
            assert plan(desired, observed, history, t, CFG) == []
            assert history["a"].failures == n
            assert history["a"].message.startswith("back-off")
        actions = plan(desired, observed, history, now + delay, CFG)
        assert kinds(actions) == [("restart", "a")]
        assert history["a"].restarts == n
        now += delay + 1.0  # it ran for a second, then crashed again


def test_backoff_resets_after_running_long_enough() -> None:
    desired = {"a": spec("a")}
    history = {"a": History(failures=4, restarts=4)}
    # Running, but not for `reset` seconds yet: the count stays.
    assert plan(desired, {"a": running("a", started_at=T0)}, history, T0 + CFG.reset - 0.1, CFG) == []
    assert history["a"].failures == 4
    assert plan(desired, {"a": running("a", started_at=T0)}, history, T0 + CFG.reset, CFG) == []
    assert history["a"].failures == 0
    assert history["a"].restarts == 4  # the total is kept for reporting
    # The next crash starts over at the base delay.
    now = T0 + 100
    assert plan(desired, {"a": exited("a", "h9")}, history, now, CFG) == []
    assert history["a"].next_start == pytest.approx(now + CFG.base)


def test_a_replica_removed_behind_our_back_counts_as_a_crash() -> None:
    desired = {"a": spec("a")}
    history: dict[str, History] = {}
    assert kinds(plan(desired, {}, history, T0, CFG)) == [("start", "a")]
    assert kinds(plan(desired, {"a": exited("a", "h1")}, history, T0 + 1, CFG)) == []
    assert kinds(plan(desired, {"a": exited("a", "h1")}, history, T0 + 1.2, CFG)) == [("restart", "a")]
    # Now it vanishes entirely: a crash, with the next back-off step.
    assert plan(desired, {}, history, T0 + 2, CFG) == []
    assert history["a"].failures == 2
    assert kinds(plan(desired, {}, history, T0 + 2 + backoff_delay(2, CFG), CFG)) == [("restart", "a")]


# -- Reconciler on the fake runtime ---------------------------------------------------


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(clock: Clock) -> tuple[Reconciler, FakeRuntime]:
    runtime = FakeRuntime("n1", clock=clock)
    return Reconciler({Driver.DOCKER: runtime}, config=CFG, clock=clock), runtime


async def test_reconciler_adopts_what_runs_after_an_agent_restart() -> None:
    clock = Clock()
    rec, rt = make(clock)
    rt.adopt(spec("a"))
    rt.adopt(spec("stray"))
    assert await rec.reconcile() == []  # no desired set yet
    rec.set_desired({"a": spec("a")})
    assert kinds(await rec.reconcile()) == [("stop", "stray")]
    assert rt.calls_to("start") == []
    assert rt.running_ids() == {"a"}
    (view,) = rec.views({"a": True})
    assert (view.state, view.ready, view.restarts) == ("running", True, 0)


async def test_reconciler_restarts_a_crash_after_backoff_and_counts_it() -> None:
    clock = Clock()
    rec, rt = make(clock)
    rec.set_desired({"a": spec("a")})
    assert kinds(await rec.reconcile()) == [("start", "a")]
    first_handle = rt.replicas["a"].observed.handle

    rt.crash("a", exit_code=137)
    assert await rec.reconcile() == []  # back-off
    (view,) = rec.views({"a": True})
    assert (view.state, view.ready, view.exit_code, view.handle) == ("exited", False, 137, first_handle)
    assert view.message.startswith("back-off")

    clock.now += backoff_delay(1, CFG)
    assert kinds(await rec.reconcile()) == [("restart", "a")]
    (view,) = rec.views({})
    assert (view.state, view.restarts) == ("running", 1)
    assert view.handle != first_handle
    assert view.message == ""

    rt.crash("a")
    assert await rec.reconcile() == []
    clock.now += backoff_delay(2, CFG) - 0.01
    assert await rec.reconcile() == []
    clock.now += 0.01
    assert kinds(await rec.reconcile()) == [("restart", "a")]
    assert rec.views({})[0].restarts == 2
    assert len(rt.calls_to("start")) == 3


async def test_a_failed_start_counts_as_one_failure_and_backs_off() -> None:
    clock = Clock()
    rec, rt = make(clock)
    rt.fail_next_start(ImageNotFound("img:1"), "a")
    rec.set_desired({"a": spec("a")})
    assert kinds(await rec.reconcile()) == [("start", "a")]
    (view,) = rec.views({})
    assert view.state == "failed"
    assert "img:1" in view.message
    assert rec.history["a"].failures == 1

    # No retry until the first back-off step has passed, and only one failure counted.
    assert await rec.reconcile() == []
    assert rec.history["a"].failures == 1
    clock.now += backoff_delay(1, CFG) - 0.01
    assert await rec.reconcile() == []
    clock.now += 0.01
    assert kinds(await rec.reconcile()) == [("restart", "a")]
    assert rt.running_ids() == {"a"}
    assert rec.views({})[0].state == "running"
    assert rec.views({})[0].message == ""


async def test_repeated_start_failures_back_off_one_step_each() -> None:
    clock = Clock()
    rec, rt = make(clock)
    rec.set_desired({"a": spec("a")})
    await rec.reconcile()
    rt.crash("a")
    clock.now += 1.0
    await rec.reconcile()  # crash seen: failure 1
    for n in range(2, 5):
        rt.fail_next_start(RuntimeDriverError("boom"), "a")
        clock.now += backoff_delay(n - 1, CFG)
        assert kinds(await rec.reconcile()) == [("restart", "a")]  # attempt fails: failure n
        assert await rec.reconcile() == []
        assert rec.history["a"].failures == n
        assert rec.history["a"].next_start == pytest.approx(clock.now + backoff_delay(n, CFG))
    clock.now += backoff_delay(4, CFG)
    assert kinds(await rec.reconcile()) == [("restart", "a")]
    assert rt.running_ids() == {"a"}


async def test_reconciler_without_the_runtime_reports_why() -> None:
    clock = Clock()
    rec, _ = make(clock)
    rec.set_desired({"p": spec("p", Driver.PROCESS)})
    await rec.reconcile()
    (view,) = rec.views({})
    assert view.state == "failed"
    assert "no process runtime" in view.message
