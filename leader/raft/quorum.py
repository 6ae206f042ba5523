"""Majority quorums: the commit index a set of voters has reached, and vote tallies.

Rules:
- Only voters count. Learners replicate the log but never make a quorum.
- A quorum of n voters is n // 2 + 1. An empty voter set commits everything and wins
  every vote (so a node with no configuration yet never blocks on itself); the core
  never campaigns without being a voter, so this only matters for the edge case.
- Membership changes are single-server (one voter added or removed at a time), so any
  majority of the old set and any majority of the new set intersect: no joint quorum is
  needed. `raft.py` enforces one pending change at a time.

How it works: the committed index is the (n // 2 + 1)-th largest acknowledged index —
sort descending and take position n // 2.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Mapping

__all__ = ["VoteResult", "quorum_size", "committed_index", "vote_result", "has_quorum"]


class VoteResult(enum.Enum):
    """The outcome of an election so far."""

    PENDING = "pending"
    LOST = "lost"
    WON = "won"


def quorum_size(voters: int) -> int:
    """How many of `voters` make a majority."""
    return voters // 2 + 1


def committed_index(voters: Collection[int], acked: Callable[[int], int]) -> int:
    """The highest index acknowledged by a majority of `voters`.

    `acked(id)` is the last index voter `id` is known to hold (0 if unknown).
    """
    if not voters:
        return 1 << 62  # no voters: nothing to wait for; callers take min() with the log
    indexes = sorted((acked(v) for v in voters), reverse=True)
    return indexes[len(indexes) // 2]


def vote_result(voters: Collection[int], votes: Mapping[int, bool]) -> VoteResult:
    """WON once a majority granted, LOST once a majority can no longer grant."""
    if not voters:
        return VoteResult.WON
    granted = rejected = 0
    for v in voters:
        answer = votes.get(v)
        if answer is True:
            granted += 1
        elif answer is False:
            rejected += 1
    need = quorum_size(len(voters))
    if granted >= need:
        return VoteResult.WON
    if len(voters) - rejected < need:
        return VoteResult.LOST
    return VoteResult.PENDING


def has_quorum(voters: Collection[int], ok: Callable[[int], bool]) -> bool:
    """Do the voters for which `ok(id)` holds form a majority?"""
    if not voters:
        return True
    return sum(1 for v in voters if ok(v)) >= quorum_size(len(voters))
