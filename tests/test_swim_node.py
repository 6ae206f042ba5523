"""Unit tests of the SWIM core, driven message by message (no simulator)."""

from __future__ import annotations

import dataclasses
import random

import pytest

from shoal.agent.swim.config import Config
from shoal.agent.swim.member import Address, State
from shoal.agent.swim.messages import (
    Ack,
    Alive,
    Compound,
    Dead,
    MemberState,
    Message,
    Nack,
    Ping,
    PingReq,
    PushPullRequest,
    PushPullResponse,
    Suspect,
    approx_size,
)
from shoal.agent.swim.node import EventKind, Ready, Swim
from shoal.errors import ConfigError

# These tests jump the clock without ticking at every deadline; a stall threshold that
# never triggers keeps the stall protection (tested on its own) out of their way.
CFG = dataclasses.replace(Config.lan(), stall_threshold=1e9)


def addr(name: str) -> Address:
    return (f"10.0.0.{int(name[1:]) + 1}", 7421)


def make(name: str = "n0", *, peers: int = 0, now: float = 0.0, seed: int = 1) -> Swim:
    """A member that knows `peers` others (n1..nK), all alive at incarnation 0."""
    s = Swim(CFG, name, addr(name), {"role": "client"}, random.Random(seed), now)
    for i in range(1, peers + 1):
        s.step(addr(f"n{i}"), Alive(name=f"n{i}", address=addr(f"n{i}"), incarnation=0), now)
    s.ready()
    return s


def sent(ready: Ready) -> list[tuple[Address, Message]]:
    return [(p.dest, m) for p in ready.packets for m in p.messages]


def of_type(ready: Ready, kind: type) -> list[tuple[Address, Message]]:
    return [(d, m) for d, m in sent(ready) if isinstance(m, kind)]


def probe_once(s: Swim) -> tuple[str, int]:
    """Tick until a ping goes out; return (target name, seq)."""
    for _ in range(10):
        s.tick(s.next_deadline())
        pings = of_type(s.ready(), Ping)
        if pings:
            (_, ping), = pings
            assert isinstance(ping, Ping)
            return ping.target, ping.seq
    raise AssertionError("no probe was sent")


def test_ping_is_acked_only_for_our_name() -> None:
    s = make()
    s.step(addr("n1"), Ping(seq=7, target="n0"), 0.1)
    assert of_type(s.ready(), Ack) == [(addr("n1"), Ack(seq=7))]
    s.step(addr("n1"), Ping(seq=8, target="someone-else"), 0.2)
    assert of_type(s.ready(), Ack) == []


def test_new_member_joins_with_an_event_and_is_gossiped() -> None:
    s = make()
    s.step(addr("n1"), Alive(name="n1", address=addr("n1"), incarnation=0), 0.0)
    r = s.ready()
    assert [(e.kind, e.member.name) for e in r.events] == [(EventKind.JOIN, "n1")]
    assert s.live_count == 2


def test_acked_probe_lowers_health_score_and_raises_nothing() -> None:
    s = make(peers=3)
    s._awareness.apply_delta(2)
    target, seq = probe_once(s)
    s.step(addr(target), Ack(seq=seq), s._now + 0.001)
    assert s.health_score == 1
    s.tick(s._now + CFG.probe_interval - 0.01)
    assert not of_type(s.ready(), PingReq)


