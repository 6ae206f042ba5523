"""The `Control` API on a client agent, so `shoal` works on every host.

A client agent holds no state: it answers what only it knows — its gossip view
(`Members`), the output of the replicas it runs (`Logs`) and its copy of the balancing
tables (`WatchTable`, so a client library following a table costs no server anything) —
and relays everything else to a server found through gossip, which forwards writes to
the leader itself. A relayed request keeps its deadline; a server's error comes back as
it was.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from shoal.errors import NotFound, ShoalError
from shoal.metadata import FORWARDED
from shoal.table_feed import TableFeed, watch_table
from shoal.v1 import control_pb2, control_pb2_grpc, types_pb2

__all__ = ["ClientControl", "LocalLogs"]

# (pod id, follow, tail) → chunks; NotFound when the pod does not run on this host.
LocalLogs = Callable[[str, bool, int], AsyncIterator[bytes]]

_RELAYED = ("Apply", "Get", "Delete", "Scale", "Servers", "AddServer", "RemoveServer", "Cordon", "Plan")


class ClientControl(control_pb2_grpc.ControlServicer):
    def __init__(
        self,
        server: Callable[[], str | None],
        members: Callable[[], list[Any]],
        local_logs: LocalLogs,
        tables: TableFeed | None = None,
    ) -> None:
        self._server = server
        self._members = members
        self._local_logs = local_logs
        self._tables = tables
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def _stub(self, context: grpc.aio.ServicerContext) -> control_pb2_grpc.ControlStub:
        target = self._server()
        if target is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "this client agent knows no server yet (gossip has not found one); retry")
        assert target is not None
        ch = self._channels.get(target)
        if ch is None:
            ch = self._channels[target] = grpc.aio.insecure_channel(target)
        return control_pb2_grpc.ControlStub(ch)

    async def _relay(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        stub = await self._stub(context)
        remaining = context.time_remaining()
        try:
            return await getattr(stub, method)(request, timeout=min(remaining, 60.0) if remaining else 60.0)
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")

    async def Members(self, request: control_pb2.MembersRequest, context: grpc.aio.ServicerContext) -> control_pb2.MembersResponse:
        return control_pb2.MembersResponse(members=self._members())

    async def WatchTable(self, request: control_pb2.WatchTableRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[types_pb2.Table]:
        async for table in watch_table(self._tables, request, context, holder="agent"):
            yield table

    async def WatchEvents(self, request: control_pb2.WatchEventsRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        stub = await self._stub(context)
        try:
            async for ev in stub.WatchEvents(request):
                yield ev
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")

    async def Logs(self, request: control_pb2.LogsRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[control_pb2.LogChunk]:
        forwarded = dict(context.invocation_metadata() or ()).get(FORWARDED)
        try:
            async for chunk in self._local_logs(request.pod, request.follow, request.tail):
                yield control_pb2.LogChunk(data=chunk)
            return
        except NotFound:
            if forwarded:  # a server sent it here because the pod is here: it is gone
                await context.abort(grpc.StatusCode.NOT_FOUND, f'pod "{request.pod}" does not run on this host')
                return
        except ShoalError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            return
        stub = await self._stub(context)
        try:
            async for chunk in stub.Logs(request):
                yield chunk
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()


def _relay_method(name: str) -> Any:
    async def method(self: ClientControl, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._relay(name, request, context)

    method.__name__ = name
    return method


for _name in _RELAYED:
    setattr(ClientControl, _name, _relay_method(_name))
