"""Balancing tables and endpoint pickers: how a request chooses a replica, with no I/O.

The leader publishes one `Table` per service (its endpoints, sorted by replica id so every
agent holds the same list, and a version that moves only when the content does). The
agent's service proxy and the client library's resolver both turn a table into a
`Picker` with `make_picker` and call `pick()` once per connection or request. Nothing here
reads a clock, touches the network or uses the global `random`; chance comes from an
injected `random.Random`.

Rules
- `pick(exclude)` returns an endpoint whose replica id is not in `exclude` (the
  endpoints that just failed to connect for this request), or None when none is left.
- `update(endpoints)` swaps in a new endpoint list and keeps what state still makes
  sense: round robin keeps counting, smooth weighted keeps the current weight of every
  endpoint that remains. Pickers are not thread-safe; each proxy loop owns its own.

The algorithms
- Round robin, the seed's formula: with R the number of picks so far (0-based) and N
  endpoints, request R goes to endpoint number S = (R mod N) + 1 (1-based) of the table.
  An excluded endpoint is skipped forward to the next one that is not, wrapping around;
  the skip does not move the counter further, so the next request still goes to slot
  ((R + 1) mod N) + 1.
- Random: uniform over the endpoints not excluded.
- Smooth weighted round robin (nginx's): on every pick each eligible endpoint's current
  weight grows by its weight, the largest current weight wins (first in table order on a
  tie) and loses the sum of the eligible weights. Over any window of sum(weights) picks
  each endpoint is chosen exactly weight times, interleaved rather than in bursts: 5:1:1
  gives a a b a c a a. Weight 0 drains an endpoint: it is never picked.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from shoal.model import Algorithm

__all__ = [
    "Endpoint",
    "Table",
    "Picker",
    "RoundRobin",
    "Random",
    "SmoothWeighted",
    "make_picker",
    "round_robin_slot",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """One ready replica of a service: where to connect and how much traffic it takes."""

    replica_id: str
    address: str
    port: int
    weight: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Table:
    """A service's balancing table as the leader publishes it.

    `endpoints` are sorted by replica id; `version` increases by one each time the
    algorithm or the endpoints change, so an agent can ignore a table it already has.
    """

    service: str
    algorithm: Algorithm
    version: int
    endpoints: tuple[Endpoint, ...]


def round_robin_slot(r: int, n: int) -> int:
    """The seed's round robin: request number r (0-based) of n endpoints goes to slot
    S = (r mod n) + 1, counted from 1."""
    if n <= 0:
        raise ValueError("round robin needs at least one endpoint")
    return (r % n) + 1


class Picker(Protocol):
    """Chooses an endpoint for each request; see the module docstring for the rules."""

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints currently picked from."""
        ...

    def pick(self, exclude: frozenset[str] = frozenset()) -> Endpoint | None:
        """An endpoint whose replica id is not in `exclude`, or None if there is none."""
        ...

    def update(self, endpoints: Iterable[Endpoint]) -> None:
        """Pick from `endpoints` from now on, keeping the state that still applies."""
        ...


class RoundRobin:
    """The seed's round robin: request R goes to endpoint S = (R mod N) + 1.

    R counts the picks that returned an endpoint, retries included, and is never reset:
    a table update changes N, not R, so traffic does not restart at the first endpoint
    every time a replica comes or goes.
    """

    __slots__ = ("_endpoints", "_count")

    def __init__(self, endpoints: Iterable[Endpoint] = ()) -> None:
        self._endpoints = tuple(endpoints)
        self._count = 0

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self._endpoints

    @property
    def count(self) -> int:
        """R: how many picks have returned an endpoint so far."""
        return self._count

    def pick(self, exclude: frozenset[str] = frozenset()) -> Endpoint | None:
        eps = self._endpoints
        n = len(eps)
        if n == 0:
            return None
        start = round_robin_slot(self._count, n) - 1
        for step in range(n):
            ep = eps[(start + step) % n]
            if ep.replica_id not in exclude:
                self._count += 1
                return ep
        return None

    def update(self, endpoints: Iterable[Endpoint]) -> None:
        self._endpoints = tuple(endpoints)


class Random:
    """Uniform choice among the endpoints not excluded, from the injected rng."""

    __slots__ = ("_endpoints", "_rng")

    def __init__(self, endpoints: Iterable[Endpoint], rng: random.Random) -> None:
        self._endpoints = tuple(endpoints)
        self._rng = rng

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self._endpoints

    def pick(self, exclude: frozenset[str] = frozenset()) -> Endpoint | None:
        eps = self._endpoints
        if exclude:
            eps = tuple(e for e in eps if e.replica_id not in exclude)
        if not eps:
            return None
        return eps[self._rng.randrange(len(eps))]

    def update(self, endpoints: Iterable[Endpoint]) -> None:
        self._endpoints = tuple(endpoints)


class SmoothWeighted:
    """nginx's smooth weighted round robin; see the module docstring.

    Invariant: with no endpoint excluded, the current weights add up to the same number
    after every pick (each pick adds the total and takes it back), and `update`
    re-centres them near zero, so they stay bounded however often the table changes.
    """

    __slots__ = ("_endpoints", "_current")

    def __init__(self, endpoints: Iterable[Endpoint] = ()) -> None:
        self._endpoints: tuple[Endpoint, ...] = ()
        self._current: list[int] = []
        self.update(endpoints)

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self._endpoints

    @property
    def current_weights(self) -> dict[str, int]:
        """Each endpoint's current weight, by replica id (for tests and debugging)."""
        return {e.replica_id: c for e, c in zip(self._endpoints, self._current)}

    def pick(self, exclude: frozenset[str] = frozenset()) -> Endpoint | None:
        eps = self._endpoints
        cur = self._current
        total = 0
        best = -1
        for k, ep in enumerate(eps):
            w = ep.weight
            if w <= 0 or ep.replica_id in exclude:
                continue
            cur[k] += w
            total += w
            if best < 0 or cur[k] > cur[best]:
                best = k
        if best < 0:
            return None
        cur[best] -= total
        return eps[best]

    def update(self, endpoints: Iterable[Endpoint]) -> None:
        old = self.current_weights
        self._endpoints = tuple(endpoints)
        cur = [old.get(e.replica_id, 0) for e in self._endpoints]
        # Endpoints that left take their current weight with them; shift the rest so
        # the sum is back near zero (a shared offset does not change who wins).
        if cur:
            total = sum(cur)
            shift = abs(total) // len(cur) * (1 if total >= 0 else -1)  # toward zero
            if shift:
                cur = [c - shift for c in cur]
        self._current = cur


def make_picker(
    algorithm: Algorithm, endpoints: Iterable[Endpoint], rng: random.Random
) -> Picker:
    """The picker for a table's algorithm, over `endpoints`."""
    if algorithm is Algorithm.ROUND_ROBIN:
        return RoundRobin(endpoints)
    if algorithm is Algorithm.RANDOM:
        return Random(endpoints, rng)
    if algorithm is Algorithm.WEIGHTED:
        return SmoothWeighted(endpoints)
    raise ValueError(f"no picker for balancing algorithm {algorithm!r}")
