"""Scenario tests of the Raft core on the lockstep `Cluster` (synchronous delivery).

Each test builds one situation from the Raft paper or thesis by hand — a partition, a
crash, a divergent log — and checks what the protocol promises there. `Cluster` checks
election safety, log matching, leader completeness and state-machine safety on every
step, so every test also checks those.
"""

from __future__ import annotations

import random

import pytest

from shoal.leader.raft import (
    NONE,
    ConfChange,
    ConfChangeKind,
    ConfChangeRefused,
    Config,
    Entry,
    EntryKind,
    IllegalTransition,
    MemoryStorage,
    MsgApp,
    MsgAppResp,
    MsgHeartbeat,
    MsgProp,
    MsgSnap,
    MsgTimeoutNow,
    MsgVote,
    MsgVoteResp,
    Node,
    NotLeader,
    ProposalDropped,
    Role,
    bootstrap_entries,
)
from shoal.leader.raft.raft import Raft
from shoal.leader.raft.sim import Cluster

BOOT = 3  # bootstrap entries of a 3-voter cluster: indexes 1..3, term 1


def leaders(c: Cluster) -> list[int]:
    return [id for id, n in c.nodes.items() if n is not None and n.is_leader]


def elected(c: Cluster, id: int) -> Cluster:
    c.campaign(id)
    assert c.leader() == id
    return c


# --- elections -------------------------------------------------------------------------


def test_a_leader_is_elected_by_timeouts_alone() -> None:
    c = Cluster(3, seed=1)
    c.tick_all(2 * 10 + 2)
    assert len(leaders(c)) == 1
    lead = leaders(c)[0]
    assert c.node(lead).term == 2  # bootstrap term 1, one election
    assert all(c.node(id).lead == lead for id in c.nodes)


def test_five_nodes_elect_exactly_one_leader() -> None:
    c = Cluster(5, seed=7)
    c.tick_all(30)
    assert len(leaders(c)) == 1


def test_new_leader_commits_a_noop_of_its_term() -> None:
    c = elected(Cluster(3), 1)
    st = c.node(1).status()
    assert st.commit == BOOT + 1
    assert c.node(1).raft.log.term(st.commit) == st.term


def test_vote_is_in_the_same_ready_as_its_response_and_must_sync() -> None:
    # "Persist before sending": the vote and the grant come out in one Ready whose
    # hard state carries the vote, so the shell persists it before sending the grant.
    c = Cluster(3)
    n2 = c.node(2)
    n2.step(MsgVote(src=1, dst=2, term=5, last_index=BOOT, last_term=1))
    rd = n2.ready()
    assert rd.hard_state is not None and rd.hard_state.vote == 1 and rd.hard_state.term == 5
    assert rd.must_sync
    assert any(isinstance(m, MsgVoteResp) and not m.reject for m in rd.messages)


def test_a_persisted_vote_survives_a_restart() -> None:
    c = Cluster(3)
    c.node(2).step(MsgVote(src=1, dst=2, term=5, last_index=BOOT, last_term=1))
    c.deliver()  # persists the vote; node 1 is not a candidate, the grant is ignored
    c.crash(2)
    c.restart(2)
    n2 = c.node(2)
    assert n2.raft.vote == 1 and n2.term == 5
    n2.step(MsgVote(src=3, dst=2, term=5, last_index=BOOT, last_term=1))
    rd = n2.ready()
    assert [m.reject for m in rd.messages if isinstance(m, MsgVoteResp)] == [True]


def test_candidate_with_a_stale_log_is_refused() -> None:
    c = elected(Cluster(3), 1)
    c.isolate(3)
    c.propose(1, b"x")  # node 3 misses it
    c.heal()
    n2 = c.node(2)
    n2.step(MsgVote(src=3, dst=2, term=9, last_index=BOOT + 1, last_term=2, transfer=True))
    rd = n2.ready()
    assert [m.reject for m in rd.messages if isinstance(m, MsgVoteResp)] == [True]


