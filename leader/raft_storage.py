"""`SqliteRaftStorage`: the Raft log and hard state in SQLite, snapshots as files.

Layout of a server's Raft directory:

    raft.db                                   entries, hard state, log metadata (WAL mode)
    snap-<term:016x>-<index:016x>.snap        the current snapshot (one; hex so names sort)

Rules:
- SQLite runs in WAL mode with `synchronous=FULL`: a committed transaction is on disk
  (the WAL is fsync'd) before `write` returns. A Ready whose `must_sync` is false (only
  the commit index moved, which the leader re-sends) is written with `synchronous=NORMAL`;
  the WAL is sequential, so the next FULL commit makes it durable too, and nothing
  written later can survive a crash that loses it. A hard state that only moves the
  commit index need not be written at once at all: `defer_hard_state` keeps it for the
  next write (Raft needs no durable commit index; a restarted server learns it again).
- One `write` = one SQLite transaction: (record a received snapshot, drop the whole
  log), delete the stored suffix that the new entries replace, insert them, store the
  hard state. Steps 1–3 of a `Ready` are therefore atomic: a crash leaves all of them
  or none — stronger than the core needs.
- A snapshot file is written to `<name>.tmp`, fsync'd, renamed, and the directory
  fsync'd, *then* recorded in `log_meta` inside the SQLite transaction. The SQLite
  row is the commit point: a file that the row does not name is a leftover of a crash
  (or of cleanup that did not finish) and is deleted when the storage opens.
- A snapshot file is `HEADER` (magic, version, sha256 of the body, body length) then the
  body: a length-prefixed JSON metadata record (index, term, voters, learners) and the
  state machine's bytes. The checksum covers the whole body.
- `log_meta.offset_*` is the entry just before the first stored one (the "dummy" of
  `MemoryStorage`): it equals the snapshot after a received snapshot and trails it by
  the entries kept for lagging followers after `compact`.

Recovery on open (`SqliteRaftStorage(dir)`):
- Torn tail, discarded with a warning: `*.tmp` snapshot files (a crash while writing
  one), snapshot files the metadata does not name, and stored entries past a gap in
  the index sequence when every entry past the gap is above the persisted commit
  index (SQLite's own WAL recovery already drops a half-written transaction; a gap
  above the commit point can only be damage to uncommitted entries, which the leader
  replaces).
- Corruption, refused with `StoreError` naming the file and what to do: a database
  SQLite cannot read, the current snapshot missing or failing its checksum, a gap
  at or below the commit index, terms going backwards, a commit index past the log.
  Nothing is repaired silently: the server refuses to start and says to move the
  directory aside and rejoin (it then receives a fresh snapshot from the leader).

Threads: every writer comes in two halves. The disk half (`write`, `write_snapshot`,
`write_compaction`) may run in a worker thread while the core reads the storage on the
event loop: it never changes the in-memory view that every read serves. The memory half
(`publish`, `publish_snapshot`, `publish_compaction`) runs afterwards on the thread that
owns the core. The caller runs one writer at a time and changes nothing in between
(the Ready loop does). The `WritableStorage` methods do both halves at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import sqlite3
import struct
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from shoal.errors import StoreError
from shoal.leader.raft.errors import RaftInvariantError, SnapshotOutOfDate
from shoal.leader.raft.messages import ConfState, Entry, EntryKind, HardState, Snapshot, SnapshotMeta
from shoal.leader.raft.storage import LogView

__all__ = [
    "DB_NAME",
    "SNAPSHOT_MAGIC",
    "SqliteRaftStorage",
    "encode_snapshot_file",
    "decode_snapshot_file",
    "snapshot_file_name",
]

DB_NAME = "raft.db"
SNAPSHOT_MAGIC = b"SHOALSNP"
_SNAPSHOT_VERSION = 1
_HEADER = struct.Struct(">8sI32sQ")  # magic, version, sha256(body), len(body)
_META_LEN = struct.Struct(">I")
_SNAP_RE = re.compile(r"^snap-([0-9a-f]{16})-([0-9a-f]{16})\.snap$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    idx INTEGER PRIMARY KEY, term INTEGER NOT NULL, kind INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS hard_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    term INTEGER NOT NULL, vote INTEGER NOT NULL, commit_index INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS log_meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    snap_index INTEGER NOT NULL, snap_term INTEGER NOT NULL,
    offset_index INTEGER NOT NULL, offset_term INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS identity (
    id INTEGER PRIMARY KEY CHECK (id = 1), cluster_id TEXT NOT NULL, node_id INTEGER NOT NULL);
"""

