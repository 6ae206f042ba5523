"""The agent's copy of the balancing tables, followed one service at a time.

Every agent receives the full set of tables from the leader on its watch stream and
publishes each set here; `Control.WatchTable` streams one service's table from it to a
client (the client library's balanced channels), so following a table costs the leader
nothing per client.

Rules
- A set replaces the previous one whole (the leader's stream is level-triggered).
- A follower gets the current table first, then each table whose version differs from
  the last one it got (versions only move when the content does, so an unchanged table
  is never re-sent).
- Before the agent holds any set (just started, no leader yet) a follower waits: the
  agent cannot tell a missing service from tables it has not received.
- Once a set is held, a service absent from it does not exist (the leader keeps a table
  for every service, with no endpoints when none is ready): `NotFound`, also when it
  disappears while followed.

`follow_step` is the decision, pure and tested with tables; `TableFeed.follow` is the
asyncio loop around it; `watch_table` is the `Control.WatchTable` handler over it, the
one both the agent's client API and the leader's Control service serve.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping

import grpc

from shoal.errors import NotFound
from shoal.v1 import control_pb2, types_pb2

__all__ = ["TableFeed", "follow_step", "watch_table"]


def follow_step(
    held: Mapping[str, types_pb2.Table] | None, service: str, sent: int | None
) -> types_pb2.Table | None:
    """What a follower of `service` that last got version `sent` (None: nothing yet)
    is sent now: a table, or None to wait for the next set. `held` is the agent's
    current set, None before it has one. NotFound when the service is not in it."""
    if held is None:
        return None
    table = held.get(service)
    if table is None:
        known = ", ".join(sorted(held)) or "none"
        what = "was deleted" if sent is not None else "not found"
        err = NotFound("service", service)
        err.args = (f'service "{service}" {what} (services this agent knows: {known})',)
        raise err
    if sent is not None and table.version == sent:
        return None
    return table


class TableFeed:
    """The latest table set an agent received, and a wake-up for each new one."""

    def __init__(self) -> None:
        self._tables: dict[str, types_pb2.Table] | None = None
        # Replaced on every publish: a waiter holds the event of the set it has seen.
        self._changed = asyncio.Event()

    @property
    def tables(self) -> Mapping[str, types_pb2.Table] | None:
        """The current set by service, or None before the first one."""
        return self._tables

    def publish(self, tables: Iterable[types_pb2.Table]) -> None:
        """A new full set of tables arrived from the leader."""
        self._tables = {t.service: t for t in tables}
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def follow(self, service: str) -> AsyncIterator[types_pb2.Table]:
        """The service's table now, then each new version, until the caller stops;
        NotFound as `follow_step` says."""
        if not service:
            raise ValueError("WatchTable needs a service name")
        sent: int | None = None
        while True:
            changed = self._changed
            table = follow_step(self._tables, service, sent)
            if table is not None:
                sent = table.version
                yield table
                continue
            await changed.wait()


async def watch_table(tables: TableFeed | None, request: control_pb2.WatchTableRequest,
                      context: grpc.aio.ServicerContext, *, holder: str) -> AsyncIterator[types_pb2.Table]:
    """`Control.WatchTable` on a server whose copy of the tables is `tables` (None: it
    holds none, UNIMPLEMENTED); `holder` names the server in that message ("agent")."""
    if tables is None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"this {holder} holds no copy of the tables")
        return
    try:
        async for table in tables.follow(request.service):
            yield table
    except ValueError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except NotFound as exc:
        # The only ShoalError a follow raises.
        await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
