"""`SqliteRaftStorage`: the same answers as `MemoryStorage`, crash consistency at every
step of every write, and corruption refused with a message naming the file.

A "crash" is the storage's crash hook raising at a named step: the open SQLite
transaction is abandoned (closing the connection rolls it back, as SQLite's recovery
does with a WAL that has no commit record), files stay as far as they were written.
Reopening must then give exactly the state before or after the interrupted write.
"""

from __future__ import annotations

import pathlib
import random
import sqlite3
from collections.abc import Callable

import pytest

from shoal.errors import StoreError
from shoal.leader.raft import ConfState, Entry, EntryKind, HardState, MemoryStorage, Snapshot, SnapshotMeta
from shoal.leader.raft.errors import LogCompacted, LogUnavailable
from shoal.leader.raft_storage import DB_NAME, SqliteRaftStorage, snapshot_file_name

CONF = ConfState(voters=frozenset({1, 2, 3}))


class Crash(Exception):
    """Raised by the crash hook: the process 'dies' here."""


def ents(lo: int, hi: int, term: int, tag: str = "") -> list[Entry]:
    return [Entry(term=term, index=i, data=f"{tag}{i}@{term}".encode()) for i in range(lo, hi + 1)]


def view(s: SqliteRaftStorage | MemoryStorage) -> tuple[object, ...]:
    """Everything a reader can observe."""
    snap = s.snapshot()
    first, last = s.first_index(), s.last_index()
    return (
        s.hard_state,
        s.initial_state()[1],
        (snap.index, snap.term, snap.meta.conf_state, snap.data),
        first,
        last,
        s.term(first - 1),
        tuple(s.entries(first, last + 1, 1 << 30)) if last >= first else (),
    )


def reopen(path: pathlib.Path, s: SqliteRaftStorage | None = None) -> SqliteRaftStorage:
    if s is not None:
        s.close()
    return SqliteRaftStorage(path)


# --- the same answers as the in-memory twin -------------------------------------------------


def test_matches_memory_storage_and_survives_reopen(tmp_path: pathlib.Path) -> None:
    rng = random.Random(7)
    mem, disk = MemoryStorage(), SqliteRaftStorage(tmp_path)
    term = 1
    for step in range(300):
        r = rng.random()
        last = mem.last_index()
        if r < 0.5:
            # Never at or below the snapshot: those entries are committed, and the core
            # never replaces committed entries.
            lo = rng.randint(max(mem.snapshot().index + 1, last - 3), last + 1)
            if rng.random() < 0.2:
                term += 1
            batch = ents(lo, lo + rng.randint(0, 5), term, tag=str(step))
            mem.append(batch)
            disk.append(batch)
        elif r < 0.65:
            hs = HardState(term=term, vote=rng.choice([0, 1, 2]), commit=rng.randint(0, last))
            mem.set_hard_state(hs)
            disk.set_hard_state(hs)
        elif r < 0.8 and last > mem.snapshot().index:
            i = rng.randint(mem.snapshot().index + 1, last)
            data = f"state@{i}".encode()
            mem.create_snapshot(i, CONF, data)
            disk.create_snapshot(i, CONF, data)
            keep = rng.randint(0, 4)
            mem.compact(max(i - keep, 0))
            disk.compact(max(i - keep, 0))
        elif r < 0.85:
            term += 1
            idx = last + rng.randint(1, 5)
            snap = Snapshot(meta=SnapshotMeta(index=idx, term=term, conf_state=CONF), data=f"recv@{idx}".encode())
            mem.apply_snapshot(snap)
            disk.apply_snapshot(snap)
        else:
            disk = reopen(tmp_path, disk)
        assert view(disk) == view(mem), f"step {step}"
    disk = reopen(tmp_path, disk)
    assert view(disk) == view(mem)
    first = disk.first_index()
    with pytest.raises(LogCompacted):
        disk.entries(first - 1, first, 100)
    with pytest.raises(LogUnavailable):
        disk.term(disk.last_index() + 1)
    disk.close()


def test_initial_state_counts_the_snapshot_as_committed(tmp_path: pathlib.Path) -> None:
    s = SqliteRaftStorage(tmp_path)
    s.apply_snapshot(RECEIVED)  # a crash before the hard state that follows it
    s = reopen(tmp_path, s)
    assert s.initial_state() == (HardState(commit=20), CONF)
    s.close()


def test_a_must_sync_false_write_keeps_wal_order(tmp_path: pathlib.Path) -> None:
    s = SqliteRaftStorage(tmp_path)
    for kw, sync in (
        ({"entries": ents(1, 3, 1), "hard_state": HardState(term=1, commit=0)}, True),
        ({"hard_state": HardState(term=1, commit=2)}, False),  # only the commit moved
        ({"entries": ents(4, 4, 1)}, True),
    ):
        s.write(**kw, sync=sync)  # type: ignore[arg-type]
        s.publish(**kw)  # type: ignore[arg-type]
    s = reopen(tmp_path, s)
    assert s.hard_state == HardState(term=1, commit=2)
    assert s.last_index() == 4
    s.close()


