"""MemoryStorage (the Storage protocol's twin) and RaftLog (storage + unstable tail)."""

from __future__ import annotations

import pytest

from shoal.leader.raft import (
    ConfState,
    Entry,
    HardState,
    LogCompacted,
    LogUnavailable,
    MemoryStorage,
    RaftInvariantError,
    Snapshot,
    SnapshotMeta,
    SnapshotOutOfDate,
)
from shoal.leader.raft.log import RaftLog
from shoal.leader.raft.messages import ENTRY_OVERHEAD
from shoal.leader.raft.storage import limit_size


def ents(*terms: int, start: int = 1) -> list[Entry]:
    """Entries with these terms at consecutive indexes from `start`."""
    return [Entry(term=t, index=start + i, data=f"{start + i}".encode()) for i, t in enumerate(terms)]


def storage_with(*terms: int) -> MemoryStorage:
    s = MemoryStorage()
    s.append(ents(*terms))
    return s


# --- MemoryStorage ---------------------------------------------------------------------


def test_empty_storage() -> None:
    s = MemoryStorage()
    assert (s.first_index(), s.last_index(), s.term(0)) == (1, 0, 0)
    assert s.initial_state() == (HardState(), ConfState())
    assert s.snapshot().is_empty()
    with pytest.raises(LogUnavailable):
        s.term(1)


def test_append_replaces_the_suffix_from_the_first_new_index() -> None:
    s = storage_with(1, 1, 2, 2)
    s.append(ents(3, 3, start=3))
    assert [s.term(i) for i in range(1, 5)] == [1, 1, 3, 3]
    assert s.last_index() == 4
    s.append(ents(4, start=2))
    assert s.last_index() == 2 and s.term(2) == 4


def test_append_with_a_gap_is_an_invariant_error() -> None:
    s = storage_with(1)
    with pytest.raises(RaftInvariantError):
        s.append(ents(1, start=5))


@pytest.mark.parametrize(
    ("lo", "hi", "max_size", "expected"),
    [
        (2, 4, 1 << 20, [2, 3]),
        (2, 6, 1 << 20, [2, 3, 4, 5]),
        (2, 6, 0, [2]),  # always at least one entry
        (2, 6, 2 * (ENTRY_OVERHEAD + 1), [2, 3]),
    ],
)
def test_entries_range_and_size_limit(lo: int, hi: int, max_size: int, expected: list[int]) -> None:
    s = storage_with(1, 1, 1, 1, 1)
    assert [e.index for e in s.entries(lo, hi, max_size)] == expected


def test_compaction_keeps_the_term_of_the_compaction_point() -> None:
    s = storage_with(1, 1, 2, 2, 3)
    s.create_snapshot(4, ConfState(voters=frozenset({1})), b"state")
    s.compact(3)
    assert s.first_index() == 4 and s.term(3) == 2
    with pytest.raises(LogCompacted):
        s.term(2)
    with pytest.raises(LogCompacted):
        s.entries(3, 5, 100)
    assert [e.index for e in s.entries(4, 6, 1 << 20)] == [4, 5]
    s.compact(2)  # behind the compaction point: nothing to do
    assert s.first_index() == 4


def test_compacting_past_the_snapshot_is_refused() -> None:
    s = storage_with(1, 1, 1)
    with pytest.raises(RaftInvariantError):
        s.compact(2)


def test_snapshots_only_move_forward() -> None:
    s = storage_with(1, 1, 1)
    s.create_snapshot(2, ConfState(), b"")
    with pytest.raises(SnapshotOutOfDate):
        s.create_snapshot(2, ConfState(), b"")
    with pytest.raises(SnapshotOutOfDate):
        s.apply_snapshot(Snapshot(meta=SnapshotMeta(index=1, term=1)))
    snap = Snapshot(meta=SnapshotMeta(index=10, term=4, conf_state=ConfState(voters=frozenset({1, 2}))), data=b"x")
    s.apply_snapshot(snap)
    assert (s.first_index(), s.last_index(), s.term(10)) == (11, 10, 4)
    assert s.initial_state()[1].voters == frozenset({1, 2})


def test_append_ignores_entries_covered_by_the_snapshot() -> None:
    s = MemoryStorage()
    s.apply_snapshot(Snapshot(meta=SnapshotMeta(index=5, term=2)))
    s.append(ents(2, 2, 3, start=4))
    assert (s.first_index(), s.last_index(), s.term(6)) == (6, 6, 3)


def test_limit_size() -> None:
    e = ents(1, 1, 1)
    assert limit_size(e, 0) == e[:1]
    assert limit_size(e, 1 << 20) == e
    assert limit_size([], 0) == []


# --- RaftLog ---------------------------------------------------------------------------


