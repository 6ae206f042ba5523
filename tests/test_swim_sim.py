"""SWIM scenarios in the deterministic simulator, each over many seeds.

The default run uses a few seeds per scenario to stay fast; `SHOAL_SIM_SEEDS=N` runs N
seeds per scenario, and `SHOAL_SIM_SEED=S` replays one seed. A failure names its seed in
the test id (`[seed=S]`) and in the assertion message.
"""

from __future__ import annotations

import functools
import os
import random

import pytest

from shoal.agent.swim.config import Config, silence_tolerance
from shoal.agent.swim.member import State
from shoal.agent.swim.node import EventKind, MemberEvent
from shoal.agent.swim.reach import Reach
from shoal.agent.swim.sim import DeathRecorder, FalseDeadChecker, Network, Sim, SimNode, Status
from shoal.agent.swim.suspicion import suspicion_timeout


def _seeds(default: int) -> list[int]:
    one = os.environ.get("SHOAL_SIM_SEED")
    if one is not None:
        return [int(one)]
    return list(range(int(os.environ.get("SHOAL_SIM_SEEDS", default))))


def seeds(default: int = 10) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("seed", _seeds(default), ids=lambda s: f"seed={s}")


def cluster(seed: int, n: int, *, network: Network | None = None, config: Config | None = None) -> tuple[Sim, FalseDeadChecker]:
    """`n` members joined through n0 and converged, with a false-dead checker attached."""
    sim = Sim(seed=seed, network=network, config=config)
    checker = FalseDeadChecker()
    sim.observers.append(checker)
    sim.add("n0")
    for i in range(1, n):
        sim.add(f"n{i}", join=["n0"])
    assert sim.run_until_true(lambda: not sim.disagreements(), timeout=10), f"seed={seed}: no convergence"
    return sim, checker


def replay(seed: int) -> str:
    return f"seed={seed} (replay: SHOAL_SIM_SEED={seed})"


def suspicions_of(sim: Sim, member: str) -> list[float]:
    """A list the sim fills with the time of every SUSPECT event about `member`, anywhere."""
    times: list[float] = []

    def watch(s: Sim, _node: SimNode, events: tuple[MemberEvent, ...]) -> None:
        times.extend(s.now for e in events if e.kind is EventKind.SUSPECT and e.member.name == member)

    sim.observers.append(watch)
    return times


@seeds(3)
def test_hundred_members_converge_from_one_seed_join(seed: int) -> None:
    sim = Sim(seed=seed)
    checker = FalseDeadChecker()
    sim.observers.append(checker)
    sim.add("m000")
    for i in range(1, 100):
        sim.at(i * 0.02, functools.partial(sim.add, f"m{i:03d}", join=["m000"]))
    sim.run_until(2.0)
    everyone = lambda: all(n.swim.live_count == 100 for n in sim.nodes.values())  # noqa: E731
    # Gossip alone usually converges in about a second; a member that missed a join
    # gossiped while nobody knew it yet is repaired by the next push-pull.
    assert sim.run_until_true(everyone, timeout=60, step=0.5), replay(seed)
    assert sim.disagreements() == [], replay(seed)
    assert checker.count() == 0, f"{replay(seed)}: {checker.found[:3]}"


def _detect(seed: int, fault: str, n: int = 8) -> tuple[Sim, float, float]:
    """Run `fault` ("crash": the agent is killed, its host refuses connections; "power_off":
    the host goes silent) on n3 at a random moment. Returns the sim, the time until every
    other member has declared it dead, and the time from its first suspicion to that."""
    sim, checker = cluster(seed, n)
    deaths = DeathRecorder()
    sim.observers.append(deaths)
    suspected = suspicions_of(sim, "n3")
    sim.run_for(random.Random(seed).uniform(0, 2))
    killed_at = sim.now
    getattr(sim, fault)("n3")
    others = {n.name for n in sim.running()}
    assert sim.run_until_true(lambda: set(deaths.seen_by("n3")) == others, timeout=20, step=0.05), replay(seed)
    all_dead = max(deaths.seen_by("n3").values())
    sim.run_for(5)
    for node in sim.running():
        assert sim.view(node.name)["n3"] is State.DEAD, replay(seed)
    assert checker.count() == 0, f"{replay(seed)}: {checker.found[:3]}"
    return sim, all_dead - killed_at, all_dead - min(suspected)


@seeds()
def test_silent_host_is_declared_dead_by_all_after_the_silence_tolerance(seed: int) -> None:
    sim, latency, _ = _detect(seed, "power_off")
    tolerance = silence_tolerance(sim.config, 8)
    assert tolerance <= latency < tolerance + 2.5, f"{replay(seed)}: detected by all after {latency:.2f} s"
    assert sim.stats.checks[Reach.REFUSED] == 0, replay(seed)


