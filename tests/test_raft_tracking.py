"""Quorums, per-follower progress, the inflights window, ReadIndex and membership maths."""

from __future__ import annotations

import pytest

from shoal.leader.raft import ConfChange, ConfChangeKind, ConfChangeRefused, ConfState, EntryKind
from shoal.leader.raft.confchange import apply, bootstrap_entries, validate
from shoal.leader.raft.progress import Inflights, Progress, ProgressState
from shoal.leader.raft.quorum import VoteResult, committed_index, has_quorum, quorum_size, vote_result
from shoal.leader.raft.readonly import ReadOnly


@pytest.mark.parametrize(("voters", "size"), [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (7, 4)])
def test_quorum_size(voters: int, size: int) -> None:
    assert quorum_size(voters) == size


@pytest.mark.parametrize(
    ("acked", "expected"),
    [
        ({1: 5}, 5),
        ({1: 5, 2: 3, 3: 9}, 5),
        ({1: 5, 2: 3, 3: 9, 4: 7}, 5),  # 4 voters: the 3rd highest
        ({1: 1, 2: 2, 3: 3, 4: 4, 5: 5}, 3),
        ({1: 0, 2: 0, 3: 9}, 0),
    ],
)
def test_committed_index_is_the_majority_th_highest(acked: dict[int, int], expected: int) -> None:
    assert committed_index(acked.keys(), acked.__getitem__) == expected


@pytest.mark.parametrize(
    ("voters", "votes", "result"),
    [
        ({1}, {1: True}, VoteResult.WON),
        ({1, 2, 3}, {1: True}, VoteResult.PENDING),
        ({1, 2, 3}, {1: True, 2: True}, VoteResult.WON),
        ({1, 2, 3}, {1: True, 2: False}, VoteResult.PENDING),
        ({1, 2, 3}, {1: True, 2: False, 3: False}, VoteResult.LOST),
        ({1, 2, 3, 4}, {1: True, 2: True, 3: False}, VoteResult.PENDING),
        ({1, 2, 3, 4}, {1: True, 3: False, 4: False}, VoteResult.LOST),
        ({1, 2, 3}, {1: True, 9: True}, VoteResult.PENDING),  # non-voters do not count
    ],
)
def test_vote_result(voters: set[int], votes: dict[int, bool], result: VoteResult) -> None:
    assert vote_result(voters, votes) is result


def test_has_quorum() -> None:
    assert has_quorum({1, 2, 3}, {1, 3}.__contains__)
    assert not has_quorum({1, 2, 3}, {1}.__contains__)
    assert has_quorum(set(), lambda _: False)


def test_inflights_window_by_count_and_bytes() -> None:
    w = Inflights(3, max_bytes=100)
    w.add(5, 10)
    w.add(7, 10)
    assert not w.full()
    w.add(9, 10)
    assert w.full()
    with pytest.raises(OverflowError):
        w.add(10, 1)
    w.free_le(7)
    assert len(w) == 1 and w.bytes == 10
    w.add(12, 95)
    assert w.full()  # the byte limit
    w.free_first_one()
    w.reset()
    assert len(w) == 0 and w.bytes == 0


def progress(match: int = 0, next: int = 1) -> Progress:
    pr = Progress(next=next, inflights=Inflights(2))
    pr.match = match
    return pr


def test_probe_sends_one_message_at_a_time() -> None:
    pr = progress(next=5)
    assert not pr.is_paused()
    pr.sent_entries(7, 30)
    assert pr.is_paused() and pr.next == 5  # probing does not advance next
    assert pr.maybe_update(7)
    assert not pr.is_paused() and (pr.match, pr.next) == (7, 8)


def test_replicate_pipelines_until_the_window_is_full() -> None:
    pr = progress(match=4)
    pr.become_replicate()
    pr.sent_entries(6, 1)
    pr.sent_entries(8, 1)
    assert pr.next == 9 and pr.is_paused()
    pr.maybe_update(6)
    pr.inflights.free_le(6)
    assert not pr.is_paused()


@pytest.mark.parametrize(
    ("state", "match", "next", "rejected", "hint", "result", "new_next"),
    [
        ("replicate", 5, 10, 5, 0, False, 10),  # stale: at or below match
        ("replicate", 5, 10, 8, 0, True, 6),  # back to match + 1
        ("probe", 0, 10, 9, 3, True, 4),  # jump to the hint
        ("probe", 0, 10, 9, 20, True, 9),  # never past the rejected index
        ("probe", 5, 10, 9, 1, True, 6),  # never below match + 1
        ("probe", 0, 10, 7, 3, False, 10),  # not the probe in flight
    ],
)
def test_maybe_decr_to(
    state: str, match: int, next: int, rejected: int, hint: int, result: bool, new_next: int
) -> None:
    pr = progress(match=match, next=next)
    if state == "replicate":
        pr.become_replicate()
        pr.next = next
    assert pr.maybe_decr_to(rejected, hint) is result
    assert pr.next == new_next


