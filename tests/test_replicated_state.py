"""The replicated state machine: command encoding, exactly-once sessions, snapshots."""

from __future__ import annotations

import pytest

from shoal.leader import replicated_state as rs
from shoal.leader.replicated_state import ReplicatedState, Sessions, decode_command, encode_command
from shoal.leader.state import ClusterState, Put, Txn


def put(name: str, v: int = 0) -> Txn:
    return Txn(ops=(Put(kind="nodes", name=name, value={"v": v}),))


def test_command_round_trip() -> None:
    data = encode_command("client-é", 7, 5, put("a"))
    cmd = decode_command(data)
    assert (cmd.client_id, cmd.seq, cmd.first_unacked) == ("client-é", 7, 5)
    assert Txn.from_json(cmd.txn_json) == put("a")


@pytest.mark.parametrize(
    ("client", "seq", "first"),
    [("", 1, 0), ("c", 0, 0), ("c", 3, 4), ("x" * 70000, 1, 1)],
)
def test_bad_commands_are_refused_at_encoding(client: str, seq: int, first: int) -> None:
    with pytest.raises(ValueError):
        encode_command(client, seq, first, put("a"))


def test_a_retried_write_applies_once_and_answers_the_first_outcome() -> None:
    sm = ReplicatedState()
    first = sm.apply(4, encode_command("c", 1, 1, put("a", 1)))
    assert (first.revision, first.duplicate) == (1, False)
    sm.apply(5, encode_command("d", 1, 1, put("b")))
    again = sm.apply(6, encode_command("c", 1, 1, put("a", 1)))
    assert (again.revision, again.duplicate) == (1, True)
    assert sm.state.revision == 2 and sm.applied == 6


def test_concurrent_writes_of_one_client_are_remembered_until_acknowledged() -> None:
    sm = ReplicatedState()
    # seqs 1..3 in flight together: the client still awaits 1 when it sends 3.
    for i, seq in enumerate((1, 2, 3), start=1):
        sm.apply(i, encode_command("c", seq, 1, put(f"k{seq}")))
    # seq 2 lost its answer and is retried while 1 is still unanswered: a duplicate.
    assert sm.apply(4, encode_command("c", 2, 1, put("k2"))).duplicate
    # The client got every answer up to 3; seq 4 says so, and 1..3 are forgotten.
    sm.apply(5, encode_command("c", 4, 4, put("k4")))
    assert sm.sessions.lookup("c", 2) is None
    stale = sm.apply(6, encode_command("c", 2, 2, put("k2")))
    assert stale.duplicate and sm.state.revision == 4


def test_a_write_lost_behind_newer_ones_still_applies_when_retried() -> None:
    # Seq 1's entry was overwritten in a leader change, seq 2 committed: the retry of
    # seq 1 must apply (a "last seq" session would wrongly drop it as a duplicate).
    sm = ReplicatedState()
    sm.apply(1, encode_command("c", 2, 1, put("b")))
    out = sm.apply(2, encode_command("c", 1, 1, put("a")))
    assert not out.duplicate and sm.state.get("nodes", "a") == {"v": 0}


def test_a_refused_transaction_changes_nothing_and_records_its_error() -> None:
    sm = ReplicatedState()
    bad = Txn(ops=(Put(kind="nope", name="x", value={}),))
    out = sm.apply(1, encode_command("c", 1, 1, bad))
    assert out.error is not None and "unknown kind" in out.error
    assert sm.state.revision == 0
    assert sm.apply(2, encode_command("c", 1, 1, bad)).error == out.error


def test_undecodable_entry_is_a_noop_with_an_error() -> None:
    sm = ReplicatedState()
    out = sm.apply(3, b"\x09garbage")
    assert out.error is not None and sm.applied == 3 and sm.state.revision == 0


def test_sessions_are_evicted_least_recently_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rs, "MAX_SESSIONS", 3)
    s = Sessions()
    for c in "abcd":
        s.record(c, 1, 1, 1, None)
    assert s.lookup("a", 1) is None and len(s) == 3
    s.record("b", 2, 1, 2, None)  # b is now the most recent
    s.record("e", 1, 1, 3, None)
    assert s.lookup("c", 1) is None and s.lookup("b", 1) is not None


def test_snapshot_round_trip_keeps_state_and_sessions() -> None:
    sm = ReplicatedState()
    for i in range(1, 6):
        sm.apply(i, encode_command("c", i, i - 1 if i > 1 else 1, put(f"k{i}", i)))
    data = sm.snapshot()
    other = ReplicatedState()
    other.restore(data, 5)
    assert other.snapshot() == data
    assert other.state.to_snapshot() == sm.state.to_snapshot()
    assert other.applied == 5
    assert other.apply(6, encode_command("c", 5, 5, put("k5", 5))).duplicate


def test_restore_accepts_a_bare_cluster_state_snapshot_and_empty_bytes() -> None:
    state = ClusterState()
    state.apply(put("a"))
    sm = ReplicatedState()
    sm.restore(state.to_snapshot(), 9)
    assert sm.state.get("nodes", "a") == {"v": 0} and len(sm.sessions) == 0 and sm.applied == 9
    sm.restore(b"", 0)
    assert sm.state.revision == 0