@seeds()
def test_crashed_agent_on_a_live_host_is_declared_dead_by_all_soon_after_the_first_refusal(seed: int) -> None:
    # Its host refuses the prober's connection: the short refused suspicion, not the
    # Lifeguard timer. Never faster than a probe timeout plus that suspicion (the time
    # a running agent behind a rejecting firewall gets to refute); the suspicion reaches
    # everyone before the death does, so they all take the death at once.
    sim, latency, suspected = _detect(seed, "crash")
    cfg = sim.config
    assert cfg.probe_timeout + cfg.refused_suspicion_timeout <= latency, f"{replay(seed)}: {latency:.2f} s"
    # Nobody waits for a Lifeguard timer: the others take the death as it reaches them,
    # and one that the gossip misses has probed the suspect (first in line once it heard
    # the suspicion) and been refused itself.
    assert suspected < suspicion_timeout(cfg.suspicion_mult, 8, cfg.probe_interval), (
        f"{replay(seed)}: dead everywhere {suspected:.2f} s after the first suspicion"
    )
    assert sim.stats.checks[Reach.REFUSED] > 0, replay(seed)


@seeds()
def test_agent_restarted_at_once_comes_back_alive_everywhere(seed: int) -> None:
    # Refusals about the old life race the new life's join; whichever wins, the new life
    # ends up alive everywhere and is never declared dead (a restart nobody noticed keeps
    # incarnation 0; one that was suspected or declared dead refutes above it).
    sim, checker = cluster(seed, 6)
    rng = random.Random(f"restart:{seed}")
    for _ in range(3):
        sim.run_for(rng.uniform(0.5, 3))
        sim.crash("n3")
        before = sim.nodes["n3"].prior_incarnation
        sim.run_for(rng.uniform(0.0, 0.8))
        sim.restart("n3", join=["n0"])
        agreed = sim.run_until_true(lambda: not sim.disagreements(), timeout=20, step=0.1)
        assert agreed, f"{replay(seed)}: {sim.disagreements()}"
        assert sim.nodes["n3"].swim.local.incarnation >= before, replay(seed)
    sim.run_for(5)
    assert not sim.disagreements(), replay(seed)
    assert checker.count() == 0, f"{replay(seed)}: {checker.found[:3]}"


@seeds()
def test_suspected_live_member_refutes(seed: int) -> None:
    sim, checker = cluster(seed, 8)
    suspected = suspicions_of(sim, "n3")
    # Everything sent to n3 is lost for a while: its probers time out and suspect it.
    for other in sim.nodes:
        if other != "n3":
            sim.block(other, "n3")
    sim.run_until_true(lambda: bool(suspected), timeout=10, step=0.05)
    assert suspected, f"{replay(seed)}: nobody suspected n3"
    sim.heal()
    sim.run_for(10)
    assert sim.nodes["n3"].swim.local.incarnation > 0, replay(seed)
    assert all(sim.view(n.name)["n3"] is State.ALIVE for n in sim.running()), replay(seed)
    assert checker.count() == 0, f"{replay(seed)}: {checker.found[:3]}"


@pytest.mark.parametrize("duration", [15.0, 50.0], ids=lambda d: f"partition={d:g}s")
@seeds(5)
def test_partition_splits_and_heals_to_one_view(seed: int, duration: float) -> None:
    sim, checker = cluster(seed, 10)
    left, right = [f"n{i}" for i in range(5)], [f"n{i}" for i in range(5, 10)]
    sim.partition(left, right)
    start = sim.now

    def split() -> bool:
        return all(
            all(sim.view(name)[x] is State.DEAD for x in b)
            for a, b in ((left, right), (right, left))
            for name in a
        )

    # Each side declares the other dead (gossip is diluted by sends into the cut, so a
    # member may have to find out by its own probes: allow a few suspicion timeouts) ...
    assert sim.run_until_true(split, timeout=40, step=0.5), f"{replay(seed)}: {sim.disagreements()}"
    sim.run_until(start + duration)
    assert all(f.cut_off for f in checker.found), replay(seed)
    sim.heal()
    # ... and after the heal, gossip to the dead (short cuts) or reconnecting push-pull
    # (cuts longer than gossip_to_the_dead_time) brings back one view.
    healed = sim.run_until_true(lambda: not sim.disagreements(), timeout=60, step=0.5)
    assert healed, f"{replay(seed)}: {sim.disagreements()}"


@seeds()
def test_no_false_dead_under_20_percent_loss_for_200_periods(seed: int) -> None:
    sim, checker = cluster(seed, 12)
    sim.set_loss(0.2)
    sim.run_for(200 * sim.config.probe_interval)
    assert checker.count() == 0, f"{replay(seed)}: {checker.found[:3]}"
    sim.set_loss(0.0)
    sim.run_for(5)
    assert sim.disagreements() == [], replay(seed)


@pytest.mark.parametrize(
    ("intervals", "loss"), [(3.0, 0.0), (3.75, 0.0), (3.75, 0.1), (3.75, 0.2)],
    ids=lambda v: f"pause={v:g}x" if v > 1 else f"loss={v:.0%}",
)
@seeds(5)
def test_paused_member_is_not_declared_dead(seed: int, intervals: float, loss: float) -> None:
    # 3 probe intervals (0.9 s), and 1.5 s (the brief's T2 pause); under loss, a lost
    # reachability check leaves only the silence tolerance to protect it.
    sim, checker = cluster(seed, 8)
    sim.set_loss(loss)
    rng = random.Random(seed)
    for _ in range(5):
        sim.run_for(rng.uniform(2, 6))
        sim.pause("n4", intervals * sim.config.probe_interval)
    sim.set_loss(0.0)
    sim.run_for(15)
    assert checker.count() == 0, f"{replay(seed)}: {checker.found[:3]}"
    assert all(sim.view(n.name)["n4"] is State.ALIVE for n in sim.running()), replay(seed)