def test_unacked_probe_goes_indirect_then_suspects_then_kills() -> None:
    s = make(peers=4)
    target, seq = probe_once(s)
    start = s._now
    s.tick(start + CFG.probe_timeout)
    reqs = of_type(s.ready(), PingReq)
    assert len(reqs) == CFG.indirect_checks
    assert {d for d, _ in reqs}.isdisjoint({addr(target), addr("n0")})
    assert all(isinstance(m, PingReq) and m.target == target and m.seq == seq and m.nack for _, m in reqs)
    # Every helper nacks: the fault is not ours, so the health score stays.
    for d, _ in reqs:
        s.step(d, Nack(seq=seq), start + 2 * CFG.probe_timeout)
    s.tick(start + CFG.probe_interval)
    r = s.ready()
    assert [(e.kind, e.member.name) for e in r.events] == [(EventKind.SUSPECT, target)]
    assert s.health_score == 0
    assert any(isinstance(m, Suspect) and m.name == target and m.accuser == "n0" for _, m in sent(r))
    # Unconfirmed: the suspicion lasts suspicion_max; 3 confirmations bring it to the minimum.
    suspected_at = s._now
    for i, accuser in enumerate(["n1", "n2", "n3", "n4"]):
        if accuser != target:
            s.step(addr(accuser), Suspect(name=target, incarnation=0, accuser=accuser), suspected_at + 0.01 * (i + 1))
    low = CFG.suspicion_mult * CFG.probe_interval
    deadline = s.next_deadline()
    assert deadline <= suspected_at + low + 1e-9
    s.tick(suspected_at + low + 1e-6)
    r = s.ready()
    assert (EventKind.DEAD, target) in [(e.kind, e.member.name) for e in r.events]
    assert s.member(target) is not None and s.member(target).state is State.DEAD  # type: ignore[union-attr]
    assert any(isinstance(m, Dead) and m.name == target for _, m in sent(r))


def test_missing_nacks_raise_the_health_score_and_stretch_timeouts() -> None:
    s = make(peers=4)
    probe_once(s)
    start = s._now
    s.tick(start + CFG.probe_timeout)
    s.tick(start + CFG.probe_interval)
    s.ready()
    assert s.health_score == CFG.indirect_checks  # three helpers, no nack from any
    # The next probe (of the new suspect, first in line) started in the same tick.
    assert s._probe is not None and s._probe.start == s._now
    assert s._probe.timeout_at - s._now == pytest.approx(CFG.probe_timeout * (CFG.indirect_checks + 1))
    assert s._next_probe - s._now == pytest.approx(CFG.probe_interval * (CFG.indirect_checks + 1))


def test_refutes_a_suspicion_about_itself_with_a_higher_incarnation() -> None:
    s = make(peers=2)
    s.step(addr("n1"), Suspect(name="n0", incarnation=0, accuser="n1"), 0.5)
    assert s.local.incarnation == 1
    assert s.health_score == 1
    alive = [m for _, m in sent(s.ready()) if isinstance(m, Alive) and m.name == "n0"]
    assert alive and alive[0].incarnation == 1
    # A stale claim (older incarnation) is answered by re-announcing, not by a new bump.
    s.step(addr("n2"), Dead(name="n0", incarnation=0, accuser="n2"), 0.6)
    assert s.local.incarnation == 1
    assert any(isinstance(m, Alive) and m.name == "n0" for _, m in sent(s.ready()))


def test_incarnation_rules() -> None:
    s = make(peers=1)  # no time passes: no probe of ours interferes
    s.step(addr("n1"), Suspect(name="n1", incarnation=0, accuser="n9"), 1.0)
    assert s.member("n1").state is State.SUSPECT  # type: ignore[union-attr]
    s.step(addr("n1"), Alive(name="n1", address=addr("n1"), incarnation=0), 1.0)
    assert s.member("n1").state is State.SUSPECT  # type: ignore[union-attr]  # same incarnation: no
    s.step(addr("n1"), Alive(name="n1", address=addr("n1"), incarnation=1), 1.0)
    assert s.member("n1").state is State.ALIVE  # type: ignore[union-attr]
    kinds = [e.kind for e in s.ready().events]
    assert kinds == [EventKind.SUSPECT, EventKind.ALIVE]
    s.step(addr("n1"), Suspect(name="n1", incarnation=0, accuser="n9"), 1.0)  # stale
    assert s.member("n1").state is State.ALIVE  # type: ignore[union-attr]
    # A dead member comes back only with a higher incarnation, and it is a JOIN.
    s.step(addr("n1"), Suspect(name="n1", incarnation=1, accuser="n9"), 1.0)
    s.step(addr("n1"), Dead(name="n1", incarnation=1, accuser="n9"), 1.0)
    assert s.member("n1").state is State.DEAD  # type: ignore[union-attr]
    s.step(addr("n1"), Alive(name="n1", address=addr("n1"), incarnation=1), 1.0)
    assert s.member("n1").state is State.DEAD  # type: ignore[union-attr]
    s.step(addr("n1"), Alive(name="n1", address=addr("n1"), incarnation=2), 1.0)
    assert s.member("n1").state is State.ALIVE  # type: ignore[union-attr]
    assert [e.kind for e in s.ready().events] == [EventKind.SUSPECT, EventKind.DEAD, EventKind.JOIN]