def test_illegal_transitions_raise() -> None:
    c = Cluster(3)
    r = c.node(1).raft
    with pytest.raises(IllegalTransition):
        r.become_leader()  # follower -> leader
    elected(c, 1)
    with pytest.raises(IllegalTransition):
        r.become_candidate()
    with pytest.raises(IllegalTransition):
        r.become_pre_candidate()


def test_ready_twice_without_advance_raises() -> None:
    c = elected(Cluster(3), 1)
    c.node(1).propose(b"x")
    rd = c.node(1).ready()
    with pytest.raises(IllegalTransition):
        c.node(1).ready()
    assert not c.node(1).has_ready()  # nothing new until advance
    c.node(1).advance(rd)
    with pytest.raises(IllegalTransition):
        c.node(1).advance(rd)


def test_follower_rejects_proposals_with_a_leader_hint() -> None:
    c = elected(Cluster(3), 1)
    with pytest.raises(NotLeader) as err:
        c.node(2).propose(b"x")
    assert err.value.leader_hint == 1


# --- proposal forwarding ---------------------------------------------------------------


def test_a_follower_forwards_proposals_to_the_leader_in_one_message() -> None:
    c = elected(Cluster(3), 1)
    n2 = c.node(2)
    for i in range(5):
        assert n2.forward([f"f{i}".encode()]) == 1
    rd = n2.ready()
    # Forwarded proposals promise nothing about the follower's disk: they leave early,
    # merged into one message for everything forwarded since the last Ready.
    (prop,) = [m for m in rd.early_messages if isinstance(m, MsgProp)]
    assert prop.dst == 1 and [e.data for e in prop.entries] == [f"f{i}".encode() for i in range(5)]
    assert not any(isinstance(m, MsgProp) for m in rd.messages)
    n2.advance(rd)
    c.queue.append(prop)
    c.deliver()
    want = [f"f{i}".encode() for i in range(5)]
    assert all(c.applied[id] == want for id in (1, 2, 3))


def test_forwarding_needs_a_known_leader_and_a_follower() -> None:
    c = Cluster(3)
    with pytest.raises(NotLeader) as err:
        c.node(2).forward([b"x"])
    assert err.value.leader_hint == NONE
    elected(c, 1)
    with pytest.raises(IllegalTransition):
        c.node(1).forward([b"x"])


def test_forwarded_proposals_to_a_non_leader_or_during_a_transfer_are_dropped_quietly() -> None:
    c = elected(Cluster(3), 1)
    # A proposal forwarded to a follower (its sender's leader moved on): no entry, no error.
    c.node(3).step(MsgProp(src=2, dst=3, term=1, entries=(Entry(term=0, index=0, data=b"lost"),)))
    c.deliver()
    c.drop = lambda m: isinstance(m, MsgTimeoutNow)
    c.node(1).transfer_leadership(3)
    c.deliver()
    c.node(2).forward([b"during-transfer"])
    c.deliver()
    assert all(c.applied[id] == [] for id in (1, 2, 3))
    # A membership change never travels as a forwarded proposal.
    cc = Entry(term=0, index=0, kind=EntryKind.CONF_CHANGE,
               data=ConfChange(kind=ConfChangeKind.REMOVE_NODE, node_id=3).encode())
    c.tick_all(10)  # the transfer is abandoned
    c.node(1).step(MsgProp(src=2, dst=1, term=1, entries=(cc,)))
    c.deliver()
    assert c.node(1).conf_state().voters == frozenset({1, 2, 3})
    with pytest.raises(ValueError):
        c.node(2).raft.forward((cc,))


def test_a_forwarded_proposal_delivered_twice_is_appended_twice() -> None:
    # The core does not deduplicate: that is the state machine's job (client sessions),
    # which is what makes re-forwarding after a leader change safe.
    c = elected(Cluster(3), 1)
    c.drop = None
    c.node(2).forward([b"once?"])
    rd = c.node(2).ready()
    (prop,) = [m for m in rd.early_messages if isinstance(m, MsgProp)]
    c.node(2).advance(rd)
    c.queue += [prop, prop]
    c.deliver()
    assert c.applied[3] == [b"once?", b"once?"]


