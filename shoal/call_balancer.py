"""Client-side balancing of gRPC calls over a service's table, with no I/O.

The client library's balanced channels (`shoal.channel`, `shoal.aio_channel`) keep one
gRPC sub-channel per endpoint of a service's table and ask a `CallBalancer` which
endpoint each call goes to. The balancer owns the picker (`shoal.balancing`, the same
algorithms as the agent's proxy), the outlier ejector, the retry budget and the count
of calls in flight per sub-channel; the shells own the channels, the threads or the
event loop, and the clock (they pass `now`).

Rules
- One sub-channel per target (`address:port`). A table update says which targets are
  new (open one) and which are gone and idle (close it); a gone target that still has
  calls in flight is closed when its last call finishes, never under a running call.
- A call's outcome feeds the picker (`finished(replica, seconds)`; seconds is None for
  a call that did not get an answer from the endpoint) and the ejector (a transport
  failure is a failed connection; any answer, an error status included, is a success).
- Picks skip ejected endpoints, unless that would leave none (the ejector already caps
  ejections at a share of the table; this covers the rest).
- A retry goes to another endpoint than those the call already tried, and only if the
  retry budget allows it. Which failures may be retried is `retryable`'s decision: a
  call that provably never left the client (its sub-channel could not connect), or any
  UNAVAILABLE for a method the caller declared idempotent.
- Not thread-safe: the sync shell holds a lock around every method; the aio shell runs
  on one loop.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from shoal.balancing import EjectionConfig, Endpoint, OutlierEjector, Picker, RetryBudget, Table, make_picker
from shoal.errors import ConfigError
from shoal.model import Algorithm
from shoal.v1 import types_pb2

__all__ = [
    "CallBalancer",
    "Outcome",
    "TableChange",
    "endpoint_target",
    "parse_target",
    "retryable",
    "table_from_pb",
    "UNSENT_MARKERS",
]

SCHEME = "shoal"

UNSENT_MARKERS = (
    # gRPC core's status for a call it could not put on any connection: the sub-channel
    # failed to connect (refused, unreachable, timed out). Nothing was sent.
    "failed to connect to all addresses",
    # The same, as newer gRPC releases word it for a load-balanced sub-channel.
    "connections to all backends failing",
)


def parse_target(target: str) -> tuple[str | None, str]:
    """`shoal:///SERVICE` → (None, SERVICE); `shoal://AGENT/SERVICE` → (AGENT, SERVICE).
    ConfigError for anything else, saying what is expected."""
    prefix = f"{SCHEME}://"
    if not target.startswith(prefix):
        raise ConfigError(f'target "{target}" is not a shoal target; expected {SCHEME}:///SERVICE '
                          f"or {SCHEME}://AGENT_HOST:PORT/SERVICE")
    authority, slash, service = target[len(prefix):].partition("/")
    if not slash or not service or "/" in service:
        raise ConfigError(f'target "{target}" names no service; expected {SCHEME}:///SERVICE '
                          f"or {SCHEME}://AGENT_HOST:PORT/SERVICE")
    return (authority or None), service


def endpoint_target(ep: Endpoint) -> str:
    """The gRPC target of an endpoint: host:port, an IPv6 address in brackets."""
    host = ep.address
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{ep.port}"


def table_from_pb(t: types_pb2.Table) -> Table:
    """The balancing form of a wire table. An algorithm this client does not know
    balances by round robin (a newer leader must not stop an older client)."""
    try:
        algorithm = Algorithm(t.algorithm)
    except ValueError:
        algorithm = Algorithm.ROUND_ROBIN
    return Table(
        service=t.service,
        algorithm=algorithm,
        version=t.version,
        endpoints=tuple(
            Endpoint(replica_id=e.pod, address=e.address, port=e.port, weight=e.weight or 1) for e in t.endpoints
        ),
    )


def retryable(code_name: str, details: str, *, idempotent: bool) -> bool:
    """Whether a failed attempt may be tried again on another endpoint: it never left
    this client, or the method is idempotent and the endpoint was unavailable."""
    if code_name != "UNAVAILABLE":
        return False
    if idempotent:
        return True
    low = details.lower()
    return any(m in low for m in UNSENT_MARKERS)


@dataclass(frozen=True, slots=True, kw_only=True)
class TableChange:
    """What a table update asks of the shell, in this order: open a sub-channel for each
    of `opened`, then close the sub-channels of `closed` (gone and idle)."""

    opened: tuple[str, ...] = ()
    closed: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """How one attempt on one endpoint ended."""

    seconds: float | None
    """Its latency, or None when the endpoint gave no answer (failed, cut, timed out)."""
    transport_failed: bool = False
    """The connection failed or broke (counts toward ejection)."""


@dataclass(slots=True)
class _Target:
    in_flight: int = 0
    live: bool = True  # still in the table


@dataclass(slots=True)
class CallBalancer:
    """One balanced channel's state; see the module docstring."""

    service: str
    rng: random.Random
    ejection: EjectionConfig = field(default_factory=EjectionConfig)
    budget: RetryBudget = field(default_factory=RetryBudget)
    table: Table | None = None
    error: str | None = None
    """Why there is no usable table (the agent's answer), or None."""
    missing: bool = False
    """The agent said the service does not exist (or no longer does)."""
    _picker: Picker | None = None
    _algorithm: Algorithm | None = None
    _ejector: OutlierEjector = field(init=False)
    _targets: dict[str, _Target] = field(default_factory=dict)
    _by_replica: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._ejector = OutlierEjector(self.ejection)

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self.table.endpoints if self.table is not None else ()

    def target_of(self, ep: Endpoint) -> str:
        return endpoint_target(ep)

    def in_flight(self, target: str) -> int:
        t = self._targets.get(target)
        return t.in_flight if t is not None else 0

    @property
    def targets(self) -> tuple[str, ...]:
        """Every target that has (or should have) an open sub-channel."""
        return tuple(self._targets)

    def update(self, table: Table) -> TableChange:
        """Balance over `table` from now on."""
        if table.service != self.service:
            raise ValueError(f"table of service {table.service} given to the balancer of {self.service}")
        self.table = table
        self.error = None
        self.missing = False
        eps = table.endpoints
        if self._picker is None or self._algorithm is not table.algorithm:
            self._picker = make_picker(table.algorithm, eps, self.rng)
            self._algorithm = table.algorithm
        else:
            self._picker.update(eps)
        self._ejector.forget(e.replica_id for e in eps)
        wanted = {endpoint_target(e) for e in eps}
        self._by_replica = {e.replica_id: endpoint_target(e) for e in eps}
        opened = []
        for target in sorted(wanted):
            t = self._targets.get(target)
            if t is None:
                self._targets[target] = _Target()
                opened.append(target)
            else:
                t.live = True
        closed = []
        for target, t in list(self._targets.items()):
            if target not in wanted:
                t.live = False
                if t.in_flight == 0:
                    del self._targets[target]
                    closed.append(target)
        return TableChange(opened=tuple(opened), closed=tuple(closed))

    def lost(self, error: str) -> TableChange:
        """The service is gone (the agent said NOT_FOUND): no endpoints until it is back."""
        if self.table is not None:
            change = self.update(Table(service=self.service, algorithm=self.table.algorithm,
                                       version=self.table.version, endpoints=()))
        else:
            change = TableChange()
        self.error = error
        self.missing = True
        return change

    def pick(self, now: float, exclude: Iterable[str] = (), key: bytes | None = None) -> Endpoint | None:
        """The endpoint for the next attempt, or None when every one is excluded."""
        if self._picker is None:
            return None
        tried = frozenset(exclude)
        ejected = self._ejector.ejected(now)
        ep = self._picker.pick(tried | ejected, key) if ejected else None
        if ep is None:
            ep = self._picker.pick(tried, key)
        return ep

    def request(self) -> None:
        """A call starts (it earns the retry budget its share)."""
        self.budget.request()

    def try_retry(self) -> bool:
        """Spend a retry from the budget, if there is one."""
        return self.budget.try_retry()

    def started(self, ep: Endpoint) -> str:
        """An attempt goes to `ep`; returns the target whose sub-channel carries it."""
        target = endpoint_target(ep)
        t = self._targets.get(target)
        if t is None:  # picked from a table that no longer has it: a bug in the shell
            raise RuntimeError(f"endpoint {ep.replica_id} at {target} has no sub-channel")
        t.in_flight += 1
        assert self._picker is not None
        self._picker.started(ep.replica_id)
        return target

    def finished(self, ep: Endpoint, target: str, outcome: Outcome, now: float) -> tuple[str, ...]:
        """An attempt ended; returns the targets whose sub-channel the shell closes now."""
        if self._picker is not None:
            self._picker.finished(ep.replica_id, outcome.seconds)
        if self._by_replica.get(ep.replica_id) == target:
            self._ejector.record(ep.replica_id, not outcome.transport_failed, now, len(self.endpoints))
        t = self._targets.get(target)
        if t is None:
            return ()
        t.in_flight = max(0, t.in_flight - 1)
        if not t.live and t.in_flight == 0:
            del self._targets[target]
            return (target,)
        return ()

    def close(self) -> tuple[str, ...]:
        """Every target with a sub-channel; the balancer forgets them."""
        targets = tuple(self._targets)
        self._targets.clear()
        return targets
