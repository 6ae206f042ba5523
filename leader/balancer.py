"""The balancer core: turns a service's ready endpoints into its balancing table.

The leader calls `build_table` whenever a service's endpoints may have changed (a replica
turned ready or unready, a weight annotation changed, the service's algorithm changed)
and publishes the result to every agent. It does no I/O and keeps no state: the previous
table comes in as an argument.

Rules
- Endpoints are sorted by replica id, so every agent (and every client library) holds
  the same list in the same order and round robin slot S means the same replica
  everywhere.
- The first table of a service has version 1. A rebuilt table whose algorithm and
  endpoints equal the previous one's *is* the previous one (same version), so an
  unchanged table is never re-sent; any change makes version previous + 1.
- A replica appears at most once; a weight is 0 or more (0 drains it: weighted
  balancing never picks it); a port is 1-65535. Breaking one is a bug in the caller and
  raises ValueError.

`Endpoint` and `Table` are defined in `shoal.balancing` (the agent proxy and the client
library consume tables without importing the leader) and re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterable

from shoal.balancing import Endpoint, Table
from shoal.model import Algorithm

__all__ = ["Endpoint", "Table", "build_table"]


def build_table(
    service: str,
    algorithm: Algorithm,
    endpoints: Iterable[Endpoint],
    previous: Table | None,
) -> Table:
    """The table for `service`; `previous` itself when nothing changed."""
    eps = tuple(sorted(endpoints, key=lambda e: e.replica_id))
    for a, b in zip(eps, eps[1:]):
        if a.replica_id == b.replica_id:
            raise ValueError(f"replica {a.replica_id} appears twice in service {service}")
    for e in eps:
        if e.weight < 0:
            raise ValueError(f"endpoint {e.replica_id} has negative weight {e.weight}")
        if not 1 <= e.port <= 65535:
            raise ValueError(f"endpoint {e.replica_id} has port {e.port} outside 1-65535")
    if previous is None:
        return Table(service=service, algorithm=algorithm, version=1, endpoints=eps)
    if previous.service != service:
        raise ValueError(
            f"previous table is for service {previous.service}, not {service}"
        )
    if previous.algorithm is algorithm and previous.endpoints == eps:
        return previous
    return Table(service=service, algorithm=algorithm, version=previous.version + 1, endpoints=eps)
