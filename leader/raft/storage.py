"""The storage seam: what the core reads from durable storage, and an in-memory twin.

Rules:
- The core only *reads* storage (`Storage`). The shell writes it, in the order a
  `Ready` prescribes: snapshot, then entries, then hard state (`WritableStorage`).
- Indexes: the log holds entries `first_index() .. last_index()`; everything at or
  below the snapshot index is compacted. `term(first_index() - 1)` is still answered
  (it is the snapshot's term), which is what lets a leader send the entry after it.
- Out-of-range reads raise `LogCompacted` (at or below the compaction point, except
  the term just described) or `LogUnavailable` (past the end). The core relies on
  these two exceptions: compacted means "send a snapshot instead".
- `append(entries)` replaces every stored entry at or after `entries[0].index`: a new
  leader may overwrite an uncommitted suffix. Entries at or below the snapshot are
  ignored. A SQLite implementation does the delete and the insert in one transaction.
- `create_snapshot` records the state machine's snapshot at an applied index;
  `compact(i)` then drops entries up to `i` (≤ the snapshot index), keeping `term(i)`.

`MemoryStorage` is the twin used by tests and the simulator; there, "durable" means
whatever the simulator did not throw away on a crash.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from .errors import LogCompacted, LogUnavailable, RaftInvariantError, SnapshotOutOfDate
from .messages import ConfState, Entry, HardState, Snapshot, SnapshotMeta, entry_size

__all__ = ["Storage", "WritableStorage", "LogView", "MemoryStorage", "limit_size"]


class Storage(Protocol):
    """What the Raft core reads: the persisted log, hard state and latest snapshot."""

    def initial_state(self) -> tuple[HardState, ConfState]:
        """The persisted hard state and the membership as of the latest snapshot."""
        ...

    def entries(self, lo: int, hi: int, max_size: int) -> list[Entry]:
        """Entries [lo, hi), cut after `max_size` bytes but never empty if lo < hi."""
        ...

    def term(self, index: int) -> int:
        """The term of the entry at `index` (first_index() - 1 is the snapshot's)."""
        ...

    def first_index(self) -> int:
        """Index of the first entry held (snapshot index + 1)."""
        ...

    def last_index(self) -> int:
        """Index of the last entry held (the snapshot index if none)."""
        ...

    def snapshot(self) -> Snapshot:
        """The latest snapshot (may raise `SnapshotTemporarilyUnavailable`)."""
        ...


class WritableStorage(Storage, Protocol):
    """What the shell writes, in Ready order: snapshot, entries, hard state."""

    def apply_snapshot(self, snapshot: Snapshot) -> None:
        """Replace the whole log with a snapshot received from the leader."""
        ...

    def append(self, entries: Sequence[Entry]) -> None:
        """Persist entries, replacing any stored at or after the first one's index."""
        ...

    def set_hard_state(self, hard_state: HardState) -> None:
        """Persist term, vote and commit."""
        ...

    def create_snapshot(self, index: int, conf_state: ConfState, data: bytes) -> Snapshot:
        """Record the state machine's snapshot at applied `index`."""
        ...

    def compact(self, index: int) -> None:
        """Drop entries up to and including `index` (≤ the snapshot index)."""
        ...


def limit_size(entries: list[Entry], max_size: int) -> list[Entry]:
    """The longest prefix of `entries` within `max_size` bytes, but at least one entry."""
    if len(entries) <= 1:
        return entries
    total = entry_size(entries[0])
    for n in range(1, len(entries)):
        total += entry_size(entries[n])
        if total > max_size:
            return entries[:n]
    return entries


class LogView:
    """The read half of a storage that keeps its log in memory (`_ents`, `_snapshot`,
    `_hard_state`): shared by `MemoryStorage` and the SQLite store, which mirrors its
    disk in memory and serves every read from there.

    `_ents[0]` is a dummy entry standing for the snapshot (its index and term), so
    `term(first_index() - 1)` needs no special case.
    """

    __slots__ = ()
    _hard_state: HardState
    _snapshot: Snapshot
    _ents: list[Entry]

    @property
    def hard_state(self) -> HardState:
        return self._hard_state

    def first_index(self) -> int:
        return self._ents[0].index + 1

    def last_index(self) -> int:
        return self._ents[0].index + len(self._ents) - 1

    def term(self, index: int) -> int:
        offset = self._ents[0].index
        if index < offset:
            raise LogCompacted(f"index {index} is compacted (first index {offset + 1})")
        if index - offset >= len(self._ents):
            raise LogUnavailable(f"index {index} is past the last index {self.last_index()}")
        return self._ents[index - offset].term

    def entries(self, lo: int, hi: int, max_size: int) -> list[Entry]:
        offset = self._ents[0].index
        if lo <= offset:
            raise LogCompacted(f"index {lo} is compacted (first index {offset + 1})")
        if hi > self.last_index() + 1:
            raise LogUnavailable(f"entries up to {hi - 1} asked, last index is {self.last_index()}")
        return limit_size(self._ents[lo - offset : hi - offset], max_size)

    def snapshot(self) -> Snapshot:
        return self._snapshot


class MemoryStorage(LogView):
    """An in-memory `WritableStorage`: the test and simulator twin of the SQLite store.

    `_ents[0]` is a dummy entry standing for the snapshot (its index and term), so
    `term(first_index() - 1)` needs no special case.
    """

    __slots__ = ("_hard_state", "_snapshot", "_ents")

    def __init__(self) -> None:
        self._hard_state = HardState()
        self._snapshot = Snapshot()
        self._ents: list[Entry] = [Entry(term=0, index=0)]

    # --- Storage -------------------------------------------------------------------

    def initial_state(self) -> tuple[HardState, ConfState]:
        return self._hard_state, self._snapshot.meta.conf_state

    # --- WritableStorage -------------------------------------------------------------

    def set_hard_state(self, hard_state: HardState) -> None:
        self._hard_state = hard_state

    def apply_snapshot(self, snapshot: Snapshot) -> None:
        if snapshot.index <= self._snapshot.index:
            raise SnapshotOutOfDate(
                f"snapshot at {snapshot.index} is not newer than the one held at {self._snapshot.index}"
            )
        self._snapshot = snapshot
        self._ents = [Entry(term=snapshot.term, index=snapshot.index)]

    def append(self, entries: Sequence[Entry]) -> None:
        if not entries:
            return
        offset = self._ents[0].index
        first_new = entries[0].index
        if first_new + len(entries) - 1 <= offset:
            return  # all compacted already
        if first_new <= offset:
            entries = entries[offset + 1 - first_new :]
            first_new = offset + 1
        if first_new > self.last_index() + 1:
            raise RaftInvariantError(
                f"append at {first_new} leaves a gap after last index {self.last_index()}"
            )
        del self._ents[first_new - offset :]
        self._ents.extend(entries)

    def create_snapshot(self, index: int, conf_state: ConfState, data: bytes) -> Snapshot:
        if index <= self._snapshot.index:
            raise SnapshotOutOfDate(
                f"snapshot at {index} is not newer than the one held at {self._snapshot.index}"
            )
        if index > self.last_index():
            raise RaftInvariantError(f"snapshot at {index} is past the last index {self.last_index()}")
        meta = SnapshotMeta(index=index, term=self.term(index), conf_state=conf_state)
        self._snapshot = Snapshot(meta=meta, data=data)
        return self._snapshot

    def compact(self, index: int) -> None:
        offset = self._ents[0].index
        if index <= offset:
            return  # already compacted
        if index > self._snapshot.index:
            raise RaftInvariantError(
                f"compaction to {index} would pass the snapshot at {self._snapshot.index}; "
                "create a snapshot first"
            )
        self._ents = self._ents[index - offset :]

    def __repr__(self) -> str:
        return (
            f"MemoryStorage(first={self.first_index()}, last={self.last_index()}, "
            f"hard_state={self._hard_state}, snapshot_index={self._snapshot.index})"
        )