def test_a_deferred_commit_index_lands_with_the_next_write_or_on_close(tmp_path: pathlib.Path) -> None:
    s = SqliteRaftStorage(tmp_path)
    s.append(ents(1, 3, 1))
    s.set_hard_state(HardState(term=1, vote=1, commit=1))
    s.defer_hard_state(HardState(term=1, vote=1, commit=2))
    # Not on disk yet: a crash now restarts from commit 1 (Raft learns it again).
    assert SqliteRaftStorage(tmp_path).hard_state.commit == 1
    s.write(entries=ents(4, 4, 1))
    assert SqliteRaftStorage(tmp_path).hard_state == HardState(term=1, vote=1, commit=2)
    s.defer_hard_state(HardState(term=1, vote=1, commit=4))
    s.close()
    assert SqliteRaftStorage(tmp_path).hard_state.commit == 4


# --- crash consistency ------------------------------------------------------------------------

Op = Callable[[SqliteRaftStorage], object]


def _base(path: pathlib.Path) -> None:
    """A storage with a snapshot at 5, entries 4..12 (two behind the snapshot), commit 10."""
    s = SqliteRaftStorage(path)
    s.append(ents(1, 12, 1))
    s.set_hard_state(HardState(term=2, vote=1, commit=10))
    s.create_snapshot(5, CONF, b"state@5")
    s.compact(3)
    s.close()


RECEIVED = Snapshot(meta=SnapshotMeta(index=20, term=3, conf_state=CONF), data=b"recv@20" * 1000)

OPS: dict[str, Op] = {
    "append_replacing_a_suffix": lambda s: s.append(ents(11, 14, 2, tag="new")),
    "hard_state": lambda s: s.set_hard_state(HardState(term=3, vote=2, commit=11)),
    "ready_entries_and_hard_state": lambda s: (
        s.write(entries=ents(13, 15, 2), hard_state=HardState(term=2, vote=1, commit=12)),
        s.publish(entries=ents(13, 15, 2), hard_state=HardState(term=2, vote=1, commit=12)),
    ),
    "ready_with_received_snapshot": lambda s: (
        s.write(snapshot=RECEIVED, entries=ents(21, 22, 3), hard_state=HardState(term=3, commit=20)),
        s.publish(snapshot=RECEIVED, entries=ents(21, 22, 3), hard_state=HardState(term=3, commit=20)),
    ),
    "apply_snapshot": lambda s: s.apply_snapshot(RECEIVED),
    "create_snapshot": lambda s: s.create_snapshot(9, CONF, b"state@9" * 1000),
    "compact": lambda s: s.compact(5),
}


def _steps(path: pathlib.Path, op: Op) -> list[str]:
    seen: list[str] = []
    s = SqliteRaftStorage(path, crash_hook=seen.append)
    op(s)
    s.close()
    return seen


@pytest.mark.parametrize("name", sorted(OPS))
def test_a_crash_at_any_step_leaves_the_state_before_or_after(tmp_path: pathlib.Path, name: str) -> None:
    op = OPS[name]
    ref = tmp_path / "ref"
    _base(ref)
    s = SqliteRaftStorage(ref)
    before = view(s)
    s.close()
    steps = _steps(ref, op)
    s = SqliteRaftStorage(ref)
    after = view(s)
    s.close()
    assert steps, "every write passes at least one crash point"
    assert before != after
    for i, step in enumerate(steps):
        d = tmp_path / f"crash{i}"
        _base(d)

        def hook(at: str, step: str = step) -> None:
            if at == step:
                raise Crash(at)

        s = SqliteRaftStorage(d, crash_hook=hook)
        with pytest.raises(Crash):
            op(s)
        s.close()  # the process is gone: the open transaction is rolled back
        s = SqliteRaftStorage(d)
        got = view(s)
        assert got in (before, after), f"crash at {step}: neither the state before nor after"
        # Crashing before the commit point loses the write; from it on, it is kept.
        assert (got == after) == (step in ("log.committed", "snapshot.recorded", "snapshot.old_removed")), step
        assert not list(d.glob("*.tmp")), f"crash at {step}: a temp file survived recovery"
        assert len(list(d.glob("snap-*.snap"))) == 1, f"crash at {step}: stray snapshots survived recovery"
        # And the storage keeps working after recovery.
        s.append(ents(s.last_index() + 1, s.last_index() + 1, 9))
        s.close()


def test_crash_points_cover_the_snapshot_file_protocol(tmp_path: pathlib.Path) -> None:
    _base(tmp_path)
    assert _steps(tmp_path, OPS["apply_snapshot"]) == [
        "snapshot.tmp_half_written",
        "snapshot.tmp_synced",
        "snapshot.renamed",
        "snapshot.dir_synced",
        "log.before_commit",
        "log.committed",
        "snapshot.old_removed",
    ]


# --- torn tails and corruption ----------------------------------------------------------------


def _db(path: pathlib.Path) -> sqlite3.Connection:
    return sqlite3.connect(str(path / DB_NAME), isolation_level=None)


def _current_snapshot(path: pathlib.Path) -> pathlib.Path:
    (snap,) = path.glob("snap-*.snap")
    return snap


