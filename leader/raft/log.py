"""The Raft log as the core sees it: persisted storage plus an unstable tail.

Rules:
- Entries live in two places: `Storage` (persisted by the shell) and `Unstable` (appended
  in memory, handed out by `Ready.entries`, not yet persisted). `unstable.offset` is the
  index of the first unstable entry; reads below it go to storage.
- A snapshot received from a leader is also unstable until the shell persists it; while
  pending it replaces the whole log (first index = snapshot index + 1).
- `committed` never decreases and never passes the last index; `applied` never passes
  `committed`. Committed entries are never truncated: an append that would do so is a
  `RaftInvariantError` (a bug or a corrupted log), never silently accepted.
- Appending at index i discards every entry at or after i (a new leader overwriting an
  uncommitted suffix); storage applies the same rule when the shell persists.
- `stable_to(i, t)` marks the unstable prefix up to i persisted only if entry i still has
  term t: the log may have been overwritten between `ready()` and `advance()`.

How it works: the unstable part is a plain list plus an offset. Terms are looked up in
the unstable part first, then storage; storage raises `LogCompacted`/`LogUnavailable`,
which `term_or_none` turns into "unknown" for the callers that only compare terms.
"""

from __future__ import annotations

from .errors import LogCompacted, LogUnavailable, RaftInvariantError
from .messages import Entry, Snapshot
from .storage import Storage, limit_size

__all__ = ["Unstable", "RaftLog"]


class Unstable:
    """Entries and a snapshot not yet persisted by the shell."""

    __slots__ = ("snapshot", "entries", "offset")

    def __init__(self, offset: int) -> None:
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []
        self.offset = offset

    def maybe_first_index(self) -> int | None:
        return self.snapshot.index + 1 if self.snapshot is not None else None

    def maybe_last_index(self) -> int | None:
        if self.entries:
            return self.offset + len(self.entries) - 1
        if self.snapshot is not None:
            return self.snapshot.index
        return None

    def maybe_term(self, index: int) -> int | None:
        if index < self.offset:
            if self.snapshot is not None and self.snapshot.index == index:
                return self.snapshot.term
            return None
        n = index - self.offset
        if n < len(self.entries):
            return self.entries[n].term
        return None

    def stable_to(self, index: int, term: int) -> None:
        if index < self.offset or self.maybe_term(index) != term:
            return  # overwritten since the Ready was taken; it will be handed out again
        del self.entries[: index + 1 - self.offset]
        self.offset = index + 1

    def stable_snap_to(self, index: int) -> None:
        if self.snapshot is not None and self.snapshot.index == index:
            self.snapshot = None

    def restore(self, snapshot: Snapshot) -> None:
        self.offset = snapshot.index + 1
        self.entries = []
        self.snapshot = snapshot

    def truncate_and_append(self, entries: list[Entry]) -> None:
        after = entries[0].index
        end = self.offset + len(self.entries)
        if after == end:
            self.entries.extend(entries)
        elif after <= self.offset:
            # Replaces the whole unstable tail and part of the stable log; the shell's
            # storage.append drops the stale stored suffix when these are persisted.
            self.offset = after
            self.entries = list(entries)
        else:
            del self.entries[after - self.offset :]
            self.entries.extend(entries)

    def slice(self, lo: int, hi: int) -> list[Entry]:
        return self.entries[lo - self.offset : hi - self.offset]