def test_forwarded_proposals_survive_a_leader_change_when_sent_again() -> None:
    c = elected(Cluster(3), 1)
    c.drop = lambda m: isinstance(m, MsgProp)  # lost on the way to the old leader
    c.node(3).forward([b"w"])
    c.deliver()
    c.heal()
    c.crash(1)
    c.tick_all(30)  # the lease runs out, 2 or 3 is elected
    new = c.leader()
    assert new in (2, 3) and c.node(3).lead == new
    # The shell sends what it did not see applied again, to the new leader (or proposes
    # it, if that leader is itself).
    if new == 3:
        c.propose(3, b"w")
    else:
        c.node(3).forward([b"w"])
        c.deliver()
    assert c.applied[2] == c.applied[3] == [b"w"]


# --- pre-vote and check-quorum ---------------------------------------------------------


def test_prevote_keeps_a_rejoining_node_from_disrupting_the_leader() -> None:
    c = elected(Cluster(3, seed=3), 1)
    term = c.node(1).term
    c.isolate(3)
    c.tick_all(200)  # node 3 times out over and over
    assert c.node(3).term == term  # pre-votes never raised its term
    c.heal()
    c.tick_all(30)
    assert leaders(c) == [1] and c.node(1).term == term
    assert c.node(3).lead == 1


def test_without_prevote_a_rejoining_node_deposes_the_leader() -> None:
    # The control for the test above: the failure pre-vote exists to prevent.
    c = elected(Cluster(3, seed=3, pre_vote=False, check_quorum=False), 1)
    term = c.node(1).term
    c.isolate(3)
    c.tick_all(200)
    assert c.node(3).term > term + 5
    c.heal()
    c.tick_all(1)
    assert c.node(1).term > term  # the leader saw the higher term and stepped down


def test_check_quorum_makes_an_isolated_leader_step_down() -> None:
    c = elected(Cluster(3), 1)
    c.isolate(1)
    for _ in range(2 * 10):
        c.tick(1)
    assert c.node(1).role is Role.FOLLOWER and c.node(1).lead == NONE


def test_leader_with_a_quorum_stays_leader() -> None:
    c = elected(Cluster(5), 1)
    c.isolate(5)
    c.isolate(4)
    c.tick_all(100)
    assert c.node(1).is_leader


def test_followers_in_a_leader_lease_ignore_vote_requests() -> None:
    c = elected(Cluster(3), 1)
    n2 = c.node(2)
    term = n2.term
    n2.step(MsgVote(src=3, dst=2, term=term + 1, last_index=100, last_term=term))
    rd = n2.ready()
    assert n2.term == term and not any(isinstance(m, MsgVoteResp) for m in rd.messages)
    n2.advance(rd)


# --- replication -----------------------------------------------------------------------


def test_replication_and_apply_order() -> None:
    c = elected(Cluster(3), 1)
    for i in range(20):
        c.propose(1, f"v{i}".encode())
    assert all(c.applied[id] == [f"v{i}".encode() for i in range(20)] for id in c.nodes)


def test_proposals_between_readies_go_out_in_one_append_each() -> None:
    c = elected(Cluster(3), 1)
    n1 = c.node(1)
    for i in range(10):
        n1.propose(f"v{i}".encode())
    rd = n1.ready()
    apps = [m for m in rd.early_messages if isinstance(m, MsgApp) and m.entries]
    assert sorted(m.dst for m in apps) == [2, 3]
    assert all(len(m.entries) == 10 for m in apps)
    n1.advance(rd)