def test_snapshot_state_pauses_and_resumes_past_the_snapshot() -> None:
    pr = progress(match=3)
    pr.become_snapshot(20)
    assert pr.is_paused() and pr.state is ProgressState.SNAPSHOT
    pr.become_probe()
    assert pr.next == 21 and pr.state.name == "PROBE"  # (by name: mypy narrowed the attribute)


def test_readonly_releases_requests_in_order() -> None:
    ro = ReadOnly()
    assert ro.add_request(5, 1, b"a", self_id=1)
    assert not ro.add_request(5, 1, b"a", self_id=1)  # duplicate context
    ro.add_request(6, 2, b"b", self_id=1)
    assert ro.last_pending_context() == b"b"
    assert ro.recv_ack(2, b"b") == {1, 2}
    assert ro.recv_ack(3, b"zzz") is None
    released = ro.advance(b"b")
    assert [(s.context, s.index) for s in released] == [(b"a", 5), (b"b", 6)]
    assert len(ro) == 0 and ro.last_pending_context() == b""


def cc(kind: ConfChangeKind, id: int) -> ConfChange:
    return ConfChange(kind=kind, node_id=id)


V = frozenset


@pytest.mark.parametrize(
    ("conf", "change", "after"),
    [
        (ConfState(voters=V({1})), cc(ConfChangeKind.ADD_LEARNER, 2), ConfState(voters=V({1}), learners=V({2}))),
        (ConfState(voters=V({1}), learners=V({2})), cc(ConfChangeKind.ADD_VOTER, 2), ConfState(voters=V({1, 2}))),
        (ConfState(voters=V({1, 2})), cc(ConfChangeKind.ADD_VOTER, 2), ConfState(voters=V({1, 2}))),
        (ConfState(voters=V({1, 2})), cc(ConfChangeKind.REMOVE_NODE, 2), ConfState(voters=V({1}))),
        (ConfState(voters=V({1}), learners=V({2})), cc(ConfChangeKind.REMOVE_NODE, 2), ConfState(voters=V({1}))),
        (ConfState(voters=V({1})), cc(ConfChangeKind.REMOVE_NODE, 9), ConfState(voters=V({1}))),
        # Refused at proposal time, no-ops if they reach the log anyway:
        (ConfState(voters=V({1})), cc(ConfChangeKind.REMOVE_NODE, 1), ConfState(voters=V({1}))),
        (ConfState(voters=V({1, 2})), cc(ConfChangeKind.ADD_LEARNER, 2), ConfState(voters=V({1, 2}))),
    ],
)
def test_apply_conf_change(conf: ConfState, change: ConfChange, after: ConfState) -> None:
    assert apply(conf, change) == after


def test_validate_refuses_with_a_reason() -> None:
    with pytest.raises(ConfChangeRefused, match="last voter"):
        validate(ConfState(voters=V({1})), cc(ConfChangeKind.REMOVE_NODE, 1))
    with pytest.raises(ConfChangeRefused, match="demoting"):
        validate(ConfState(voters=V({1, 2})), cc(ConfChangeKind.ADD_LEARNER, 2))
    with pytest.raises(ConfChangeRefused, match="positive"):
        validate(ConfState(voters=V({1})), cc(ConfChangeKind.ADD_VOTER, 0))


def test_conf_change_encoding_round_trips() -> None:
    c = ConfChange(kind=ConfChangeKind.ADD_LEARNER, node_id=2**40, context=b"10.0.0.4:7420")
    assert ConfChange.decode(c.encode()) == c
    with pytest.raises(ValueError, match="version"):
        ConfChange.decode(b"\x09" + c.encode()[1:])
    with pytest.raises(ValueError, match="shorter"):
        ConfChange.decode(b"\x01")


def test_bootstrap_entries_are_identical_on_every_server() -> None:
    a, hs = bootstrap_entries([3, 1, 2])
    b, _ = bootstrap_entries([1, 2, 3])
    assert a == b and hs.commit == 3 and hs.term == 1
    assert all(e.kind is EntryKind.CONF_CHANGE and e.term == 1 for e in a)
    assert [ConfChange.decode(e.data).node_id for e in a] == [1, 2, 3]
    with pytest.raises(ConfChangeRefused):
        bootstrap_entries([])