class RaftLog:
    """Storage + unstable tail + the commit and apply cursors."""

    __slots__ = ("storage", "unstable", "committed", "applied", "max_applying_size")

    def __init__(self, storage: Storage, max_applying_size: int) -> None:
        self.storage = storage
        first = storage.first_index()
        last = storage.last_index()
        self.unstable = Unstable(last + 1)
        # Everything up to the snapshot is committed and applied by definition.
        self.committed = first - 1
        self.applied = first - 1
        self.max_applying_size = max_applying_size

    def __repr__(self) -> str:
        return (
            f"RaftLog(committed={self.committed}, applied={self.applied}, "
            f"unstable.offset={self.unstable.offset}, unstable.len={len(self.unstable.entries)})"
        )

    # --- indexes and terms -----------------------------------------------------------

    def first_index(self) -> int:
        i = self.unstable.maybe_first_index()
        return i if i is not None else self.storage.first_index()

    def last_index(self) -> int:
        i = self.unstable.maybe_last_index()
        return i if i is not None else self.storage.last_index()

    def term(self, index: int) -> int:
        """Term at `index`; raises `LogCompacted`/`LogUnavailable` when out of range."""
        t = self.unstable.maybe_term(index)
        if t is not None:
            return t
        dummy = self.first_index() - 1
        if index < dummy:
            raise LogCompacted(f"index {index} is compacted (first index {dummy + 1})")
        if index > self.last_index():
            raise LogUnavailable(f"index {index} is past the last index {self.last_index()}")
        return self.storage.term(index)

    def term_or_none(self, index: int) -> int | None:
        try:
            return self.term(index)
        except (LogCompacted, LogUnavailable):
            return None

    def last_term(self) -> int:
        return self.term(self.last_index())

    def match_term(self, index: int, term: int) -> bool:
        return self.term_or_none(index) == term

    def is_up_to_date(self, last_index: int, term: int) -> bool:
        """Is a log ending at (last_index, term) at least as up to date as ours (§5.4.1)?"""
        our_term = self.last_term()
        return term > our_term or (term == our_term and last_index >= self.last_index())

    # --- appending -------------------------------------------------------------------

    def maybe_append(self, index: int, log_term: int, commit: int, entries: tuple[Entry, ...]) -> int | None:
        """Follower side of MsgApp: append if our log matches (index, log_term).

        Returns the last index now known to match the leader, or None on a mismatch.
        """
        if not self.match_term(index, log_term):
            return None
        last_new = index + len(entries)
        conflict = self.find_conflict(entries)
        if conflict:
            if conflict <= self.committed:
                raise RaftInvariantError(
                    f"entry {conflict} conflicts with a committed entry (committed={self.committed})"
                )
            self.append(list(entries[conflict - index - 1 :]))
        self.commit_to(min(commit, last_new))
        return last_new

    def find_conflict(self, entries: tuple[Entry, ...]) -> int:
        """Index of the first entry that is new or has a different term here; 0 if none."""
        for e in entries:
            if not self.match_term(e.index, e.term):
                return e.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """The last index ≤ `index` whose term is ≤ `term`, with that term.

        Every entry after it has a term above `term`, so cannot match a log whose entry
        at `index` has `term`: both sides of the fast back-off use this. Returns the
        index with term 0 when terms below are compacted (the caller then probes there).
        """
        last = self.last_index()
        if index > last:
            return index, 0
        while index > 0:
            t = self.term_or_none(index)
            if t is None:
                return index, 0
            if t <= term:
                return index, t
            index -= 1
        return 0, 0

    def append(self, entries: list[Entry]) -> int:
        if not entries:
            return self.last_index()
        after = entries[0].index - 1
        if after < self.committed:
            raise RaftInvariantError(f"append after {after} would truncate committed entries up to {self.committed}")
        self.unstable.truncate_and_append(entries)
        return self.last_index()

    # --- reading ---------------------------------------------------------------------

    def slice(self, lo: int, hi: int, max_size: int) -> list[Entry]:
        """Entries [lo, hi) within `max_size` bytes (at least one); raises if compacted."""
        if lo >= hi:
            return []
        first = self.first_index()
        if lo < first:
            raise LogCompacted(f"index {lo} is compacted (first index {first})")
        if hi > self.last_index() + 1:
            raise LogUnavailable(f"entries up to {hi - 1} asked, last index is {self.last_index()}")
        offset = self.unstable.offset
        ents: list[Entry] = []
        if lo < offset:
            ents = self.storage.entries(lo, min(hi, offset), max_size)
            if len(ents) < min(hi, offset) - lo:
                return ents  # the size limit cut the stored part short
        if hi > offset:
            ents = ents + self.unstable.slice(max(lo, offset), hi)
        return limit_size(ents, max_size)

    def entries_from(self, index: int, max_size: int) -> list[Entry]:
        return self.slice(index, self.last_index() + 1, max_size)

    def unstable_entries(self) -> list[Entry]:
        return list(self.unstable.entries)

    def has_next_committed_entries(self) -> bool:
        return self.committed > max(self.applied, self.first_index() - 1)

    def next_committed_entries(self) -> list[Entry]:
        lo = max(self.applied, self.first_index() - 1) + 1
        if lo > self.committed:
            return []
        return self.slice(lo, self.committed + 1, self.max_applying_size)

    def snapshot(self) -> Snapshot:
        if self.unstable.snapshot is not None:
            return self.unstable.snapshot
        return self.storage.snapshot()

    # --- cursors ---------------------------------------------------------------------

    def commit_to(self, commit: int) -> None:
        if commit <= self.committed:
            return
        if commit > self.last_index():
            raise RaftInvariantError(
                f"commit {commit} is past the last index {self.last_index()}: "
                "the log was truncated or lost"
            )
        self.committed = commit

    def maybe_commit(self, index: int, term: int) -> bool:
        """Advance commit to `index` if that entry is of `term` (the Figure 8 rule)."""
        if index > self.committed and self.term_or_none(index) == term:
            self.commit_to(index)
            return True
        return False

    def applied_to(self, index: int) -> None:
        if index == 0 or index <= self.applied:
            return
        if index > self.committed:
            raise RaftInvariantError(f"applied {index} is past committed {self.committed}")
        self.applied = index

    def stable_to(self, index: int, term: int) -> None:
        self.unstable.stable_to(index, term)

    def stable_snap_to(self, index: int) -> None:
        self.unstable.stable_snap_to(index)

    def restore(self, snapshot: Snapshot) -> None:
        self.committed = snapshot.index
        self.unstable.restore(snapshot)