def test_a_leaders_appends_leave_before_its_fsync_and_acks_after_the_followers() -> None:
    # Ready step 0: the leader replicates while it writes its own log (thesis §10.2.1);
    # a follower's acknowledgement still waits for its fsync, one per Ready.
    c = elected(Cluster(3), 1)
    n1, n2 = c.node(1), c.node(2)
    apps = []
    for data in (b"a", b"b"):
        n1.propose(data)
        rd = n1.ready()
        assert rd.must_sync and not rd.messages
        assert [m.dst for m in rd.early_messages if isinstance(m, MsgApp)] == [2, 3]
        apps += [m for m in rd.early_messages if m.dst == 2]
        c.storages[1].append(rd.entries)
        n1.advance(rd)
    for m in apps:
        n2.step(m)
    rd2 = n2.ready()
    acks = [m for m in rd2.messages if isinstance(m, MsgAppResp)]
    assert not rd2.early_messages and [a.index for a in acks] == [BOOT + 3]
    c.storages[2].append(rd2.entries)
    n2.advance(rd2)


def test_figure_8_entries_of_older_terms_are_not_committed_by_counting() -> None:
    c = Cluster(3, check_quorum=False, max_size_per_msg=1)
    elected(c, 1)  # term 2, no-op at 4
    c.isolate(1)
    old = c.propose(1, b"old")  # index 5, term 2, persisted only on node 1
    c.crash(1)
    c.restart(1)
    c.heal()
    # Hold back the term-3 entry once a follower holds index 5: node 1 and that
    # follower are then a majority holding an entry of term 2.
    noop = old + 1

    def hold_back(m: object) -> bool:
        return (
            isinstance(m, MsgApp)
            and any(e.index == noop for e in m.entries)
            and c.node(1).raft.tracker.progress[m.dst].match >= old
        )

    c.drop = hold_back
    c.campaign(1)  # term 3: log is [.., 5 (term 2), 6 (no-op, term 3)]
    assert c.node(1).is_leader and c.node(1).term == 3
    st = c.node(1).status()
    assert st.progress[2].match >= old and st.progress[3].match >= old
    assert st.commit < old, "an entry of an older term was committed by counting replicas"
    c.heal()
    c.tick_all(4)  # the held-back append is deemed lost after 3 heartbeats and resent
    assert c.node(1).status().commit == noop  # committed together with the term-3 entry
    assert all(c.applied[id] == [b"old"] for id in c.nodes)


def test_fast_backoff_skips_a_conflicting_term_per_round_trip() -> None:
    c = elected(Cluster(3, seed=5), 1)
    for i in range(5):
        c.propose(1, f"a{i}".encode())
    c.isolate(1)
    for i in range(50):
        c.node(1).propose(f"stale{i}".encode())  # uncommitted, only on node 1
    c.deliver()
    for _ in range(40):
        for id in (2, 3):
            c.node(id).tick()
        c.deliver()
    new = c.leader() if c.leader() != 1 else next(id for id in (2, 3) if c.node(id).is_leader)
    assert new in (2, 3)
    for i in range(100):
        c.node(new).propose(f"b{i}".encode())
    c.deliver()
    c.tick(1, 2 * 10)  # the isolated old leader steps down (check-quorum)
    # Another leader, so the probe starts at the end of a long log.
    c.crash(new)
    c.heal()
    c.isolate(new)
    other = 5 - new  # the remaining one of 2 and 3
    c.sent.clear()
    c.campaign(other)
    assert c.node(other).is_leader
    c.tick_all(3)
    rejections = [m for m in c.sent if isinstance(m, MsgAppResp) and m.src == 1 and m.reject]
    assert 1 <= len(rejections) <= 2, rejections
    assert c.applied[1] == c.applied[other]
    assert all(not d.startswith(b"stale") for d in c.applied[1])


def test_inflights_window_bounds_pipelining() -> None:
    c = elected(Cluster(3, max_inflight_msgs=2, max_size_per_msg=1), 1)
    c.propose(1, b"warm")  # followers in REPLICATE
    c.drop = lambda m: isinstance(m, MsgAppResp) and m.src == 2
    c.sent.clear()
    for i in range(10):
        c.node(1).propose(f"v{i}".encode())
        c.deliver()
    to2 = [m for m in c.sent if isinstance(m, MsgApp) and m.dst == 2 and m.entries]
    assert len(to2) == 2  # the window is full: nothing more until acks arrive
    c.heal()
    c.tick_all(5)  # heartbeats resume it; stalled-window detection re-probes
    assert c.applied[2] == c.applied[1] and len(c.applied[1]) == 11


