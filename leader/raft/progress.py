"""What a leader knows about each follower's log, and how fast it may send to it.

States (per follower):
- PROBE: we do not know where the follower's log matches ours. Send one MsgApp at a
  time and wait for its answer (or the next heartbeat answer) before sending another;
  each rejection moves `next` back, a whole conflicting term at a time.
- REPLICATE: the follower matched at `match`; stream entries optimistically (advance
  `next` as soon as a MsgApp is sent: pipelining), bounded by the inflights window.
- SNAPSHOT: the entries it needs are compacted; a snapshot is on its way and nothing
  else is sent until the shell reports the snapshot delivered or failed.

Transitions: PROBE → REPLICATE on the first acceptance; REPLICATE → PROBE on a
rejection, an unreachable report or a stall (the follower answers heartbeats but
acknowledged nothing for `STALL_HEARTBEATS` of them: appends were lost); any →
SNAPSHOT when the entries are compacted; SNAPSHOT → PROBE when it is reported done or
failed, or when the follower acknowledges an index at or past the snapshot.

`Inflights` is the pipelining window: one slot per MsgApp sent in REPLICATE (its last
index and bytes), freed when an acknowledgement covers it.
"""

from __future__ import annotations

import enum
from collections import deque

from . import quorum
from .messages import ConfState

__all__ = ["ProgressState", "Inflights", "Progress", "ProgressTracker", "STALL_HEARTBEATS"]

STALL_HEARTBEATS = 3
"""Heartbeat answers in REPLICATE with no acknowledged progress while entries are
outstanding, after which the leader assumes its appends were lost and probes again.
Acks and heartbeat answers leave the follower in the same Ready after the same fsync,
so three heartbeat periods without an ack means loss, not a slow disk."""


class ProgressState(enum.Enum):
    PROBE = "probe"
    REPLICATE = "replicate"
    SNAPSHOT = "snapshot"


class Inflights:
    """A window of MsgApps in flight to one follower: (last index, bytes) per message."""

    __slots__ = ("_window", "_bytes", "capacity", "max_bytes")

    def __init__(self, capacity: int, max_bytes: int = 0) -> None:
        self._window: deque[tuple[int, int]] = deque()
        self._bytes = 0
        self.capacity = capacity
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self._window)

    @property
    def bytes(self) -> int:
        return self._bytes

    def full(self) -> bool:
        return len(self._window) >= self.capacity or (0 < self.max_bytes <= self._bytes)

    def add(self, index: int, size: int) -> None:
        if self.full():
            raise OverflowError("inflights window is full; check full() before sending")
        self._window.append((index, size))
        self._bytes += size

    def free_le(self, index: int) -> None:
        """Free every message whose last index is ≤ `index` (acknowledged)."""
        w = self._window
        while w and w[0][0] <= index:
            self._bytes -= w.popleft()[1]

    def free_first_one(self) -> None:
        if self._window:
            self._bytes -= self._window.popleft()[1]

    def reset(self) -> None:
        self._window.clear()
        self._bytes = 0


