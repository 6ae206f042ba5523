"""The state store: where the leader's controllers and the API read and write state.

Rules:
- Reads are served from the in-memory `ClusterState` (`store.state`), never from disk.
- `commit(txn)` returns only once the transaction is durable (here: in SQLite, fsync'd;
  with Raft: committed by a quorum) and applied to `state`. A write that was not
  acknowledged may or may not have happened; one that was is never lost.
- `wait(revision)` resolves once the state has moved past `revision`: controllers and
  watchers use it instead of polling.
- Read-modify-write goes through `update(build)`: the transaction is built from the
  current state and guarded by what it read (`Txn.guarded`); if another write changed
  one of its objects first, it is built again from the new state.

`Store` is the interface; `SqliteStore` is the single-server backend that the dev agent
used before servers replicated their state, kept for tests; every agent now runs
`RaftStore` (`shoal.leader.replicated`), which implements the same interface.
"""

from __future__ import annotations

import abc
import asyncio
import json
import pathlib
import sqlite3
from collections.abc import Callable

from shoal.errors import Conflict, StoreError
from shoal.leader.state import EVENTS_KEPT, KINDS, ClusterState, Delete, Put, Txn

__all__ = ["Store", "SqliteStore", "MemoryStore"]


class Store(abc.ABC):
    """A durable, linearizable home for the cluster state."""

    def __init__(self) -> None:
        self.state = ClusterState()
        self._changed = asyncio.Condition()
        self._commit_lock = asyncio.Lock()

    @abc.abstractmethod
    async def _persist(self, txn: Txn, state_after: ClusterState) -> None:
        """Make `txn` durable; raise StoreError if it could not be."""

    async def commit(self, txn: Txn) -> int:
        """Make `txn` durable, apply it, wake watchers; returns the new revision.

        Cancelling the caller does not cancel the commit: once a write may have reached
        disk it is applied in memory too, or memory and disk would disagree.
        """
        if not txn:
            return self.state.revision
        # Reject a malformed transaction before it reaches disk, so it never half-applies.
        unknown = sorted({op.kind for op in txn.ops if op.kind not in KINDS})
        if unknown:
            raise StoreError(f"unknown kinds in transaction: {', '.join(unknown)}")
        return await asyncio.shield(self._commit(txn))

    async def update(self, build: Callable[[ClusterState], Txn], *, attempts: int = 10) -> int | None:
        """Commit what `build(state)` returns, guarded against concurrent changes to the
        objects it writes; rebuilt from the new state on a conflict. Returns the new
        revision, or None when `build` had nothing to do."""
        for attempt in range(attempts):
            state = self.state
            txn = build(state)
            if not txn:
                return None
            try:
                return await self.commit(txn.guarded(state))
            except Conflict:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    async def _commit(self, txn: Txn) -> int:
        # One commit at a time from persist to apply: the revision and event numbers a
        # transaction is written with are the ones it gets in memory.
        async with self._commit_lock:
            self.state.check(txn)  # before disk: a refused transaction writes nothing
            await self._persist(txn, self.state)
            revision = self.state.apply(txn)
        async with self._changed:
            self._changed.notify_all()
        return revision

    async def wait(self, revision: int, timeout: float | None = None) -> int:
        """Wait until the state's revision exceeds `revision` (or the timeout passes)."""

        async def _wait() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: self.state.revision > revision)

        try:
            await asyncio.wait_for(_wait(), timeout)
        except TimeoutError:
            pass
        return self.state.revision

    async def close(self) -> None:
        """Release resources."""


class MemoryStore(Store):
    """Not durable: for unit tests of controllers and the API."""

    async def _persist(self, txn: Txn, state_after: ClusterState) -> None:
        return None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (kind TEXT NOT NULL, name TEXT NOT NULL, value TEXT NOT NULL,
                                    mod INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (kind, name));
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class SqliteStore(Store):
    """The single-server durable store: one SQLite file in WAL mode, fsync on commit."""

    def __init__(self, path: pathlib.Path) -> None:
        super().__init__()
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: the WAL is fsync'd at every commit, so an acknowledged write survives
            # a power cut, not just a process crash.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._load()
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"cannot open the state database {path}: {exc}. "
                "If the file is damaged, move it aside to start with an empty state."
            ) from exc

    def _load(self) -> None:
        state = self.state
        for kind, name, value, mod in self._db.execute("SELECT kind, name, value, mod FROM objects"):
            if kind in state.collections:
                state.collections[kind][name] = json.loads(value)
                state.mods[kind][name] = int(mod)
        for (value,) in self._db.execute("SELECT value FROM events ORDER BY seq"):
            state.events.append(json.loads(value))
        meta = dict(self._db.execute("SELECT key, value FROM meta"))
        state.revision = int(meta.get("revision", 0))
        state.next_event_seq = int(meta.get("next_event_seq", 1))

    async def _persist(self, txn: Txn, state_before: ClusterState) -> None:
        await asyncio.to_thread(self._write, txn, state_before.revision, state_before.next_event_seq)

    def _write(self, txn: Txn, revision: int, next_seq: int) -> None:
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            for op in txn.ops:
                if isinstance(op, Put):
                    db.execute(
                        "INSERT OR REPLACE INTO objects (kind, name, value, mod) VALUES (?, ?, ?, ?)",
                        (op.kind, op.name, json.dumps(op.value, sort_keys=True), revision + 1),
                    )
                elif isinstance(op, Delete):
                    db.execute("DELETE FROM objects WHERE kind = ? AND name = ?", (op.kind, op.name))
            seq = next_seq
            for e in txn.events:
                value = {"seq": seq, "time": e.time, "type": e.type, "reason": e.reason,
                         "object": e.object, "message": e.message}
                db.execute("INSERT INTO events (seq, value) VALUES (?, ?)", (seq, json.dumps(value)))
                seq += 1
            if txn.events:
                db.execute("DELETE FROM events WHERE seq <= ?", (seq - 1 - EVENTS_KEPT,))
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('revision', ?)", (revision + 1,))
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('next_event_seq', ?)", (seq,))
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise StoreError(f"cannot write the state database {self.path}: {exc}") from exc

    async def close(self) -> None:
        async with self._commit_lock:
            self._db.close()