def test_lost_appends_in_replicate_state_are_resent() -> None:
    c = elected(Cluster(3), 1)
    c.propose(1, b"warm")
    c.drop = lambda m: isinstance(m, MsgApp) and m.dst == 3 and bool(m.entries)
    c.propose(1, b"lost")
    c.drop = None
    assert c.applied[3] == [b"warm"]
    c.tick_all(5)
    assert c.applied[3] == [b"warm", b"lost"]


# --- snapshots -------------------------------------------------------------------------


def test_lagging_follower_catches_up_from_a_snapshot() -> None:
    c = elected(Cluster(3), 1)
    c.crash(3)
    for i in range(30):
        c.propose(1, f"v{i}".encode())
    c.compact(1)
    c.compact(2)
    assert c.storages[1].first_index() > BOOT + 2
    c.restart(3)
    c.sent.clear()
    c.tick_all(3)
    assert any(isinstance(m, MsgSnap) and m.dst == 3 for m in c.sent)
    assert c.applied[3] == c.applied[1]
    assert c.storages[3].snapshot().index == c.storages[1].snapshot().index
    c.propose(1, b"after")
    assert c.applied[3][-1] == b"after"


def test_restart_after_compaction_restores_from_the_snapshot() -> None:
    c = elected(Cluster(3), 1)
    for i in range(10):
        c.propose(1, f"v{i}".encode())
    c.compact(2, keep=2)
    before = list(c.applied[2])
    c.crash(2)
    c.restart(2)
    c.tick_all(2)
    assert c.applied[2] == before
    assert c.node(2).conf_state().voters == frozenset({1, 2, 3})


def test_failed_snapshot_is_retried() -> None:
    c = elected(Cluster(3), 1)
    c.crash(3)
    for i in range(10):
        c.propose(1, f"v{i}".encode())
    c.compact(1)
    c.drop = lambda m: isinstance(m, MsgSnap)
    c.restart(3)
    c.tick_all(4)  # the appends sent while it was down are deemed lost after 3 heartbeats
    assert c.node(1).status().progress[3].state.value == "snapshot"
    c.node(1).report_snapshot(3, ok=False)  # what the transport says when the stream breaks
    c.drop = None
    c.tick_all(3)
    assert c.applied[3] == c.applied[1]


# --- membership ------------------------------------------------------------------------


def conf_change(kind: ConfChangeKind, id: int) -> ConfChange:
    return ConfChange(kind=kind, node_id=id)


def test_add_learner_promote_and_remove_the_leader() -> None:
    c = elected(Cluster(3, spares=1, seed=2), 1)
    for i in range(5):
        c.propose(1, f"v{i}".encode())
    c.node(1).propose_conf_change(conf_change(ConfChangeKind.ADD_LEARNER, 4))
    c.deliver()
    c.tick_all(2)
    assert c.conf[1].learners == frozenset({4})
    assert c.applied[4] == c.applied[1]
    # A learner never counts: with both other voters down nothing commits.
    c.crash(2)
    c.crash(3)
    commit = c.node(1).status().commit
    c.propose(1, b"uncommitted")
    c.tick_all(3)
    assert c.node(1).status().commit == commit
    assert c.node(4).role is Role.FOLLOWER and c.node(4).term == c.node(1).term
    c.restart(2)
    c.restart(3)
    c.tick_all(3)
    c.node(1).propose_conf_change(conf_change(ConfChangeKind.ADD_VOTER, 4))
    c.deliver()
    assert c.conf[1].voters == frozenset({1, 2, 3, 4}) and not c.conf[1].learners
    c.tick_all(2)
    c.node(1).propose_conf_change(conf_change(ConfChangeKind.REMOVE_NODE, 1))
    c.deliver()
    c.tick_all(2)
    assert not c.node(1).is_leader  # a removed leader steps down
    c.tick_all(40)
    (lead,) = leaders(c)
    assert lead in (2, 3, 4)
    assert c.conf[lead].voters == frozenset({2, 3, 4})
    c.propose(lead, b"after")
    assert all(c.applied[id][-1] == b"after" for id in (2, 3, 4))
    # The removed node keeps ticking without disturbing anyone.
    term = c.node(lead).term
    c.tick_all(100)
    assert leaders(c) == [lead] and c.node(lead).term == term