def test_log_reads_through_unstable_and_storage() -> None:
    log = RaftLog(storage_with(1, 1), 1 << 20)
    log.append(ents(2, 2, start=3))
    assert log.last_index() == 4 and log.term(3) == 2 and log.term(1) == 1
    assert [e.index for e in log.slice(1, 5, 1 << 20)] == [1, 2, 3, 4]
    assert log.term_or_none(9) is None


@pytest.mark.parametrize(
    ("entries", "conflict"),
    [
        ([], 0),
        (ents(1, 2, 3), 0),  # all match
        (ents(2, 3, start=2), 0),  # a matching suffix
        (ents(2, 3, 4, 4, start=2), 4),  # new entries after the end
        (ents(9, start=3), 3),  # a different term
        (ents(1, 9, start=1), 2),
    ],
)
def test_find_conflict(entries: list[Entry], conflict: int) -> None:
    log = RaftLog(storage_with(1, 2, 3), 1 << 20)
    assert log.find_conflict(tuple(entries)) == conflict


@pytest.mark.parametrize(
    ("index", "term", "expected"),
    [
        (6, 5, (6, 5)),  # our entry there already has a term ≤ 5
        (6, 4, (3, 4)),  # skip the whole term 5
        (6, 3, (2, 2)),
        (6, 1, (1, 1)),
        (6, 0, (0, 0)),
        (9, 5, (9, 0)),  # past our log
    ],
)
def test_find_conflict_by_term(index: int, term: int, expected: tuple[int, int]) -> None:
    log = RaftLog(storage_with(1, 2, 4, 5, 5, 5), 1 << 20)
    assert log.find_conflict_by_term(index, term) == expected


def test_maybe_append_matches_truncates_and_commits() -> None:
    log = RaftLog(storage_with(1, 1, 2), 1 << 20)
    assert log.maybe_append(3, 9, 3, tuple(ents(3, start=4))) is None  # prev mismatch
    assert log.maybe_append(2, 1, 2, tuple(ents(3, 3, start=3))) == 4  # overwrite index 3
    assert log.term(3) == 3 and log.committed == 2
    assert log.maybe_append(4, 3, 10, ()) == 4  # commit capped at what is known to match
    assert log.committed == 4


def test_truncating_a_committed_entry_is_an_invariant_error() -> None:
    log = RaftLog(storage_with(1, 1, 1), 1 << 20)
    log.commit_to(3)
    with pytest.raises(RaftInvariantError):
        log.maybe_append(1, 1, 3, tuple(ents(2, start=2)))
    with pytest.raises(RaftInvariantError):
        log.commit_to(4)  # past the end of the log


def test_stable_to_ignores_entries_overwritten_since_the_ready() -> None:
    log = RaftLog(MemoryStorage(), 1 << 20)
    log.append(ents(1, 1, 1))
    handed_out = log.unstable_entries()
    log.append(ents(2, start=2))  # a new leader overwrote index 2 and 3
    log.stable_to(handed_out[-1].index, handed_out[-1].term)
    assert [e.index for e in log.unstable.entries] == [1, 2]  # still to be persisted
    log.stable_to(2, 2)
    assert log.unstable.entries == [] and log.unstable.offset == 3


def test_next_committed_entries_respect_applied_and_the_size_limit() -> None:
    log = RaftLog(storage_with(1, 1, 1, 1), max_applying_size=2 * (ENTRY_OVERHEAD + 1))
    log.commit_to(3)
    assert [e.index for e in log.next_committed_entries()] == [1, 2]
    log.applied_to(2)
    assert [e.index for e in log.next_committed_entries()] == [3]
    log.applied_to(3)
    assert not log.has_next_committed_entries()
    with pytest.raises(RaftInvariantError):
        log.applied_to(4)


def test_restore_from_a_snapshot_replaces_the_log() -> None:
    log = RaftLog(storage_with(1, 1), 1 << 20)
    snap = Snapshot(meta=SnapshotMeta(index=10, term=3))
    log.restore(snap)
    assert (log.first_index(), log.last_index(), log.committed, log.term(10)) == (11, 10, 10, 3)
    assert not log.has_next_committed_entries()
    with pytest.raises(LogCompacted):
        log.term(5)
    log.stable_snap_to(10)
    assert log.unstable.snapshot is None


def test_up_to_date_compares_last_term_then_length() -> None:
    log = RaftLog(storage_with(1, 2, 2), 1 << 20)
    assert log.is_up_to_date(3, 2) and log.is_up_to_date(1, 3) and log.is_up_to_date(9, 2)
    assert not log.is_up_to_date(2, 2) and not log.is_up_to_date(9, 1)


def test_maybe_commit_only_counts_entries_of_the_given_term() -> None:
    log = RaftLog(storage_with(1, 1, 2), 1 << 20)
    assert not log.maybe_commit(2, 2)  # Figure 8: entry 2 is of term 1
    assert log.maybe_commit(3, 2) and log.committed == 3
