"""Unit tests of the reachability fast path in the SWIM core (`agent/swim/reach.py`).

A direct ping that times out makes the core ask for a TCP check of the target's host;
what the host answers is fed back with `Swim.reachability`: refused (the agent is gone)
suspects at once with the short refused timeout, accepted (the host is up, the agent
slow or stopped) excuses the missed probe, no answer is plain SWIM.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from shoal.agent.swim.config import Config
from shoal.agent.swim.member import State
from shoal.agent.swim.messages import Ack, Alive, Dead, Ping, PingReq, Suspect
from shoal.agent.swim.node import EventKind, Swim
from shoal.agent.swim.reach import VERDICTS, Reach, ReachCheck, Verdict
from shoal.agent.swim.suspicion import Suspicion
from shoal.errors import ConfigError
from tests.test_swim_node import CFG, addr, make, of_type, probe_once, sent


def timed_out(s: Swim) -> tuple[str, int, ReachCheck]:
    """Probe once and let the direct ping time out; return (target, seq, the check asked for)."""
    target, seq = probe_once(s)
    s.tick(s._now + CFG.probe_timeout)
    (check,) = s.ready().checks
    return target, seq, check


def end_probe(s: Swim) -> tuple[list[tuple[EventKind, str]], str | None]:
    """Run to the end of the probe in flight: the events it produced, and the target of
    the next probe (started in the same tick), if any."""
    p = s._probe
    assert p is not None
    s.tick(p.end_at)
    r = s.ready()
    pings = [m.target for _, m in of_type(r, Ping) if isinstance(m, Ping)]
    return [(e.kind, e.member.name) for e in r.events], (pings[0] if pings else None)


def kinds(s: Swim) -> list[tuple[EventKind, str]]:
    return [(e.kind, e.member.name) for e in s.ready().events]


@pytest.mark.parametrize("outcome", list(Reach))
def test_every_outcome_has_a_verdict(outcome: Reach) -> None:
    assert isinstance(VERDICTS[outcome], Verdict)


def test_a_direct_timeout_asks_for_a_check_of_the_targets_life_answered_within_the_probe() -> None:
    s = make(peers=4)
    target, seq = probe_once(s)
    start = s._now
    s.tick(start + CFG.probe_timeout / 2)
    assert not s.ready().checks
    s.tick(start + CFG.probe_timeout)
    (check,) = s.ready().checks
    assert check == ReachCheck(
        seq=seq, name=target, incarnation=0, address=addr(target),
        timeout=pytest.approx(CFG.probe_interval - CFG.probe_timeout),  # type: ignore[arg-type]
    )


def test_checks_can_be_turned_off() -> None:
    cfg = dataclasses.replace(CFG, reachability_checks=False)
    s = Swim(cfg, "n0", addr("n0"), {}, random.Random(1), 0.0)
    for i in range(1, 5):
        s.step(addr(f"n{i}"), Alive(name=f"n{i}", address=addr(f"n{i}"), incarnation=0), 0.0)
    s.ready()
    probe_once(s)
    s.tick(s._now + CFG.probe_timeout)
    r = s.ready()
    assert not r.checks
    assert len(of_type(r, PingReq)) == CFG.indirect_checks  # the indirect probe still goes out


def test_refused_suspects_at_once_and_declares_dead_after_the_refused_timeout() -> None:
    s = make(peers=4)
    target, _, check = timed_out(s)
    at = s._now + 0.001
    s.reachability(check, Reach.REFUSED, at)
    r = s.ready()
    assert [(e.kind, e.member.name) for e in r.events] == [(EventKind.SUSPECT, target)]
    # Sent straight to the suspect (were it running after all, it refutes at once) ...
    assert (addr(target), Suspect(name=target, incarnation=0, accuser="n0")) in sent(r)
    assert s.next_deadline() <= at + CFG.refused_suspicion_timeout
    # ... and gossiped within a round: members that heard it take the death at once.
    s.tick(at + CFG.gossip_interval)
    told = {d for d, m in sent(s.ready()) if isinstance(m, Suspect) and m.name == target}
    assert len(told - {addr(target)}) >= 2
    s.tick(at + CFG.refused_suspicion_timeout - 0.01)
    assert s.member(target).state is State.SUSPECT  # type: ignore[union-attr]
    s.tick(at + CFG.refused_suspicion_timeout)
    r = s.ready()
    assert (EventKind.DEAD, target) in [(e.kind, e.member.name) for e in r.events]
    assert any(isinstance(m, Dead) and m.name == target for _, m in sent(r))


def test_refused_shortens_a_suspicion_already_running() -> None:
    s = make(peers=4)
    target, _, check = timed_out(s)
    s.step(addr("n9"), Suspect(name=target, incarnation=0, accuser="n4" if target != "n4" else "n3"), s._now)
    assert s.member(target).state is State.SUSPECT  # type: ignore[union-attr]
    assert s._suspicions[target].deadline() > s._now + 1.0  # one accuser: the long timer
    s.reachability(check, Reach.REFUSED, s._now)
    assert s._suspicions[target].deadline() == pytest.approx(s._now + CFG.refused_suspicion_timeout)


def test_a_refusal_about_an_earlier_life_changes_nothing() -> None:
    # The agent was restarted and has refuted at a higher incarnation (or moved) before
    # the refusal about its previous life came back.
    for moved in (False, True):
        s = make(peers=4)
        target, _, check = timed_out(s)
        address = ("10.9.9.9", 7421) if moved else addr(target)
        s.step(address, Alive(name=target, address=address, incarnation=1), s._now)
        s.ready()
        s.reachability(check, Reach.REFUSED, s._now)
        assert s.member(target).state is State.ALIVE, moved  # type: ignore[union-attr]
        assert target not in s._suspicions


def test_a_refusal_about_a_member_already_dead_or_unknown_changes_nothing() -> None:
    s = make(peers=4)
    target, _, check = timed_out(s)
    s.step(addr("n9"), Dead(name=target, incarnation=0, accuser=target), s._now)  # it left
    s.ready()
    s.reachability(check, Reach.REFUSED, s._now)
    s.reachability(dataclasses.replace(check, name="stranger"), Reach.REFUSED, s._now)
    assert s.member(target).state is State.LEFT  # type: ignore[union-attr]
    assert not s.ready().events


def test_a_running_member_refused_by_mistake_refutes_in_time() -> None:
    # A firewall that rejects TCP on the gossip port while a ping is lost: the suspicion
    # reaches the member directly and its refutation comes back long before the timer.
    a = make("n0", peers=4)
    target, _, check = timed_out(a)
    b = make(target)
    for i in range(5):
        if f"n{i}" != target:
            b.step(addr(f"n{i}"), Alive(name=f"n{i}", address=addr(f"n{i}"), incarnation=0), 0.0)
    b.ready()
    t = a._now + 0.001
    a.reachability(check, Reach.REFUSED, t)
    for p in a.ready().packets:
        if p.dest == addr(target):
            for m in p.messages:
                b.step(addr("n0"), m, t + 0.001)
    assert b.local.incarnation == 1
    b.tick(t + CFG.gossip_interval)  # the refutation goes out with the next gossip round
    for p in b.ready().packets:
        if p.dest == addr("n0"):
            for m in p.messages:
                a.step(addr(target), m, t + CFG.gossip_interval + 0.001)
    assert a.member(target).state is State.ALIVE  # type: ignore[union-attr]
    a.tick(t + 2 * CFG.refused_suspicion_timeout)
    assert (EventKind.DEAD, target) not in kinds(a)


def test_a_member_that_heard_the_suspicion_takes_the_death_at_once() -> None:
    b = make("n1", peers=0)
    for name in ("n0", "n2"):
        b.step(addr(name), Alive(name=name, address=addr(name), incarnation=0), 0.0)
    b.ready()
    b.step(addr("n0"), Suspect(name="n2", incarnation=0, accuser="n0"), 1.0)
    b.step(addr("n0"), Dead(name="n2", incarnation=0, accuser="n0"), 1.0 + CFG.refused_suspicion_timeout)
    assert kinds(b) == [(EventKind.SUSPECT, "n2"), (EventKind.DEAD, "n2")]


def test_accepted_excuses_the_missed_probe_and_probes_it_again() -> None:
    s = make(peers=4)
    target, _, check = timed_out(s)
    s.reachability(check, Reach.ACCEPTED, s._now + 0.001)
    events, again = end_probe(s)
    assert events == []
    assert s.member(target).state is State.ALIVE  # type: ignore[union-attr]
    # The excused member is probed again at once, like a suspect, until it answers.
    assert again == target
    assert s._probe is not None
    s.step(addr(target), Ack(seq=s._probe.seq), s._now + 0.001)
    assert target not in s._excused


def test_accepted_excuses_only_until_the_patience_runs_out() -> None:
    s = make(peers=4)
    target, _, check = timed_out(s)
    s.reachability(check, Reach.ACCEPTED, s._now)
    events, nxt = end_probe(s)
    assert events == []
    first = s._excused[target]
    suspected_at = None
    while suspected_at is None:
        assert nxt == target and s._probe is not None  # probed every interval while excused
        s.tick(s._probe.timeout_at)
        for c in s.ready().checks:
            s.reachability(c, Reach.ACCEPTED, s._now)
        events, nxt = end_probe(s)
        if (EventKind.SUSPECT, target) in events:
            suspected_at = s._now
    # (No helper nacks here, so this member's own health stretches its probe interval.)
    longest = CFG.probe_interval * CFG.awareness_max_multiplier
    assert CFG.host_up_patience <= suspected_at - first <= CFG.host_up_patience + longest


def test_a_ping_from_the_excused_member_ends_the_excuse() -> None:
    s = make(peers=4)
    target, _, check = timed_out(s)
    s.reachability(check, Reach.ACCEPTED, s._now)
    end_probe(s)
    assert target in s._excused
    s.step(addr(target), Ping(seq=99, target="n0", source=target), s._now)
    assert target not in s._excused


def test_accepted_for_another_probe_excuses_nothing() -> None:
    s = make(peers=4)
    target, _, check = timed_out(s)
    s.reachability(dataclasses.replace(check, seq=check.seq + 100), Reach.ACCEPTED, s._now)
    assert end_probe(s)[0] == [(EventKind.SUSPECT, target)]


def test_no_answer_is_plain_swim() -> None:
    s = make(peers=4)
    target, _, check = timed_out(s)
    s.reachability(check, Reach.NO_ANSWER, s._now)
    assert end_probe(s)[0] == [(EventKind.SUSPECT, target)]
    low = CFG.suspicion_mult * CFG.probe_interval
    assert s._suspicions[target].deadline() >= s._now + low


def test_an_excused_probe_does_not_confirm_someone_elses_suspicion() -> None:
    s = make(peers=4)
    s.step(addr("n2"), Suspect(name="n3", incarnation=0, accuser="n2"), 0.0)
    s.ready()
    target, _, check = timed_out(s)  # a suspicion heard is probed first
    assert target == "n3"
    s.reachability(check, Reach.ACCEPTED, s._now)
    end_probe(s)
    assert s._suspicions["n3"].confirmations == 0


@pytest.mark.parametrize(
    ("cap", "moved", "deadline"),
    [
        (0.5, True, 0.5),  # earlier than the Lifeguard timer: taken
        (20.0, False, 9.0),  # later: the timer stays (a cap never delays a death)
    ],
)
def test_suspicion_limit_only_moves_the_deadline_earlier(cap: float, moved: bool, deadline: float) -> None:
    s = Suspicion(accuser="a", k=3, min_timeout=1.5, max_timeout=9.0, start=0.0)
    assert s.limit(cap) is moved
    assert s.deadline() == pytest.approx(deadline)
    s.shift(1.0)  # this agent was stopped for a second: its own deadlines move too
    assert s.deadline() == pytest.approx(deadline + 1.0)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("refused_suspicion_timeout", 0.0, "refused_suspicion_timeout must be greater than 0"),
        ("host_up_patience", -1.0, "host_up_patience must not be negative"),
    ],
)
def test_config_rejects_bad_reachability_settings(field: str, value: float, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        dataclasses.replace(Config.lan(), **{field: value}).validate()  # type: ignore[arg-type]