def test_one_membership_change_at_a_time() -> None:
    c = elected(Cluster(3, spares=2), 1)
    c.node(1).propose_conf_change(conf_change(ConfChangeKind.ADD_LEARNER, 4))
    with pytest.raises(ConfChangeRefused):
        c.node(1).propose_conf_change(conf_change(ConfChangeKind.ADD_LEARNER, 5))
    c.deliver()
    c.node(1).propose_conf_change(conf_change(ConfChangeKind.ADD_LEARNER, 5))


def test_new_leader_changes_membership_only_after_its_noop_is_applied() -> None:
    c = Cluster(3, spares=1)
    c.node(1).campaign()
    # Deliver the votes but not yet the no-op's commit.
    c.drop = lambda m: isinstance(m, (MsgApp, MsgHeartbeat))
    c.deliver()
    assert c.node(1).is_leader
    with pytest.raises(ConfChangeRefused):
        c.node(1).propose_conf_change(conf_change(ConfChangeKind.ADD_LEARNER, 4))
    c.heal()
    c.tick_all(1)
    c.node(1).propose_conf_change(conf_change(ConfChangeKind.ADD_LEARNER, 4))


def test_invalid_membership_changes_are_refused() -> None:
    c = elected(Cluster(1), 1)
    with pytest.raises(ConfChangeRefused):
        c.node(1).propose_conf_change(conf_change(ConfChangeKind.REMOVE_NODE, 1))
    c2 = elected(Cluster(3), 1)
    with pytest.raises(ConfChangeRefused):
        c2.node(1).propose_conf_change(conf_change(ConfChangeKind.ADD_LEARNER, 2))


def test_single_node_cluster_commits_alone() -> None:
    c = elected(Cluster(1), 1)
    c.propose(1, b"x")
    assert c.applied[1] == [b"x"]
    c.read_index(1, b"r1")
    assert [rs.index for rs in c.read_states[1]] == [c.node(1).status().commit]


# --- leadership transfer ---------------------------------------------------------------


def test_leadership_transfer() -> None:
    c = elected(Cluster(3), 1)
    term = c.node(1).term
    c.node(1).transfer_leadership(2)
    c.deliver()
    assert c.leader() == 2 and c.node(2).term == term + 1
    c.propose(2, b"x")
    assert all(c.applied[id] == [b"x"] for id in c.nodes)


def test_transfer_requested_at_a_follower_is_forwarded() -> None:
    c = elected(Cluster(3), 1)
    c.node(3).transfer_leadership(3)
    c.deliver()
    assert c.leader() == 3


def test_transfer_to_a_lagging_follower_brings_it_up_to_date_first() -> None:
    c = elected(Cluster(3), 1)
    c.isolate(3)
    for i in range(10):
        c.propose(1, f"v{i}".encode())
    c.heal()
    c.sent.clear()
    c.node(1).transfer_leadership(3)
    c.deliver()
    assert c.leader() == 3
    first_timeout = next(i for i, m in enumerate(c.sent) if isinstance(m, MsgTimeoutNow))
    assert any(isinstance(m, MsgApp) and m.dst == 3 for m in c.sent[:first_timeout])
    assert len(c.applied[3]) == 10


def test_proposals_are_dropped_during_a_transfer_until_it_times_out() -> None:
    c = elected(Cluster(3), 1)
    c.drop = lambda m: isinstance(m, MsgTimeoutNow)
    c.node(1).transfer_leadership(2)
    c.deliver()
    with pytest.raises(ProposalDropped):
        c.node(1).propose(b"x")
    c.tick_all(10)  # one election timeout: the transfer is abandoned
    assert c.node(1).is_leader
    c.propose(1, b"x")
    assert c.applied[2] == [b"x"]