def test_a_dead_claim_about_a_member_never_suspected_here_is_a_confirmed_suspicion() -> None:
    s = make(peers=4)
    s.step(addr("n2"), Dead(name="n1", incarnation=0, accuser="n2"), 1.0)
    assert s.member("n1").state is State.SUSPECT  # type: ignore[union-attr]
    assert s._suspicions["n1"].deadline() == pytest.approx(1.0 + CFG.suspicion_mult * CFG.probe_interval)
    # It may still refute; otherwise it dies at the minimum suspicion time.
    s.tick(1.0 + CFG.suspicion_mult * CFG.probe_interval + 1e-6)
    assert s.member("n1").state is State.DEAD  # type: ignore[union-attr]


def test_buddy_system_puts_the_suspicion_before_the_ping() -> None:
    s = make(peers=3)
    s.step(addr("n2"), Suspect(name="n3", incarnation=0, accuser="n2"), 0.0)
    s.ready()
    target, _ = probe_once(s)  # a suspect heard from others is probed first
    assert target == "n3"


def test_buddy_packet_order() -> None:
    s = make(peers=3)
    s.step(addr("n2"), Suspect(name="n3", incarnation=0, accuser="n2"), 0.0)
    s.ready()
    for _ in range(10):
        s.tick(s.next_deadline())
        r = s.ready()
        for p in r.packets:
            if any(isinstance(m, Ping) for m in p.messages):
                assert isinstance(p.messages[0], Suspect) and p.messages[0].name == "n3"
                assert isinstance(p.messages[1], Ping)
                return
    raise AssertionError("no probe")


def test_graceful_leave_is_a_dead_from_self_and_others_record_left() -> None:
    a, b = make("n0", peers=1), make("n1")
    b.step(addr("n0"), Alive(name="n0", address=addr("n0"), incarnation=0), 0.0)
    b.ready()
    a.leave(1.0)
    r = a.ready()
    leaves = [m for _, m in sent(r) if isinstance(m, Dead)]
    assert leaves and leaves[0] == Dead(name="n0", incarnation=0, accuser="n0")
    b.step(addr("n0"), Compound(messages=tuple(m for _, m in sent(r))), 1.0)
    assert b.member("n0").state is State.LEFT  # type: ignore[union-attr]
    assert [e.kind for e in b.ready().events] == [EventKind.LEAVE]
    assert a.local.state is State.LEFT
    a.tick(5.0)
    assert not of_type(a.ready(), Ping)  # a member that left no longer probes


def test_update_meta_raises_the_incarnation_and_spreads_as_update() -> None:
    a, b = make("n0", peers=1), make("n1")
    b.step(addr("n0"), Alive(name="n0", address=addr("n0"), incarnation=0, meta=a.local.meta), 0.0)
    b.ready()
    a.update_meta({"role": "server", "version": "2"}, 1.0)
    assert a.local.incarnation == 1
    msgs = tuple(m for _, m in sent(a.ready()))
    b.step(addr("n0"), Compound(messages=msgs), 1.0)
    (event,) = b.ready().events
    assert event.kind is EventKind.UPDATE
    assert event.member.meta_get("role") == "server"


def test_metadata_over_the_limit_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="meta_max_size"):
        Swim(CFG, "n0", addr("n0"), {"label": "x" * 600}, random.Random(1), 0.0)


