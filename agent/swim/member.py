"""A member of the gossip group as one agent sees it: who, where, which life, which state.

Rules:
- A member is identified by `name`; `address` is where its UDP and TCP gossip ports are.
- `incarnation` is a counter only the member itself raises (to refute a suspicion, to
  announce new metadata, to come back after being declared dead). Every claim about a
  member carries the incarnation it is about; a claim about an older incarnation is stale.
- The state moves only along `TRANSITIONS`; anything else is a bug and raises
  `IllegalTransition`. DEAD and LEFT are tombstones: they stay for a while so a stale
  "alive" about the same incarnation is recognised and ignored, then they are reaped.
- `meta` is a small, sorted tuple of (key, value) strings (role, gRPC address, labels,
  version); it changes only with a higher incarnation.
- `state_change` is the local time (seconds, the core's injected clock) of the last state
  change in *this* agent's view; it is never sent over the wire.

How it works: `Member` is a frozen value; the core replaces it with `dataclasses.replace`
on every change, so views handed to the shell can never be mutated behind its back.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "Address",
    "Meta",
    "State",
    "Member",
    "TRANSITIONS",
    "IllegalTransition",
    "check_transition",
    "make_meta",
    "meta_size",
]

Address = tuple[str, int]
"""(host, port) of a member's gossip endpoint (UDP for packets, TCP for push-pull)."""

Meta = tuple[tuple[str, str], ...]
"""A member's metadata: (key, value) pairs sorted by key, keys unique."""


class State(enum.Enum):
    """Where a member is in its life, as seen by one agent."""

    ALIVE = "alive"
    SUSPECT = "suspect"  # a probe failed; the member may refute until the suspicion times out
    DEAD = "dead"  # the suspicion timed out (or a peer said so): failed, not departed
    LEFT = "left"  # the member announced its own departure (graceful leave)


# Every legal change of state. ALIVE -> ALIVE (same state, new incarnation or meta) is an
# update, not a transition, and is always allowed.
TRANSITIONS: Mapping[State, frozenset[State]] = {
    State.ALIVE: frozenset({State.SUSPECT, State.DEAD, State.LEFT}),
    State.SUSPECT: frozenset({State.ALIVE, State.DEAD, State.LEFT}),
    # A dead or departed member comes back only by announcing a higher incarnation.
    State.DEAD: frozenset({State.ALIVE, State.LEFT}),
    State.LEFT: frozenset({State.ALIVE}),
}


class IllegalTransition(AssertionError):
    """The core tried a state change the protocol does not allow: a bug, never input."""


def check_transition(old: State, new: State) -> None:
    """Raise `IllegalTransition` unless `old -> new` is in `TRANSITIONS` (or a no-op)."""
    if old is not new and new not in TRANSITIONS[old]:
        raise IllegalTransition(f"member state {old.value} -> {new.value} is not allowed")


def make_meta(items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> Meta:
    """Canonical metadata from a mapping or pairs: sorted by key, later keys win."""
    pairs = items.items() if isinstance(items, Mapping) else items
    merged: dict[str, str] = {}
    for key, value in pairs:
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata keys and values must be strings, got {key!r}: {value!r}")
        merged[key] = value
    return tuple(sorted(merged.items()))


def meta_size(meta: Meta) -> int:
    """Bytes the metadata takes as UTF-8 (keys and values), for the size limit."""
    return sum(len(k.encode()) + len(v.encode()) for k, v in meta)


@dataclass(frozen=True, slots=True, kw_only=True)
class Member:
    """One member in one agent's view."""

    name: str
    address: Address
    incarnation: int
    state: State
    meta: Meta = ()
    state_change: float = 0.0

    @property
    def live(self) -> bool:
        """ALIVE or SUSPECT: still a member, still probed and gossiped to."""
        return self.state is State.ALIVE or self.state is State.SUSPECT

    def meta_dict(self) -> dict[str, str]:
        """The metadata as a fresh dict."""
        return dict(self.meta)

    def meta_get(self, key: str, default: str | None = None) -> str | None:
        """One metadata value, or `default`."""
        for k, v in self.meta:
            if k == key:
                return v
        return default