def test_transfer_to_a_learner_is_ignored() -> None:
    c = elected(Cluster(3, spares=1), 1)
    c.node(1).propose_conf_change(conf_change(ConfChangeKind.ADD_LEARNER, 4))
    c.deliver()
    c.node(1).transfer_leadership(4)
    c.deliver()
    assert c.leader() == 1
    assert c.node(1).status().lead_transferee == NONE


# --- ReadIndex -------------------------------------------------------------------------


def test_read_index_on_the_leader_after_a_heartbeat_round() -> None:
    c = elected(Cluster(3), 1)
    c.propose(1, b"x")
    c.read_index(1, b"r1")
    (rs,) = c.read_states[1]
    assert rs.context == b"r1" and rs.index == c.node(1).status().commit


def test_read_index_waits_for_the_new_leaders_noop() -> None:
    c = Cluster(3)
    c.node(1).campaign()
    c.drop = lambda m: isinstance(m, MsgApp)
    c.deliver()
    c.node(1).read_index(b"early")
    c.deliver()
    assert c.read_states[1] == []
    c.heal()
    c.tick_all(1)
    assert [rs.context for rs in c.read_states[1]] == [b"early"]
    assert c.read_states[1][0].index == c.node(1).status().commit


def test_read_index_from_a_follower_is_forwarded() -> None:
    c = elected(Cluster(3), 1)
    c.propose(1, b"x")
    c.read_index(2, b"f1")
    (rs,) = c.read_states[2]
    assert rs.index == c.node(1).status().commit


def test_deposed_leader_never_answers_a_read() -> None:
    c = elected(Cluster(3), 1)
    c.propose(1, b"v1")
    c.isolate(1)
    for _ in range(40):
        for id in (2, 3):
            c.node(id).tick()
        c.deliver()
    new = leaders(c)
    assert 1 in new and len(new) == 2  # node 1 still believes it leads (not ticked)
    c.propose(next(i for i in new if i != 1), b"v2")
    c.node(1).read_index(b"stale?")
    c.deliver()
    assert c.read_states[1] == []  # no heartbeat quorum: no answer
    c.heal()
    c.tick_all(3)
    assert c.read_states[1] == [] and not c.node(1).is_leader


def test_reads_without_a_leader_fail_fast() -> None:
    c = Cluster(3)
    with pytest.raises(NotLeader):
        c.node(1).read_index(b"r")


# --- construction ----------------------------------------------------------------------


def test_new_node_from_bootstrap_storage_learns_its_voters_from_the_log() -> None:
    storage = MemoryStorage()
    entries, hs = bootstrap_entries([1, 2, 3])
    storage.append(entries)
    storage.set_hard_state(hs)
    node = Node(Config(id=1), storage, rng=random.Random(0))
    assert node.conf_state().voters == frozenset()
    rd = node.ready()
    assert [e.index for e in rd.committed_entries] == [1, 2, 3]
    for e in rd.committed_entries:
        node.apply_conf_change(ConfChange.decode(e.data))
    node.advance(rd)
    assert node.conf_state().voters == frozenset({1, 2, 3})


def test_restart_with_a_commit_past_the_log_is_refused() -> None:
    from shoal.leader.raft import HardState, RaftInvariantError

    storage = MemoryStorage()
    storage.set_hard_state(HardState(term=1, commit=5))
    with pytest.raises(RaftInvariantError):
        Raft(Config(id=1), storage, rng=random.Random(0))


def test_restart_after_a_snapshot_persisted_without_its_hard_state() -> None:
    # Crash between persistence steps: the leader's snapshot is on disk, the hard
    # state that would have moved commit up to it is not.
    from shoal.leader.raft import HardState, Snapshot, SnapshotMeta

    storage = MemoryStorage()
    storage.set_hard_state(HardState(term=2, commit=3))
    storage.apply_snapshot(Snapshot(meta=SnapshotMeta(index=10, term=2), data=b"state"))
    node = Node(Config(id=1, applied=10), storage, rng=random.Random(0))
    st = node.status()
    assert (st.commit, st.applied, st.last_index) == (10, 10, 10)
