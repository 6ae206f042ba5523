"""gRPC metadata keys shoal's servers and agents exchange."""

from __future__ import annotations

__all__ = ["FORWARDED", "LEADER_HINT"]

FORWARDED = "shoal-forwarded"
"""On a request one server forwards to the leader: it is forwarded at most once, so two
servers with different ideas of who leads never bounce it between them."""

LEADER_HINT = "shoal-leader"
"""Trailing metadata on a follower's refusal of leader-only work: the leader's gRPC
address, so the caller goes there next instead of searching."""