class Progress:
    """The leader's view of one follower (or of itself)."""

    __slots__ = (
        "match",
        "next",
        "state",
        "pending_snapshot",
        "recent_active",
        "probe_sent",
        "inflights",
        "is_learner",
        "stalled_heartbeats",
        "sent_commit",
    )

    def __init__(self, *, next: int, inflights: Inflights, is_learner: bool = False) -> None:
        self.match = 0
        self.next = next
        self.state = ProgressState.PROBE
        self.pending_snapshot = 0
        # A new follower counts as active until the first check-quorum round has had
        # a chance to hear from it.
        self.recent_active = True
        self.probe_sent = False
        self.inflights = inflights
        self.is_learner = is_learner
        self.stalled_heartbeats = 0
        # The commit index carried by the last append sent (a later one that brings no
        # entries is only worth sending if the commit index moved since).
        self.sent_commit = 0

    def __repr__(self) -> str:
        return (
            f"Progress({self.state.value} match={self.match} next={self.next}"
            f"{' learner' if self.is_learner else ''}"
            f"{f' pending_snapshot={self.pending_snapshot}' if self.pending_snapshot else ''}"
            f" inflight={len(self.inflights)})"
        )

    def _reset_state(self, state: ProgressState) -> None:
        self.probe_sent = False
        self.pending_snapshot = 0
        self.state = state
        self.stalled_heartbeats = 0
        self.inflights.reset()

    def become_probe(self) -> None:
        if self.state is ProgressState.SNAPSHOT:
            pending = self.pending_snapshot
            self._reset_state(ProgressState.PROBE)
            self.next = max(self.match + 1, pending + 1)
        else:
            self._reset_state(ProgressState.PROBE)
            self.next = self.match + 1

    def become_replicate(self) -> None:
        self._reset_state(ProgressState.REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, snapshot_index: int) -> None:
        self._reset_state(ProgressState.SNAPSHOT)
        self.pending_snapshot = snapshot_index

    def maybe_update(self, index: int) -> bool:
        """The follower acknowledged `index`; False if that is old news."""
        updated = False
        if self.match < index:
            self.match = index
            self.probe_sent = False
            self.stalled_heartbeats = 0
            updated = True
        if self.next < index + 1:
            self.next = index + 1
        return updated

    def maybe_decr_to(self, rejected: int, match_hint: int) -> bool:
        """The follower rejected a MsgApp at `rejected`; move `next` back. False if stale."""
        if self.state is ProgressState.REPLICATE:
            if rejected <= self.match:
                return False  # an answer to an append sent before the last match
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False  # not an answer to the probe in flight
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.probe_sent = False
        return True

    def is_paused(self) -> bool:
        if self.state is ProgressState.PROBE:
            return self.probe_sent
        if self.state is ProgressState.REPLICATE:
            return self.inflights.full()
        return True

    def sent_entries(self, last_index: int, size: int) -> None:
        """A MsgApp carrying entries up to `last_index` (`size` bytes) was sent."""
        if self.state is ProgressState.REPLICATE:
            if last_index >= self.next:
                self.inflights.add(last_index, size)
                self.next = last_index + 1
        elif self.state is ProgressState.PROBE:
            self.probe_sent = True


class ProgressTracker:
    """Membership plus one `Progress` per member, and the votes of the current election."""

    __slots__ = ("voters", "learners", "progress", "votes", "_max_inflight", "_max_inflight_bytes")

    def __init__(self, max_inflight: int, max_inflight_bytes: int = 0) -> None:
        self.voters: frozenset[int] = frozenset()
        self.learners: frozenset[int] = frozenset()
        self.progress: dict[int, Progress] = {}
        self.votes: dict[int, bool] = {}
        self._max_inflight = max_inflight
        self._max_inflight_bytes = max_inflight_bytes

    def conf_state(self) -> ConfState:
        return ConfState(voters=self.voters, learners=self.learners)

    def is_voter(self, id: int) -> bool:
        return id in self.voters

    def new_progress(self, next: int, is_learner: bool) -> Progress:
        return Progress(
            next=next,
            inflights=Inflights(self._max_inflight, self._max_inflight_bytes),
            is_learner=is_learner,
        )

    def apply_conf(self, conf: ConfState, next_index: int) -> None:
        """Switch to `conf`: keep the progress of members that stay, add new ones."""
        self.voters = conf.voters
        self.learners = conf.learners
        members = conf.voters | conf.learners
        for id in list(self.progress):
            if id not in members:
                del self.progress[id]
        for id in members:
            pr = self.progress.get(id)
            if pr is None:
                self.progress[id] = self.new_progress(next_index, id in conf.learners)
            else:
                pr.is_learner = id in conf.learners

    def reset_progress(self, next_index: int) -> None:
        for id in self.progress:
            self.progress[id] = self.new_progress(next_index, id in self.learners)

    def committed(self) -> int:
        progress = self.progress
        return quorum.committed_index(self.voters, lambda id: progress[id].match)

    def quorum_active(self) -> bool:
        progress = self.progress
        return quorum.has_quorum(self.voters, lambda id: progress[id].recent_active)

    def record_vote(self, id: int, granted: bool) -> None:
        self.votes.setdefault(id, granted)

    def tally(self) -> quorum.VoteResult:
        return quorum.vote_result(self.voters, self.votes)

    def reset_votes(self) -> None:
        self.votes = {}
