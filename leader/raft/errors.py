"""Errors the Raft core raises, rooted in `shoal.errors`.

    ShoalError
    ├── Unavailable
    │   ├── NotLeader              this node cannot take the request; `leader_hint` may
    │   │                          name one that can (0 when no leader is known)
    │   └── ProposalDropped        the leader cannot take a proposal right now
    │                              (leadership transfer in progress, node removed)
    ├── Conflict
    │   └── ConfChangeRefused      a membership change cannot be proposed now; `reason`
    ├── StoreError
    │   ├── LogCompacted           an index below the first index of the log was asked for
    │   ├── LogUnavailable         an index past the last index of the log was asked for
    │   ├── SnapshotOutOfDate      a snapshot older than the one held was offered
    │   └── SnapshotTemporarilyUnavailable   storage is building a snapshot; ask later
    └── RaftInvariantError         a bug or a corrupted log: an illegal role transition,
        └── IllegalTransition      a commit past the end of the log, a truncation of
                                   committed entries. Never caught by the core.

`LogCompacted` and `LogUnavailable` are part of the `Storage` protocol: storage raises
them, the core catches them (a compacted index means "send a snapshot instead").
"""

from __future__ import annotations

from shoal.errors import Conflict, ShoalError, StoreError, Unavailable

__all__ = [
    "NotLeader",
    "ProposalDropped",
    "ConfChangeRefused",
    "LogCompacted",
    "LogUnavailable",
    "SnapshotOutOfDate",
    "SnapshotTemporarilyUnavailable",
    "RaftInvariantError",
    "IllegalTransition",
]


class NotLeader(Unavailable):
    """This node is not the leader; `leader_hint` is the leader it knows of, or 0."""

    def __init__(self, leader_hint: int) -> None:
        self.leader_hint = leader_hint
        hint = f"; try node {leader_hint}" if leader_hint else "; no leader is known yet"
        super().__init__(f"this server is not the Raft leader{hint}")


class ProposalDropped(Unavailable):
    """The leader cannot accept a proposal right now; retry shortly."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"proposal dropped: {reason}")


class ConfChangeRefused(Conflict):
    """A membership change cannot be proposed now; `reason` says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"membership change refused: {reason}")


class LogCompacted(StoreError):
    """The requested index is at or below the last snapshot and was compacted away."""


class LogUnavailable(StoreError):
    """The requested index is past the end of the log."""


class SnapshotOutOfDate(StoreError):
    """The offered snapshot is older than the one storage already holds."""


class SnapshotTemporarilyUnavailable(StoreError):
    """Storage cannot produce a snapshot right now; the leader retries later."""


class RaftInvariantError(ShoalError):
    """A Raft invariant does not hold: a bug, or storage that lost or corrupted data."""


class IllegalTransition(RaftInvariantError):
    """A role transition that the protocol never makes (e.g. follower to leader)."""