@seeds()
def test_a_pause_longer_than_the_silence_tolerance_raises_no_suspicion_while_its_host_answers(seed: int) -> None:
    sim, checker = cluster(seed, 8)
    suspected = suspicions_of(sim, "n4")
    rng = random.Random(seed)
    cfg = sim.config
    for _ in range(3):
        # Up to host_up_patience minus the probe that notices it and the one that ends it.
        pause = rng.uniform(silence_tolerance(cfg, 8), cfg.host_up_patience - 2 * cfg.probe_interval)
        sim.pause("n4", pause)
        sim.run_for(pause + rng.uniform(2, 6))
    assert suspected == [], f"{replay(seed)}: n4 suspected at {suspected}"
    assert checker.count() == 0, f"{replay(seed)}: {checker.found[:3]}"
    assert sim.stats.checks[Reach.ACCEPTED] > 0, replay(seed)


@seeds(5)
def test_a_wedged_agent_whose_host_still_accepts_is_declared_dead_after_the_patience(seed: int) -> None:
    sim, _ = cluster(seed, 6)
    deaths = DeathRecorder()
    sim.observers.append(deaths)
    sim.run_for(random.Random(seed).uniform(0, 2))
    wedged_at = sim.now
    sim.pause("n2", 120.0)
    others = {n.name for n in sim.running()} - {"n2"}
    assert sim.run_until_true(lambda: set(deaths.seen_by("n2")) == others, timeout=30, step=0.1), replay(seed)
    latency = max(deaths.seen_by("n2").values()) - wedged_at
    cfg = sim.config
    low = cfg.host_up_patience + silence_tolerance(cfg, 6)
    assert low - cfg.probe_interval <= latency < low + 3.0, f"{replay(seed)}: dead everywhere after {latency:.2f} s"


@seeds()
def test_after_random_faults_and_a_quiet_period_all_live_members_agree(seed: int) -> None:
    rng = random.Random(f"ops:{seed}")
    net = Network(loss=0.02, duplicate=0.01, reorder=0.05)
    sim, _ = cluster(seed, 6, network=net)
    next_id = 6
    for _ in range(rng.randint(6, 12)):
        sim.run_for(rng.uniform(0.5, 6))
        running = [n.name for n in sim.nodes.values() if n.status is Status.RUNNING]
        op = rng.choice(["join", "join", "leave", "crash", "restart", "partition", "heal", "pause"])
        # n0 is never stopped: it is the seed every (re)join goes through, like the
        # well-known server addresses an operator passes to --join.
        if op == "join" or len(running) < 3:
            sim.add(f"n{next_id}", join=["n0"])
            next_id += 1
        elif op == "leave":
            sim.leave(rng.choice(running[1:]))
        elif op == "crash":
            sim.crash(rng.choice(running[1:]))
        elif op == "restart":
            gone = [n.name for n in sim.nodes.values() if n.stopped]
            if gone:
                sim.restart(rng.choice(gone), join=["n0"])
        elif op == "partition":
            members = list(sim.nodes)
            rng.shuffle(members)
            cut = rng.randint(1, len(members) - 1)
            sim.partition(members[:cut], members[cut:])
        elif op == "heal":
            sim.heal()
        else:
            sim.pause(rng.choice(running), rng.uniform(0.2, 1.2))
    sim.heal()
    sim.set_loss(0.0)
    agreed = sim.run_until_true(lambda: not sim.disagreements(), timeout=90, step=1.0)
    assert agreed, f"{replay(seed)}: {sim.disagreements()}"


def _trace(seed: int) -> list[tuple[float, str, str, str, int]]:
    sim, _ = cluster(seed, 6, network=Network(loss=0.1, reorder=0.1, duplicate=0.05))
    trace: list[tuple[float, str, str, str, int]] = []
    sim.observers.append(
        lambda s, node, events: trace.extend(
            (s.now, node.name, e.kind.value, e.member.name, e.member.incarnation) for e in events
        )
    )
    sim.crash("n2")
    sim.pause("n3", 1.0)
    sim.run_for(30)
    trace.append((sim.now, "stats", str(sim.stats.packets), str(sim.stats.dropped), sim.stats.messages))
    return trace


def test_one_seed_replays_exactly() -> None:
    assert _trace(7) == _trace(7)
    assert _trace(7) != _trace(8)


def test_false_dead_checker_sees_a_member_cut_off() -> None:
    sim, checker = cluster(0, 5)
    sim.partition(["n2"])
    sim.run_for(15)
    assert checker.count() > 0
    assert checker.count(loss_only=True) == 0
    assert all(f.member == "n2" or f.observer == "n2" for f in checker.found)
