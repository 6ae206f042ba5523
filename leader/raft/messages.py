"""The values Raft exchanges and persists: log entries, hard state, snapshots, messages.

Rules:
- Everything here is a frozen, slotted, keyword-only dataclass: a value, compared by
  content, safe to share between the core, storage and the network.
- Node ids are positive integers; `NONE` (0) means "no node" (no vote, no leader).
- Every message carries `src`, `dst` and the sender's `term`. The core's term rules
  (step down on a higher term, reject a lower one) are applied to every message before
  its type is looked at; see `raft.py`.
- An `Entry` is either `NORMAL` (opaque application bytes; empty bytes are the no-op
  a new leader appends) or `CONF_CHANGE` (an encoded `ConfChange`).
- `MsgProp` is the proposal as a value: `Node.propose` steps one locally, and
  `Node.forward` sends one from a follower to the leader (etcd's proposal forwarding).
  A forwarded proposal is fire-and-forget: it is answered by the entries being applied,
  and the forwarding shell re-sends what it did not see applied.

Wire encoding is the transport's job (protobuf, at the edge); only `ConfChange` has a
byte encoding here, because it travels inside `Entry.data` and must be stable.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

__all__ = [
    "NONE",
    "EntryKind",
    "Entry",
    "ENTRY_OVERHEAD",
    "entry_size",
    "HardState",
    "ConfState",
    "SnapshotMeta",
    "Snapshot",
    "ConfChangeKind",
    "ConfChange",
    "Message",
    "MsgProp",
    "MsgApp",
    "MsgAppResp",
    "MsgVote",
    "MsgVoteResp",
    "MsgPreVote",
    "MsgPreVoteResp",
    "MsgHeartbeat",
    "MsgHeartbeatResp",
    "MsgSnap",
    "MsgReadIndex",
    "MsgReadIndexResp",
    "MsgTimeoutNow",
    "MsgTransferLeader",
]

NONE = 0
"""The id of no node: no vote cast, no leader known."""


class EntryKind(enum.IntEnum):
    """What an entry's data means."""

    NORMAL = 0
    CONF_CHANGE = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """One log entry: its position (`index`), the leader term that created it, data."""

    term: int
    index: int
    kind: EntryKind = EntryKind.NORMAL
    data: bytes = b""


ENTRY_OVERHEAD = 24
"""Bytes an entry costs beyond its data (term, index, kind, framing) in size limits."""


def entry_size(entry: Entry) -> int:
    """The size an entry counts for in `max_size_per_msg` and similar limits."""
    return len(entry.data) + ENTRY_OVERHEAD


@dataclass(frozen=True, slots=True, kw_only=True)
class HardState:
    """What must be on disk before a node speaks: current term, vote in it, commit."""

    term: int = 0
    vote: int = NONE
    commit: int = 0

    def is_empty(self) -> bool:
        return self.term == 0 and self.vote == NONE and self.commit == 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfState:
    """The cluster membership: voters count for quorums, learners only receive the log."""

    voters: frozenset[int] = field(default_factory=frozenset)
    learners: frozenset[int] = field(default_factory=frozenset)

    def members(self) -> frozenset[int]:
        return self.voters | self.learners


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotMeta:
    """Where a snapshot stands in the log and the membership at that point."""

    index: int = 0
    term: int = 0
    conf_state: ConfState = field(default_factory=ConfState)


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """A state-machine snapshot: metadata plus the application's opaque bytes."""

    meta: SnapshotMeta = field(default_factory=SnapshotMeta)
    data: bytes = b""

    @property
    def index(self) -> int:
        return self.meta.index

    @property
    def term(self) -> int:
        return self.meta.term

    def is_empty(self) -> bool:
        return self.meta.index == 0


class ConfChangeKind(enum.IntEnum):
    """A single membership change. Adding a learner as a voter promotes it."""

    ADD_VOTER = 0
    ADD_LEARNER = 1
    REMOVE_NODE = 2


_CC_VERSION = 1
_CC_HEADER = struct.Struct(">BBQ")  # version, kind, node id


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfChange:
    """A membership change proposal; `context` is opaque (e.g. the new server's address)."""

    kind: ConfChangeKind
    node_id: int
    context: bytes = b""

    def encode(self) -> bytes:
        return _CC_HEADER.pack(_CC_VERSION, int(self.kind), self.node_id) + self.context

    @classmethod
    def decode(cls, data: bytes) -> ConfChange:
        if len(data) < _CC_HEADER.size:
            raise ValueError(f"conf change is {len(data)} bytes, shorter than its header")
        version, kind, node_id = _CC_HEADER.unpack_from(data)
        if version != _CC_VERSION:
            raise ValueError(f"conf change encoding version {version} is not supported")
        return cls(kind=ConfChangeKind(kind), node_id=node_id, context=data[_CC_HEADER.size :])


# --- messages -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """Fields every message has. Never sent as such; see the subclasses."""

    src: int
    dst: int
    term: int


@dataclass(frozen=True, slots=True, kw_only=True)
class MsgProp(Message):
    """A proposal of new entries (`Node.propose` steps one locally; a follower's
    `Node.forward` sends one to the leader). Entry terms and indexes are 0: the leader
    assigns them."""

    entries: tuple[Entry, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class MsgApp(Message):
    """Leader → follower: entries following (`index`, `log_term`), and the commit index."""

    log_term: int
    index: int
    entries: tuple[Entry, ...] = ()
    commit: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class MsgAppResp(Message):
    """Follower → leader. Accepted: `index` is the last index now matching the leader.

    Rejected: `index` is the rejected `MsgApp.index`; (`reject_hint`, `log_term`) is the
    follower's last entry at or below it whose term is ≤ the leader's `log_term`, so the
    leader can skip a whole conflicting term per round trip (fast back-off).
    """

    index: int
    reject: bool = False
    reject_hint: int = 0
    log_term: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class MsgVote(Message):
    """Candidate → voter: vote for me in `term`; my log ends at (`last_index`, `last_term`).

    `transfer` marks an election started by a leadership transfer: voters grant it even
    inside a leader lease, because the current leader asked for it.
    """

    last_index: int
    last_term: int
    transfer: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class MsgVoteResp(Message):
    """Voter → candidate: granted unless `reject`."""

    reject: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class MsgPreVote(Message):
    """Would you vote for me in `term` (my current term + 1)? Changes no one's term."""

    last_index: int
    last_term: int


@dataclass(frozen=True, slots=True, kw_only=True)
class MsgPreVoteResp(Message):
    """Answer to `MsgPreVote`. A grant carries the proposed term, a rejection ours."""

    reject: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class MsgHeartbeat(Message):
    """Leader → follower: I am alive. `commit` is capped at what the follower matches.

    `context` is the newest pending ReadIndex request's id, echoed in the response.
    """

    commit: int = 0
    context: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class MsgHeartbeatResp(Message):
    """Follower → leader: heartbeat received (an ack for the ReadIndex `context`)."""

    context: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class MsgSnap(Message):
    """Leader → follower: install this snapshot (the transport chunks the data)."""

    snapshot: Snapshot


@dataclass(frozen=True, slots=True, kw_only=True)
class MsgReadIndex(Message):
    """Follower → leader: at what commit index may I serve read `context`?"""

    context: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class MsgReadIndexResp(Message):
    """Leader → follower: serve read `context` once applied ≥ `index`."""

    index: int
    context: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class MsgTimeoutNow(Message):
    """Leader → transferee: campaign now (leadership transfer), skipping pre-vote."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MsgTransferLeader(Message):
    """Any node → leader: hand leadership to `transferee`."""

    transferee: int
