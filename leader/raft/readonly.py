"""ReadIndex: linearizable reads without writing to the log (thesis §6.4).

Rules:
- Only a leader that has committed an entry of its own term knows the cluster's commit
  index, so requests that arrive earlier wait until its no-op commits.
- A request records the leader's commit index when it arrives, then waits until a
  majority of voters answered a heartbeat sent *after* it arrived: that proves no newer
  leader existed at that moment, so the recorded index covers every write acknowledged
  before the read started. The requester serves the read once its state machine has
  applied that index (`ReadState`).
- Requests are answered in arrival order. A heartbeat carries the newest pending
  request's context; acks for it confirm every request queued before it too.
- A leader that steps down drops every pending request (the requester times out and
  retries): a deposed leader never answers a read.

How it works: an ordered dict from context (the request id, unique per request) to the
recorded index, requester and the set of voters that acked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ReadState", "ReadIndexStatus", "ReadOnly"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadState:
    """Read `context` may be served once the state machine applied `index`."""

    index: int
    context: bytes


@dataclass(slots=True, kw_only=True)
class ReadIndexStatus:
    """One pending request at the leader."""

    index: int
    requester: int
    context: bytes
    acks: set[int] = field(default_factory=set)


class ReadOnly:
    """The leader's queue of ReadIndex requests waiting for a heartbeat quorum."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending: dict[bytes, ReadIndexStatus] = {}  # insertion-ordered

    def __len__(self) -> int:
        return len(self._pending)

    def add_request(self, index: int, requester: int, context: bytes, self_id: int) -> bool:
        """Queue a request; False if one with this context is already pending."""
        if context in self._pending:
            return False
        self._pending[context] = ReadIndexStatus(
            index=index, requester=requester, context=context, acks={self_id}
        )
        return True

    def recv_ack(self, id: int, context: bytes) -> set[int] | None:
        """Record that `id` answered the heartbeat for `context`; the acks so far."""
        status = self._pending.get(context)
        if status is None:
            return None
        status.acks.add(id)
        return status.acks

    def advance(self, context: bytes) -> list[ReadIndexStatus]:
        """Release the request for `context` and every request queued before it."""
        if context not in self._pending:
            return []
        released: list[ReadIndexStatus] = []
        for ctx in list(self._pending):
            released.append(self._pending.pop(ctx))
            if ctx == context:
                break
        return released

    def last_pending_context(self) -> bytes:
        """The newest pending context, or b"" when none is pending."""
        if not self._pending:
            return b""
        return next(reversed(self._pending))

    def reset(self) -> None:
        self._pending.clear()