def test_entries_past_a_gap_above_the_commit_index_are_a_torn_tail(tmp_path: pathlib.Path) -> None:
    _base(tmp_path)  # entries 4..12, commit 10
    with _db(tmp_path) as db:
        db.execute("DELETE FROM entries WHERE idx = 11")
    s = SqliteRaftStorage(tmp_path)
    assert s.last_index() == 10
    s.close()
    with _db(tmp_path) as db:  # and they are gone for good
        assert db.execute("SELECT max(idx) FROM entries").fetchone() == (10,)


def test_a_gap_at_or_below_the_commit_index_refuses_to_open(tmp_path: pathlib.Path) -> None:
    _base(tmp_path)
    with _db(tmp_path) as db:
        db.execute("DELETE FROM entries WHERE idx = 8")
    with pytest.raises(StoreError) as err:
        SqliteRaftStorage(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / DB_NAME) in msg and "8..8 are missing but committed" in msg
    assert "Move the directory" in msg and "re-add this server" in msg


def test_a_log_truncated_below_the_commit_index_refuses_to_open(tmp_path: pathlib.Path) -> None:
    _base(tmp_path)
    with _db(tmp_path) as db:
        db.execute("DELETE FROM entries WHERE idx >= 9")
    with pytest.raises(StoreError, match=r"commit index is 10 but the log ends at 8 \(log truncated\)"):
        SqliteRaftStorage(tmp_path)


def test_terms_going_backwards_refuse_to_open(tmp_path: pathlib.Path) -> None:
    _base(tmp_path)
    with _db(tmp_path) as db:
        db.execute("UPDATE entries SET term = 5 WHERE idx = 7")
    with pytest.raises(StoreError, match="entry 8 has term 1, lower than term 5"):
        SqliteRaftStorage(tmp_path)


@pytest.mark.parametrize(
    ("damage", "what"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-3]), "truncated"),
        (lambda p: p.write_bytes(p.read_bytes()[:-1] + b"X"), "fails its sha256 checksum"),
        (lambda p: p.write_bytes(b"not a snapshot at all, definitely" * 3), "bad magic"),
        (lambda p: p.unlink(), "the current snapshot file is missing"),
    ],
    ids=["truncated", "bit_flip", "garbage", "missing"],
)
def test_a_damaged_current_snapshot_refuses_to_open(
    tmp_path: pathlib.Path, damage: Callable[[pathlib.Path], object], what: str
) -> None:
    _base(tmp_path)
    snap = _current_snapshot(tmp_path)
    damage(snap)
    with pytest.raises(StoreError) as err:
        SqliteRaftStorage(tmp_path)
    msg = str(err.value)
    assert snap.name in msg and what in msg
    assert f"Move the directory {tmp_path} aside" in msg


def test_an_unreadable_database_refuses_to_open(tmp_path: pathlib.Path) -> None:
    _base(tmp_path)
    db = tmp_path / DB_NAME
    for wal in tmp_path.glob(DB_NAME + "-*"):
        wal.unlink()
    raw = bytearray(db.read_bytes())
    raw[:100] = b"\xff" * 100  # the SQLite header
    db.write_bytes(bytes(raw))
    with pytest.raises(StoreError) as err:
        SqliteRaftStorage(tmp_path)
    assert DB_NAME in str(err.value) and "damaged" in str(err.value)


def test_leftover_snapshot_files_are_removed_on_open(tmp_path: pathlib.Path) -> None:
    _base(tmp_path)
    current = _current_snapshot(tmp_path)
    stale = tmp_path / snapshot_file_name(1, 2)
    stale.write_bytes(b"old")
    newer = tmp_path / snapshot_file_name(9, 99)  # written, never recorded
    newer.write_bytes(current.read_bytes())
    (tmp_path / (snapshot_file_name(9, 100) + ".tmp")).write_bytes(b"half")
    s = SqliteRaftStorage(tmp_path)
    assert s.snapshot().index == 5
    assert sorted(p.name for p in tmp_path.glob("snap-*")) == [current.name]
    s.close()


def test_a_data_dir_of_another_cluster_or_server_is_refused(tmp_path: pathlib.Path) -> None:
    SqliteRaftStorage(tmp_path, cluster_id="blue", node_id=2).close()
    SqliteRaftStorage(tmp_path, cluster_id="blue", node_id=2).close()
    with pytest.raises(StoreError, match="belongs to cluster 'blue', not 'green'"):
        SqliteRaftStorage(tmp_path, cluster_id="green", node_id=2)
    with pytest.raises(StoreError, match="belongs to server 2, not 3"):
        SqliteRaftStorage(tmp_path, cluster_id="blue", node_id=3)


def test_conf_change_entries_keep_their_kind(tmp_path: pathlib.Path) -> None:
    s = SqliteRaftStorage(tmp_path)
    e = Entry(term=1, index=1, kind=EntryKind.CONF_CHANGE, data=b"\x01\x00")
    s.append([e])
    s = reopen(tmp_path, s)
    assert s.entries(1, 2, 100) == [e]
    s.close()
