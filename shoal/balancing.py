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
- Least connections: the endpoint with the fewest outstanding requests per unit of
  weight; ties go round robin (so idle endpoints share new work instead of the first
  one taking it all).
- Power of two choices over a moving average (p2c_ewma): two distinct endpoints drawn
  at random, the one with the lower cost wins, cost = EWMA of its latency × (its
  outstanding requests + 1) / weight. A slow or overloaded endpoint loses most draws by
  itself. The average moves by `EWMA_ALPHA` per finished request; one that has none yet
  counts as the average of the others (so a new replica is tried, not flooded). An
  endpoint that keeps losing is not forgotten: each lost draw pulls its average a
  little (`EWMA_DECAY`) toward the others', so it is retried after a while.
- Consistent hash (by a key: the client address, or a header in HTTP mode): a ring of
  `VNODES` points per unit of weight, placed by a hash of the replica id; a key goes to
  the first point at or after its own hash. When one of N endpoints leaves, only the
  keys it held (about 1/N) move. Excluded endpoints are skipped along the ring.

Feedback: `started(replica_id)` when a request or connection goes to an endpoint and
`finished(replica_id, seconds)` when it ends (seconds: its latency, or None if it failed
before answering). Pickers that do not use them ignore them.
"""

from __future__ import annotations

import bisect
import hashlib
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
    "LeastConn",
    "P2CEwma",
    "ConsistentHash",
    "EjectionConfig",
    "OutlierEjector",
    "RetryBudget",
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

    def pick(self, exclude: frozenset[str] = frozenset(), key: bytes | None = None) -> Endpoint | None:
        """An endpoint whose replica id is not in `exclude`, or None if there is none.
        `key` (consistent hash only) is what keeps a client on one endpoint."""
        ...

    def started(self, replica_id: str) -> None:
        """A request or connection went to this endpoint."""
        ...

    def finished(self, replica_id: str, seconds: float | None) -> None:
        """It ended after `seconds` (its latency), or failed (None)."""
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

    def pick(self, exclude: frozenset[str] = frozenset(), key: bytes | None = None) -> Endpoint | None:
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

    def started(self, replica_id: str) -> None:
        return None

    def finished(self, replica_id: str, seconds: float | None) -> None:
        return None


class Random:
    """Uniform choice among the endpoints not excluded, from the injected rng."""

    __slots__ = ("_endpoints", "_rng")

    def __init__(self, endpoints: Iterable[Endpoint], rng: random.Random) -> None:
        self._endpoints = tuple(endpoints)
        self._rng = rng

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self._endpoints

    def pick(self, exclude: frozenset[str] = frozenset(), key: bytes | None = None) -> Endpoint | None:
        eps = self._endpoints
        if exclude:
            eps = tuple(e for e in eps if e.replica_id not in exclude)
        if not eps:
            return None
        return eps[self._rng.randrange(len(eps))]

    def update(self, endpoints: Iterable[Endpoint]) -> None:
        self._endpoints = tuple(endpoints)

    started = RoundRobin.started
    finished = RoundRobin.finished


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

    def pick(self, exclude: frozenset[str] = frozenset(), key: bytes | None = None) -> Endpoint | None:
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

    started = RoundRobin.started
    finished = RoundRobin.finished


class LeastConn:
    """Fewest outstanding requests per unit of weight; ties round robin."""

    __slots__ = ("_endpoints", "_outstanding", "_next")

    def __init__(self, endpoints: Iterable[Endpoint] = ()) -> None:
        self._endpoints: tuple[Endpoint, ...] = ()
        self._outstanding: dict[str, int] = {}
        self._next = 0
        self.update(endpoints)

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self._endpoints

    @property
    def outstanding(self) -> dict[str, int]:
        return dict(self._outstanding)

    def pick(self, exclude: frozenset[str] = frozenset(), key: bytes | None = None) -> Endpoint | None:
        eps = self._endpoints
        n = len(eps)
        best: Endpoint | None = None
        best_load = 0.0
        for step in range(n):
            ep = eps[(self._next + step) % n]
            if ep.weight <= 0 or ep.replica_id in exclude:
                continue
            load = self._outstanding.get(ep.replica_id, 0) / ep.weight
            if best is None or load < best_load:
                best, best_load = ep, load
        if best is not None:
            self._next = (eps.index(best) + 1) % n
        return best

    def update(self, endpoints: Iterable[Endpoint]) -> None:
        self._endpoints = tuple(endpoints)
        ids = {e.replica_id for e in self._endpoints}
        self._outstanding = {k: v for k, v in self._outstanding.items() if k in ids}

    def started(self, replica_id: str) -> None:
        _count(self._outstanding, replica_id, +1)

    def finished(self, replica_id: str, seconds: float | None) -> None:
        _count(self._outstanding, replica_id, -1)


def _count(outstanding: dict[str, int], replica_id: str, delta: int) -> None:
    """Outstanding requests per endpoint; an endpoint at zero has no entry."""
    n = outstanding.get(replica_id, 0) + delta
    if n > 0:
        outstanding[replica_id] = n
    else:
        outstanding.pop(replica_id, None)


EWMA_ALPHA = 0.3
"""Weight of the newest latency in the moving average: a replica that turns slow is
avoided within a handful of requests."""

EWMA_DECAY = 0.05
"""Share of the gap to the others' average a losing endpoint's average closes per lost
draw, so a replica that recovered is tried again after some tens of requests."""

FAILED_LATENCY = 1.0
"""Seconds a failed request counts as, in the moving average."""


class P2CEwma:
    """Power of two random choices over EWMA latency × outstanding; see the module docstring."""

    __slots__ = ("_endpoints", "_rng", "_ewma", "_outstanding")

    def __init__(self, endpoints: Iterable[Endpoint], rng: random.Random) -> None:
        self._endpoints: tuple[Endpoint, ...] = ()
        self._rng = rng
        self._ewma: dict[str, float] = {}
        self._outstanding: dict[str, int] = {}
        self.update(endpoints)

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self._endpoints

    @property
    def averages(self) -> dict[str, float]:
        return dict(self._ewma)

    def _mean(self) -> float:
        return sum(self._ewma.values()) / len(self._ewma) if self._ewma else 0.0

    def _cost(self, ep: Endpoint, mean: float) -> float:
        latency = self._ewma.get(ep.replica_id, mean)
        return latency * (self._outstanding.get(ep.replica_id, 0) + 1) / ep.weight

    def pick(self, exclude: frozenset[str] = frozenset(), key: bytes | None = None) -> Endpoint | None:
        eps = [e for e in self._endpoints if e.weight > 0 and e.replica_id not in exclude]
        if not eps:
            return None
        if len(eps) == 1:
            return eps[0]
        i, j = self._rng.sample(range(len(eps)), 2)
        a, b = eps[i], eps[j]
        mean = self._mean()
        ca, cb = self._cost(a, mean), self._cost(b, mean)
        win, lose = (a, b) if ca <= cb else (b, a)
        lost = self._ewma.get(lose.replica_id)
        if lost is not None and lost > mean:
            self._ewma[lose.replica_id] = lost - (lost - mean) * EWMA_DECAY
        return win

    def update(self, endpoints: Iterable[Endpoint]) -> None:
        self._endpoints = tuple(endpoints)
        ids = {e.replica_id for e in self._endpoints}
        self._ewma = {k: v for k, v in self._ewma.items() if k in ids}
        self._outstanding = {k: v for k, v in self._outstanding.items() if k in ids}

    def started(self, replica_id: str) -> None:
        _count(self._outstanding, replica_id, +1)

    def finished(self, replica_id: str, seconds: float | None) -> None:
        _count(self._outstanding, replica_id, -1)
        if not any(e.replica_id == replica_id for e in self._endpoints):
            return
        sample = FAILED_LATENCY if seconds is None else max(0.0, seconds)
        old = self._ewma.get(replica_id)
        self._ewma[replica_id] = sample if old is None else old + EWMA_ALPHA * (sample - old)


VNODES = 160
"""Ring points per unit of weight: with 160, each of N endpoints holds within a few
per cent of 1/N of the keys."""


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class ConsistentHash:
    """A hash ring over the endpoints; a key sticks to one endpoint while it stays."""

    __slots__ = ("_endpoints", "_points", "_owners", "_rng")

    def __init__(self, endpoints: Iterable[Endpoint], rng: random.Random) -> None:
        self._rng = rng  # for requests without a key
        self._endpoints: tuple[Endpoint, ...] = ()
        self._points: list[int] = []
        self._owners: list[Endpoint] = []
        self.update(endpoints)

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self._endpoints

    def pick(self, exclude: frozenset[str] = frozenset(), key: bytes | None = None) -> Endpoint | None:
        if not self._points:
            return None
        if key is None:
            key = self._rng.randbytes(8)
        n = len(self._points)
        start = bisect.bisect_left(self._points, _hash64(key))
        for step in range(n):
            ep = self._owners[(start + step) % n]
            if ep.replica_id not in exclude:
                return ep
        return None

    def update(self, endpoints: Iterable[Endpoint]) -> None:
        self._endpoints = tuple(endpoints)
        ring = sorted(
            (_hash64(f"{e.replica_id}#{i}".encode()), e.replica_id, e)
            for e in self._endpoints
            for i in range(VNODES * max(0, e.weight))
        )
        self._points = [h for h, _, _ in ring]
        self._owners = [e for _, _, e in ring]

    started = RoundRobin.started
    finished = RoundRobin.finished


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
    if algorithm is Algorithm.LEAST_CONN:
        return LeastConn(endpoints)
    if algorithm is Algorithm.P2C_EWMA:
        return P2CEwma(endpoints, rng)
    if algorithm is Algorithm.CONSISTENT_HASH:
        return ConsistentHash(endpoints, rng)
    raise ValueError(f"no picker for balancing algorithm {algorithm!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class EjectionConfig:
    """When an endpoint that keeps failing is taken out of rotation, and for how long."""

    consecutive_failures: int = 3
    """Failed connections in a row (refused, timed out, closed before answering) that
    eject an endpoint: one failure is noise, three in a row on a healthy network is not."""

    base_seconds: float = 1.0
    """First ejection; each further one of the same endpoint doubles it..."""

    max_seconds: float = 30.0
    """...up to this, so a flapping replica stays out longer each time."""

    max_fraction: float = 0.5
    """Never eject more than this share of a service's endpoints: when most of them fail,
    the fault is likelier elsewhere (a network problem, an overload) and taking them all
    out would turn trouble into an outage."""


class OutlierEjector:
    """Tracks failures per endpoint and says which are ejected now. Pure: the caller
    passes the time."""

    __slots__ = ("config", "_streak", "_until", "_times")

    def __init__(self, config: EjectionConfig = EjectionConfig()) -> None:
        self.config = config
        self._streak: dict[str, int] = {}
        self._until: dict[str, float] = {}
        self._times: dict[str, int] = {}

    def ejected(self, now: float) -> frozenset[str]:
        return frozenset(rid for rid, until in self._until.items() if until > now)

    def record(self, replica_id: str, ok: bool, now: float, endpoints: int) -> bool:
        """Record one connection's outcome; returns True if it ejected the endpoint."""
        if ok:
            self._streak.pop(replica_id, None)
            return False
        streak = self._streak.get(replica_id, 0) + 1
        self._streak[replica_id] = streak
        if streak < self.config.consecutive_failures or self._until.get(replica_id, 0.0) > now:
            return False
        if len(self.ejected(now)) + 1 > int(endpoints * self.config.max_fraction):
            return False
        times = self._times.get(replica_id, 0) + 1
        self._times[replica_id] = times
        seconds = min(self.config.max_seconds, self.config.base_seconds * 2 ** (times - 1))
        self._until[replica_id] = now + seconds
        self._streak[replica_id] = 0
        return True

    def forget(self, keep: Iterable[str]) -> None:
        """Drop what is known of endpoints that left the table."""
        ids = set(keep)
        for d in (self._streak, self._until, self._times):
            for rid in [r for r in d if r not in ids]:
                del d[rid]


class RetryBudget:
    """Caps retries to a share of requests, so an overloaded service is not hit by a
    wave of retries on top of its load: each request earns `ratio` of a retry, up to
    `reserve`, and each retry spends one."""

    __slots__ = ("ratio", "reserve", "_tokens")

    def __init__(self, ratio: float = 0.2, reserve: float = 20.0) -> None:
        self.ratio = ratio
        self.reserve = reserve
        self._tokens = reserve

    def request(self) -> None:
        self._tokens = min(self.reserve, self._tokens + self.ratio)

    def try_retry(self) -> bool:
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
