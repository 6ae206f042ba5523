"""The Python client library: the `shoal.v1.Control` API, and balanced gRPC channels.

`Client` calls the Control API. gRPC errors are translated into shoal errors here, in
one place (`_translate`), so callers (the CLI among them) handle `ShoalError` only.

`channel("shoal:///SERVICE")` (and `aio_channel` for `grpc.aio`) is a gRPC channel to
every endpoint of a service: it follows the service's balancing table from an agent and
picks an endpoint per call with the service's algorithm, so a gRPC client skips the
proxy hop. grpcio has no public API for custom name resolvers, so this is a channel
object of its own that generated stubs accept (`shoal.channel`, `shoal.aio_channel`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import grpc

from shoal.errors import Conflict, NotFound, ShoalError, Unavailable
from shoal.v1 import control_pb2, control_pb2_grpc, types_pb2

if TYPE_CHECKING:
    # Imported where a channel is made: the CLI, which uses only `Client`, starts faster.
    from shoal.aio_channel import AioBalancedChannel
    from shoal.channel import BalancedChannel

__all__ = ["Client", "DEFAULT_ADDR", "RequestRejected", "aio_channel", "channel", "default_addr"]

DEFAULT_ADDR = "127.0.0.1:7420"


def default_addr() -> str:
    return os.environ.get("SHOAL_ADDR") or DEFAULT_ADDR


class RequestRejected(ShoalError):
    """The server rejected the request as invalid; the message says why."""


def _translate(exc: grpc.RpcError, addr: str) -> ShoalError:
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    unreachable = ("failed to connect", "connection refused", "name resolution", "dns resolution")
    if code == grpc.StatusCode.UNAVAILABLE and (not details or any(u in details.lower() for u in unreachable)):
        return Unavailable(f"cannot reach shoal at {addr} — is 'shoal agent --dev' running?")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Unavailable(f"shoal at {addr} did not answer in time")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return RequestRejected(details)
    if code == grpc.StatusCode.NOT_FOUND:
        err = NotFound("object", "")
        err.args = (details,)
        return err
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return Conflict(details)
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(details)
    return ShoalError(f"{code.name if code else 'error'}: {details}")


class Client:
    def __init__(self, addr: str | None = None, *, timeout: float = 10.0) -> None:
        self.addr = addr or default_addr()
        self.timeout = timeout
        self._channel = grpc.insecure_channel(self.addr)
        self._stub = control_pb2_grpc.ControlStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout, wait_for_ready=False)
        except grpc.RpcError as exc:
            raise _translate(exc, self.addr) from None

    def _stream(self, method: str, request: Any, *, follow: bool) -> Iterator[Any]:
        try:
            # A stream that does not follow ends by itself: bound it like a call.
            yield from getattr(self._stub, method)(request, timeout=None if follow else self.timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:  # type: ignore[attr-defined]
                return
            raise _translate(exc, self.addr) from None

    def apply(self, documents: list[tuple[str, str]], *, dry_run: bool = False) -> control_pb2.ApplyResponse:
        return self._call("Apply", control_pb2.ApplyRequest(
            documents=[control_pb2.Document(source=s, content=c) for s, c in documents], dry_run=dry_run))

    def get(self, kind: str, name: str = "") -> control_pb2.GetResponse:
        return self._call("Get", control_pb2.GetRequest(kind=kind, name=name))

    def delete(self, kind: str, name: str) -> control_pb2.DeleteResponse:
        return self._call("Delete", control_pb2.DeleteRequest(kind=kind, name=name))

    def scale(self, deployment: str, replicas: int) -> control_pb2.ScaleResponse:
        return self._call("Scale", control_pb2.ScaleRequest(deployment=deployment, replicas=replicas))

    def members(self) -> control_pb2.MembersResponse:
        return self._call("Members", control_pb2.MembersRequest())

    def plan(self, documents: list[tuple[str, str]]) -> control_pb2.PlanResponse:
        return self._call("Plan", control_pb2.ApplyRequest(
            documents=[control_pb2.Document(source=src, content=text) for src, text in documents]))

    def cordon(self, node: str, *, cordon: bool = True, drain: bool = False) -> control_pb2.CordonResponse:
        return self._call("Cordon", control_pb2.CordonRequest(node=node, cordon=cordon, drain=drain))

    def servers(self) -> control_pb2.ServersResponse:
        return self._call("Servers", control_pb2.ServersRequest())

    def add_server(self, address: str) -> control_pb2.AddServerResponse:
        return self._call("AddServer", control_pb2.AddServerRequest(address=address))

    def remove_server(self, server: str) -> control_pb2.RemoveServerResponse:
        if server.isdigit():
            return self._call("RemoveServer", control_pb2.RemoveServerRequest(id=int(server)))
        return self._call("RemoveServer", control_pb2.RemoveServerRequest(name=server))

    def events(self, *, since: int = 0, follow: bool = False, obj: str = "") -> Iterator[types_pb2.Event]:
        return self._stream("WatchEvents", control_pb2.WatchEventsRequest(since=since, follow=follow, object=obj), follow=follow)

    def logs(self, pod: str, *, follow: bool = False, tail: int = 0) -> Iterator[bytes]:
        for chunk in self._stream("Logs", control_pb2.LogsRequest(pod=pod, follow=follow, tail=tail), follow=follow):
            yield chunk.data


def _agent_and_service(target: str, agent: str | None) -> tuple[str, str]:
    from shoal.call_balancer import parse_target

    named, service = parse_target(target)
    if named and agent and named != agent:
        raise ShoalError(f'target "{target}" names agent {named} but agent={agent!r} was given; give one')
    return (named or agent or default_addr()), service


def channel(target: str, *, agent: str | None = None, agent_credentials: grpc.ChannelCredentials | None = None,
            **kwargs: Any) -> BalancedChannel:
    """A gRPC channel balancing over the endpoints of `shoal:///SERVICE` (or
    `shoal://AGENT:PORT/SERVICE`), following its table from `agent` (default:
    `$SHOAL_ADDR` or 127.0.0.1:7420). Keywords go to `BalancedChannel`: `idempotent`
    (True, or method names whose UNAVAILABLE failures may be retried elsewhere),
    `credentials` and `options` for the endpoint sub-channels, `rng`, `ejection`,
    `retry_budget`, `table_wait`. ConfigError for a target that is not a shoal target."""
    from shoal.channel import AgentTables, BalancedChannel

    addr, service = _agent_and_service(target, agent)
    return BalancedChannel(service, AgentTables(addr, credentials=agent_credentials), **kwargs)


def aio_channel(target: str, *, agent: str | None = None, agent_credentials: grpc.ChannelCredentials | None = None,
                **kwargs: Any) -> AioBalancedChannel:
    """`channel` for `grpc.aio`: build it inside the running event loop and `await
    ch.close()` (or `async with`)."""
    from shoal.aio_channel import AioAgentTables, AioBalancedChannel

    addr, service = _agent_and_service(target, agent)
    return AioBalancedChannel(service, AioAgentTables(addr, credentials=agent_credentials), **kwargs)