CrashHook = Callable[[str], None]
"""Called at each named step of a write (tests raise from it to simulate a crash)."""


def snapshot_file_name(term: int, index: int) -> str:
    return f"snap-{term:016x}-{index:016x}.snap"


def encode_snapshot_file(snapshot: Snapshot) -> bytes:
    """The bytes of a snapshot file: checksummed header, metadata, data."""
    meta = snapshot.meta
    meta_json = json.dumps(
        {
            "index": meta.index,
            "term": meta.term,
            "voters": sorted(meta.conf_state.voters),
            "learners": sorted(meta.conf_state.learners),
        },
        separators=(",", ":"),
    ).encode()
    body = _META_LEN.pack(len(meta_json)) + meta_json + snapshot.data
    return _HEADER.pack(SNAPSHOT_MAGIC, _SNAPSHOT_VERSION, hashlib.sha256(body).digest(), len(body)) + body


def decode_snapshot_file(raw: bytes, where: str) -> Snapshot:
    """Parse and verify a snapshot file; `ValueError` says what is wrong with `where`."""
    if len(raw) < _HEADER.size:
        raise ValueError(f"{where} is {len(raw)} bytes, shorter than its header (truncated)")
    magic, version, digest, length = _HEADER.unpack_from(raw)
    if magic != SNAPSHOT_MAGIC:
        raise ValueError(f"{where} is not a shoal snapshot (bad magic)")
    if version != _SNAPSHOT_VERSION:
        raise ValueError(f"{where} has snapshot format version {version}, this shoal reads {_SNAPSHOT_VERSION}")
    body = raw[_HEADER.size :]
    if len(body) != length:
        raise ValueError(f"{where} holds {len(body)} body bytes, its header says {length} (truncated)")
    if hashlib.sha256(body).digest() != digest:
        raise ValueError(f"{where} fails its sha256 checksum")
    (meta_len,) = _META_LEN.unpack_from(body)
    meta = json.loads(body[_META_LEN.size : _META_LEN.size + meta_len])
    conf = ConfState(voters=frozenset(meta["voters"]), learners=frozenset(meta["learners"]))
    return Snapshot(
        meta=SnapshotMeta(index=meta["index"], term=meta["term"], conf_state=conf),
        data=body[_META_LEN.size + meta_len :],
    )


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SqliteRaftStorage(LogView):
    """A durable `WritableStorage`; see the module docstring for layout and recovery."""

    def __init__(
        self,
        directory: pathlib.Path | str,
        *,
        cluster_id: str | None = None,
        node_id: int | None = None,
        logger: Any = None,
        crash_hook: CrashHook | None = None,
    ) -> None:
        self.directory = pathlib.Path(directory)
        self.db_path = self.directory / DB_NAME
        self._log = logger if logger is not None else structlog.get_logger("shoal.raft.storage")
        self._hook = crash_hook
        self._sync_full = True
        self._deferred_hard_state: HardState | None = None
        # The in-memory view every read serves; `_ents[0]` stands for the offset entry.
        self._hard_state = HardState()
        self._snapshot = Snapshot()
        self._ents: list[Entry] = [Entry(term=0, index=0)]
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(str(self.db_path), check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._damaged(self.db_path, str(exc)) from exc
        try:
            self._open(cluster_id, node_id)
        except BaseException:
            self._db.close()
            raise

    # --- opening and recovery --------------------------------------------------------

    def _damaged(self, path: pathlib.Path, what: str) -> StoreError:
        return StoreError(
            f"the Raft data in {path} is damaged ({what}); this server refuses to start rather "
            f"than serve a corrupted log. Move the directory {self.directory} aside and re-add "
            "this server to the cluster: it will receive a fresh copy from the leader."
        )

    def _open(self, cluster_id: str | None, node_id: int | None) -> None:
        db = self._db
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: the WAL is fsync'd at every commit, so a vote or an acknowledgement
            # never leaves this node before what it promises is on disk.
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            check = db.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise self._damaged(self.db_path, f"integrity check: {check[0] if check else 'no answer'}")
            identity = db.execute("SELECT cluster_id, node_id FROM identity WHERE id = 1").fetchone()
            hs_row = db.execute("SELECT term, vote, commit_index FROM hard_state WHERE id = 1").fetchone()
            meta_row = db.execute(
                "SELECT snap_index, snap_term, offset_index, offset_term FROM log_meta WHERE id = 1"
            ).fetchone()
            rows = db.execute("SELECT idx, term, kind, data FROM entries ORDER BY idx").fetchall()
        except sqlite3.DatabaseError as exc:
            raise self._damaged(self.db_path, str(exc)) from exc

        if identity is not None:
            if cluster_id is not None and identity[0] != cluster_id:
                raise StoreError(
                    f"{self.db_path} belongs to cluster {identity[0]!r}, not {cluster_id!r}: "
                    "point --data-dir at this cluster's directory, or move it aside to join anew"
                )
            if node_id is not None and identity[1] != node_id:
                raise StoreError(
                    f"{self.db_path} belongs to server {identity[1]}, not {node_id}: "
                    "each server needs its own data directory"
                )
        elif cluster_id is not None and node_id is not None:
            db.execute("INSERT INTO identity (id, cluster_id, node_id) VALUES (1, ?, ?)", (cluster_id, node_id))

        snap_index, snap_term, offset_index, offset_term = meta_row if meta_row is not None else (0, 0, 0, 0)
        if offset_index > snap_index:
            raise self._damaged(self.db_path, f"log offset {offset_index} is past the snapshot at {snap_index}")
        self._snapshot = self._load_current_snapshot(snap_index, snap_term)
        self._remove_stray_snapshots(snap_index, snap_term)

        hs = HardState(term=hs_row[0], vote=hs_row[1], commit=hs_row[2]) if hs_row is not None else HardState()
        ents = [Entry(term=offset_term, index=offset_index)]
        discard_from: int | None = None
        for idx, term, kind, data in rows:
            if idx <= offset_index:
                continue  # compacted; a leftover the next compaction removes anyway
            expected = ents[-1].index + 1
            if idx != expected:
                if expected <= hs.commit:
                    raise self._damaged(
                        self.db_path,
                        f"entries {expected}..{idx - 1} are missing but committed (commit index {hs.commit})",
                    )
                discard_from = expected
                break
            if term < ents[-1].term:
                raise self._damaged(
                    self.db_path, f"entry {idx} has term {term}, lower than term {ents[-1].term} before it"
                )
            ents.append(Entry(term=term, index=idx, kind=EntryKind(kind), data=bytes(data)))
        if discard_from is not None:
            self._log.warning(
                "raft.storage.torn_tail", path=str(self.db_path), discarded_from=discard_from,
                kept_last=ents[-1].index,
            )
            db.execute("DELETE FROM entries WHERE idx >= ?", (discard_from,))
        if ents[-1].index < snap_index:
            # What is left of the entries kept behind the snapshot ends before it: the
            # snapshot covers them all, so the log restarts right after it.
            ents = [Entry(term=snap_term, index=snap_index)]
        last = ents[-1].index
        if hs.commit > last:
            raise self._damaged(
                self.db_path, f"the commit index is {hs.commit} but the log ends at {last} (log truncated)"
            )
        self._hard_state = hs
        self._ents = ents

    def _load_current_snapshot(self, index: int, term: int) -> Snapshot:
        if index == 0:
            return Snapshot()
        path = self.directory / snapshot_file_name(term, index)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise self._damaged(path, "the current snapshot file is missing") from None
        except OSError as exc:
            raise self._damaged(path, f"cannot read the current snapshot: {exc}") from exc
        try:
            snap = decode_snapshot_file(raw, str(path))
        except (ValueError, KeyError) as exc:
            raise self._damaged(path, str(exc)) from exc
        if snap.index != index or snap.term != term:
            raise self._damaged(path, f"it describes index {snap.index} term {snap.term}, not its name")
        return snap

    def _remove_stray_snapshots(self, index: int, term: int) -> None:
        current = snapshot_file_name(term, index) if index else None
        for path in sorted(self.directory.iterdir()):
            name = path.name
            if name.startswith("snap-") and (name.endswith(".tmp") or (_SNAP_RE.match(name) and name != current)):
                # A temp file is a snapshot whose write did not finish; a file the metadata
                # does not name is one whose recording (or removal) did not finish.
                self._log.warning("raft.storage.stray_snapshot_removed", path=str(path))
                path.unlink()
        _fsync_dir(self.directory)

    def close(self) -> None:
        if self._deferred_hard_state is not None:
            try:
                self.write(sync=False)
            except StoreError:
                pass  # the commit index is learnt again from the leader
        self._db.close()

    # --- Storage (reads, from memory) ------------------------------------------------

    def initial_state(self) -> tuple[HardState, ConfState]:
        hs = self._hard_state
        if hs.commit < self._snapshot.index:
            hs = HardState(term=hs.term, vote=hs.vote, commit=self._snapshot.index)
        return hs, self._snapshot.meta.conf_state

    # --- the two halves of persisting a Ready ----------------------------------------

    def _crash_point(self, step: str) -> None:
        if self._hook is not None:
            self._hook(step)

    def _effective_entries(self, snapshot: Snapshot | None, entries: Sequence[Entry]) -> list[Entry]:
        """`entries` minus those at or below the compaction point; checks for gaps."""
        if not entries:
            return []
        offset = snapshot.index if snapshot is not None else self._ents[0].index
        last = snapshot.index if snapshot is not None else self.last_index()
        ents = [e for e in entries if e.index > offset]
        if ents and ents[0].index > last + 1:
            raise RaftInvariantError(f"append at {ents[0].index} leaves a gap after last index {last}")
        return ents

    def write(
        self,
        *,
        snapshot: Snapshot | None = None,
        entries: Sequence[Entry] = (),
        hard_state: HardState | None = None,
        sync: bool = True,
    ) -> None:
        """Make a Ready's snapshot, entries and hard state durable (one transaction).

        Does not change what reads see: call `publish` with the same arguments after.
        """
        if snapshot is not None and snapshot.index <= self._snapshot.index:
            raise SnapshotOutOfDate(
                f"snapshot at {snapshot.index} is not newer than the one held at {self._snapshot.index}"
            )
        ents = self._effective_entries(snapshot, entries)
        if hard_state is None:
            hard_state = self._deferred_hard_state
        if snapshot is None and not ents and hard_state is None:
            return
        if snapshot is not None:
            self._write_snapshot_file(snapshot)
        self._set_sync(sync or snapshot is not None)
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            if snapshot is not None:
                db.execute("DELETE FROM entries")
                self._put_meta(snapshot.index, snapshot.term, snapshot.index, snapshot.term)
            if ents:
                if snapshot is None and ents[0].index <= self.last_index():
                    # Replacing a stored suffix (a new leader's entries); a plain append
                    # past the end has nothing to delete.
                    db.execute("DELETE FROM entries WHERE idx >= ?", (ents[0].index,))
                db.executemany(
                    "INSERT INTO entries (idx, term, kind, data) VALUES (?, ?, ?, ?)",
                    [(e.index, e.term, int(e.kind), e.data) for e in ents],
                )
            if hard_state is not None:
                db.execute(
                    "INSERT OR REPLACE INTO hard_state (id, term, vote, commit_index) VALUES (1, ?, ?, ?)",
                    (hard_state.term, hard_state.vote, hard_state.commit),
                )
            self._crash_point("log.before_commit")
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise StoreError(f"cannot write the Raft log {self.db_path}: {exc}") from exc
        self._deferred_hard_state = None
        self._crash_point("log.committed")
        if snapshot is not None:
            self._remove_old_snapshots(keep=snapshot)

    def defer_hard_state(self, hard_state: HardState) -> None:
        """Keep a hard state that only moved the commit index for the next `write`
        (or `close`), instead of a transaction of its own. Term and vote never wait."""
        self._deferred_hard_state = hard_state

    def publish(
        self,
        *,
        snapshot: Snapshot | None = None,
        entries: Sequence[Entry] = (),
        hard_state: HardState | None = None,
    ) -> None:
        """Show what `write` made durable to readers (run on the core's thread)."""
        if snapshot is not None and snapshot.index > self._snapshot.index:
            self._snapshot = snapshot
            self._ents = [Entry(term=snapshot.term, index=snapshot.index)]
        ents = self._effective_entries(None, entries)
        if ents:
            offset = self._ents[0].index
            del self._ents[ents[0].index - offset :]
            self._ents.extend(ents)
        if hard_state is not None:
            self._hard_state = hard_state

    def _set_sync(self, full: bool) -> None:
        if full != self._sync_full:
            self._db.execute(f"PRAGMA synchronous={'FULL' if full else 'NORMAL'}")
            self._sync_full = full

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def _put_meta(self, snap_index: int, snap_term: int, offset_index: int, offset_term: int) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO log_meta (id, snap_index, snap_term, offset_index, offset_term) "
            "VALUES (1, ?, ?, ?, ?)",
            (snap_index, snap_term, offset_index, offset_term),
        )

    def _write_snapshot_file(self, snapshot: Snapshot) -> None:
        final = self.directory / snapshot_file_name(snapshot.term, snapshot.index)
        tmp = final.with_name(final.name + ".tmp")
        raw = encode_snapshot_file(snapshot)
        try:
            with open(tmp, "wb") as f:
                half = len(raw) // 2
                f.write(raw[:half])
                f.flush()
                self._crash_point("snapshot.tmp_half_written")
                f.write(raw[half:])
                f.flush()
                os.fsync(f.fileno())
            self._crash_point("snapshot.tmp_synced")
            os.replace(tmp, final)
            self._crash_point("snapshot.renamed")
            _fsync_dir(self.directory)
            self._crash_point("snapshot.dir_synced")
        except OSError as exc:
            raise StoreError(f"cannot write the Raft snapshot {final}: {exc}") from exc

    def _remove_old_snapshots(self, keep: Snapshot) -> None:
        keep_name = snapshot_file_name(keep.term, keep.index)
        for path in self.directory.glob("snap-*.snap"):
            if path.name != keep_name:
                try:
                    path.unlink()
                except OSError:
                    pass  # retried by the next open's cleanup
        self._crash_point("snapshot.old_removed")

    # --- WritableStorage ---------------------------------------------------------------

    def apply_snapshot(self, snapshot: Snapshot) -> None:
        self.write(snapshot=snapshot)
        self.publish(snapshot=snapshot)

    def append(self, entries: Sequence[Entry]) -> None:
        self.write(entries=entries)
        self.publish(entries=entries)

    def set_hard_state(self, hard_state: HardState) -> None:
        self.write(hard_state=hard_state)
        self.publish(hard_state=hard_state)

    def create_snapshot(self, index: int, conf_state: ConfState, data: bytes) -> Snapshot:
        """Record the state machine's snapshot at applied `index`; the log is kept."""
        snap = self.write_snapshot(index, conf_state, data)
        self.publish_snapshot(snap)
        return snap

    def compact(self, index: int) -> None:
        """Drop entries up to and including `index` (≤ the snapshot index)."""
        if self.write_compaction(index):
            self.publish_compaction(index)

    # --- snapshot and compaction, in two halves like `write`/`publish` -----------------

    def write_snapshot(self, index: int, conf_state: ConfState, data: bytes) -> Snapshot:
        """Make a snapshot of the state machine at applied `index` durable (file, then
        the row naming it); reads still see the old one until `publish_snapshot`."""
        if index <= self._snapshot.index:
            raise SnapshotOutOfDate(
                f"snapshot at {index} is not newer than the one held at {self._snapshot.index}"
            )
        if index > self.last_index():
            raise RaftInvariantError(f"snapshot at {index} is past the last index {self.last_index()}")
        meta = SnapshotMeta(index=index, term=self.term(index), conf_state=conf_state)
        snap = Snapshot(meta=meta, data=data)
        self._write_snapshot_file(snap)
        self._set_sync(True)
        offset = self._ents[0]
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._put_meta(snap.index, snap.term, offset.index, offset.term)
            self._crash_point("snapshot.before_record")
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise StoreError(f"cannot record the Raft snapshot in {self.db_path}: {exc}") from exc
        self._crash_point("snapshot.recorded")
        self._remove_old_snapshots(keep=snap)
        return snap

    def publish_snapshot(self, snapshot: Snapshot) -> None:
        if snapshot.index > self._snapshot.index:
            self._snapshot = snapshot

    def write_compaction(self, index: int) -> bool:
        """Delete stored entries up to `index`; False if there was nothing to do."""
        offset = self._ents[0].index
        if index <= offset:
            return False
        if index > self._snapshot.index:
            raise RaftInvariantError(
                f"compaction to {index} would pass the snapshot at {self._snapshot.index}; "
                "create a snapshot first"
            )
        term = self.term(index)
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM entries WHERE idx <= ?", (index,))
            self._put_meta(self._snapshot.index, self._snapshot.term, index, term)
            self._crash_point("compact.before_commit")
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise StoreError(f"cannot compact the Raft log {self.db_path}: {exc}") from exc
        return True

    def publish_compaction(self, index: int) -> None:
        offset = self._ents[0].index
        if index > offset:
            self._ents = self._ents[index - offset :]

    def __repr__(self) -> str:
        return (
            f"SqliteRaftStorage({str(self.directory)!r}, first={self.first_index()}, last={self.last_index()}, "
            f"hard_state={self._hard_state}, snapshot_index={self._snapshot.index})"
        )