def test_a_stalled_member_does_not_blame_its_probe_target() -> None:
    s = Swim(Config.lan(), "n0", addr("n0"), {}, random.Random(1), 0.0)
    for i in range(1, 4):
        s.step(addr(f"n{i}"), Alive(name=f"n{i}", address=addr(f"n{i}"), incarnation=0), 0.0)
    s.ready()
    target, seq = probe_once(s)
    start = s._now
    # The process stops right after sending the ping and resumes 1.5 s later; the ack is
    # the first thing it reads.
    s.step(addr(target), Ack(seq=seq), start + 1.5)
    r = s.ready()
    assert not [e for e in r.events if e.kind is EventKind.SUSPECT]
    assert s.health_score == 0  # +1 for the stall, -1 for the ack
    # Even when the overdue timer runs before the ack is read, nothing is suspected yet.
    target, seq = probe_once(s)
    s.tick(s._now + 1.5)
    assert not [e for e in s.ready().events if e.kind is EventKind.SUSPECT]
    assert s.health_score == 1


def test_time_must_not_go_backwards() -> None:
    s = make()
    s.tick(1.0)
    with pytest.raises(ValueError, match="backwards"):
        s.tick(0.5)


def test_join_sends_push_pull_to_every_seed_but_itself() -> None:
    s = make()
    s.join([addr("n1"), addr("n0"), addr("n2")], 0.0)
    r = s.ready()
    assert [st.dest for st in r.streams] == [addr("n1"), addr("n2")]
    assert all(isinstance(st.message, PushPullRequest) and st.message.join for st in r.streams)


def test_push_pull_merges_then_answers_with_the_merged_view() -> None:
    s = make(peers=2)
    states = (
        MemberState(name="n3", address=addr("n3"), incarnation=0, state=State.ALIVE),
        MemberState(name="n1", address=addr("n1"), incarnation=0, state=State.DEAD),
        MemberState(name="n0", address=addr("n0"), incarnation=0, state=State.SUSPECT),
    )
    s.step(addr("n3"), PushPullRequest(sender="n3", states=states), 1.0)
    r = s.ready()
    (stream,) = r.streams
    assert stream.dest == addr("n3")
    assert isinstance(stream.message, PushPullResponse)
    view = {st.name: st for st in stream.message.states}
    assert view["n3"].state is State.ALIVE
    assert view["n1"].state is State.SUSPECT  # a remote DEAD is only a suspicion here
    assert view["n0"].incarnation == 1 and view["n0"].state is State.ALIVE  # refuted first
    kinds = [(e.kind, e.member.name) for e in r.events]
    assert kinds == [(EventKind.JOIN, "n3"), (EventKind.SUSPECT, "n1")]


def test_ready_drains_and_datagrams_fit_the_buffer() -> None:
    s = make(peers=40)
    assert s.pending_broadcasts > 0
    s.tick(s.next_deadline())
    r = s.ready()
    assert r.packets
    for p in r.packets:
        assert sum(approx_size(m) + 2 for m in p.messages) <= CFG.udp_buffer_size
    assert not s.has_ready()
    assert not s.ready()


def test_dead_members_are_reaped_after_the_retention_time() -> None:
    s = make(peers=2)
    s.step(addr("n1"), Dead(name="n1", incarnation=0, accuser="n1"), 1.0)  # left
    assert s.member("n1").state is State.LEFT  # type: ignore[union-attr]
    t = 1.0
    while t < 1.0 + CFG.left_reap_time * 1.3:
        t = s.next_deadline()
        s.tick(t)
        s.ready()
    assert s.member("n1") is None
    assert "n1" not in s._probe_order


def test_a_ping_from_a_stranger_triggers_one_sync_with_it() -> None:
    s = make(peers=1)
    s.step(addr("n5"), Ping(seq=1, target="n0", source="n5"), 0.0)
    r = s.ready()
    assert of_type(r, Ack) == [(addr("n5"), Ack(seq=1))]
    assert [(st.dest, type(st.message)) for st in r.streams] == [(addr("n5"), PushPullRequest)]
    s.step(addr("n5"), Ping(seq=2, target="n0", source="n5"), 0.1)
    assert not s.ready().streams  # at most once per reconnect_interval
    s.step(addr("n1"), Ping(seq=3, target="n0", source="n1"), 0.2)
    assert not s.ready().streams  # a member we know alive is no stranger


def test_a_lone_member_does_not_wake_every_gossip_round() -> None:
    s = make()
    s.join([addr("n1")], 0.0)  # the seed does not answer (yet)
    s.ready()
    assert s.pending_broadcasts == 1
    assert s._next_gossip is None  # nobody to send to: re-armed when someone appears
