"""`shoal.channel` for `grpc.aio`: a channel balancing calls over a service's endpoints.

The same rules as the sync `BalancedChannel` (see `shoal.channel`), on one event loop
instead of threads: the table is followed by a task of the channel, each endpoint has a
`grpc.aio` sub-channel, and the `CallBalancer` core needs no lock. Build it inside the
running loop; close it with `await channel.close()` or `async with`.

Call objects: a unary-unary call is a coroutine (`await stub.Method(request)`); a
unary-stream call is async-iterable and has `read()`, `cancel()`, `code()` and
`details()`; the request-streaming kinds return the sub-channel's own call object.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Coroutine, Iterable, Sequence
from typing import Any, Protocol

import grpc

from shoal.balancing import EjectionConfig, Endpoint, RetryBudget
from shoal.call_balancer import CallBalancer, Outcome, TableChange, retryable, table_from_pb
from shoal.channel import TABLE_WAIT, WATCH_BACKOFF, BalancerRpcError, Metadata, hash_key_of
from shoal.errors import NotFound, ShoalError
from shoal.v1 import control_pb2, control_pb2_grpc, types_pb2

__all__ = ["AioAgentTables", "AioBalancedChannel", "AioTableSource"]


class AioTableSource(Protocol):
    """Where an aio balanced channel follows its table from. A watch raises
    `grpc.RpcError` (NOT_FOUND: no such service) or `NotFound`."""

    def watch(self, service: str) -> AsyncIterable[types_pb2.Table]: ...

    async def close(self) -> None: ...


class AioAgentTables:
    """Tables from a shoal agent's `Control.WatchTable`, over `grpc.aio`."""

    def __init__(self, agent: str, *, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.agent = agent
        self._channel = (grpc.aio.secure_channel(agent, credentials) if credentials is not None
                         else grpc.aio.insecure_channel(agent))
        self._stub = control_pb2_grpc.ControlStub(self._channel)

    def watch(self, service: str) -> AsyncIterable[types_pb2.Table]:
        call: AsyncIterable[types_pb2.Table] = self._stub.WatchTable(control_pb2.WatchTableRequest(service=service))
        return call

    async def close(self) -> None:
        await self._channel.close()


class _Exhausted(Exception):
    """Every endpoint was tried for this call."""


def _deadline(timeout: float | None, clock: Callable[[], float]) -> float | None:
    return None if timeout is None else clock() + timeout


def _remaining(deadline: float | None, clock: Callable[[], float]) -> float | None:
    return None if deadline is None else max(0.0, deadline - clock())


class AioBalancedChannel(grpc.aio.Channel):  # type: ignore[misc]
    """A `grpc.aio` channel to every endpoint of one service."""

    def __init__(
        self,
        service: str,
        source: AioTableSource,
        *,
        idempotent: bool | Iterable[str] = False,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        rng: random.Random | None = None,
        ejection: EjectionConfig = EjectionConfig(),
        retry_budget: RetryBudget | None = None,
        table_wait: float = TABLE_WAIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self._source = source
        self._idempotent: bool | frozenset[str] = idempotent if isinstance(idempotent, bool) else frozenset(idempotent)
        self._credentials = credentials
        self._options = list(options)
        self._table_wait = table_wait
        self._clock = clock
        self._core = CallBalancer(service, rng or random.Random(), ejection, retry_budget or RetryBudget())
        self._subchannels: dict[str, grpc.aio.Channel] = {}
        self._callables: dict[tuple[str, str, str], Any] = {}
        self._closed = False
        self._has_answer = False
        # Replaced at every table change: a waiter holds the event of the state it saw.
        self._changed = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self._follower = asyncio.get_running_loop().create_task(self._follow(), name=f"shoal-table-{service}")

    # -- following the table ------------------------------------------------------

    async def _follow(self) -> None:
        pause = WATCH_BACKOFF[0]
        while not self._closed:
            try:
                async for t in self._source.watch(self.service):
                    self._apply(self._core.update(table_from_pb(t)))
                    pause = WATCH_BACKOFF[0]
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                details = (exc.details() if hasattr(exc, "details") else "") or ""
                if code == grpc.StatusCode.NOT_FOUND:
                    self._apply(self._core.lost(details or f'service "{self.service}" not found'))
                else:
                    self._failed(f"{code.name if code else 'error'}: {details}")
            except NotFound as exc:
                self._apply(self._core.lost(str(exc)))
            except ShoalError as exc:
                self._failed(str(exc))
            except Exception as exc:  # noqa: BLE001 - a bad message must not end the following
                self._failed(repr(exc))
            await asyncio.sleep(pause)  # back-off before reopening the stream
            pause = min(pause * 2, WATCH_BACKOFF[1])

    def _apply(self, change: TableChange) -> None:
        for target in change.opened:
            self._subchannels[target] = self._open(target)
        for target in change.closed:
            self._spawn(self._drop(target).close())
        self._has_answer = True
        self._notify()

    def _failed(self, why: str) -> None:
        if self._core.table is None and not self._core.missing:
            self._core.error = f"cannot follow it from the agent ({why})"
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _open(self, target: str) -> grpc.aio.Channel:
        if self._credentials is not None:
            return grpc.aio.secure_channel(target, self._credentials, options=self._options)
        return grpc.aio.insecure_channel(target, options=self._options)

    def _drop(self, target: str) -> grpc.aio.Channel:
        for k in [k for k in self._callables if k[0] == target]:
            del self._callables[k]
        return self._subchannels.pop(target)

    # -- picking ----------------------------------------------------------------------

    async def _acquire(self, tried: frozenset[str], key: bytes | None, deadline: float | None,
                       wait_for_ready: bool, kind: str, method: str, make: Callable[[grpc.aio.Channel], Any]) -> tuple[Endpoint, str, Any]:
        first_answer = None if wait_for_ready else _deadline(self._table_wait, self._clock)
        while True:
            if self._closed:
                raise grpc.aio.UsageError("Cannot invoke RPC on closed channel!")
            ep = self._core.pick(self._clock(), tried, key)
            if ep is not None:
                target = self._core.started(ep)
                mc = self._callables.get((target, kind, method))
                if mc is None:
                    mc = self._callables[(target, kind, method)] = make(self._subchannels[target])
                return ep, target, mc
            if tried:
                raise _Exhausted()
            if self._has_answer and not wait_for_ready:
                raise self._no_endpoint()
            limits = [t for t in (deadline, None if self._has_answer else first_answer) if t is not None]
            until = min(limits) if limits else None
            left = _remaining(until, self._clock)
            if left is not None and left <= 0:
                if until == deadline:
                    raise BalancerRpcError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                           f"no endpoint of {self.service} to call before the deadline "
                                           f"({self._no_endpoint().details()})")
                raise self._no_endpoint()
            changed = self._changed
            try:
                async with asyncio.timeout(left):
                    await changed.wait()
            except TimeoutError:
                pass

    def _no_endpoint(self) -> BalancerRpcError:
        core = self._core
        if core.missing:
            return BalancerRpcError(grpc.StatusCode.NOT_FOUND, core.error or f'service "{self.service}" not found')
        if core.table is None:
            why = f": {core.error}" if core.error else " (the agent has not answered)"
            return BalancerRpcError(grpc.StatusCode.UNAVAILABLE, f"no table for service {self.service} yet{why}")
        return BalancerRpcError(grpc.StatusCode.UNAVAILABLE,
                                f"service {self.service} has no ready endpoint (table version {core.table.version})")

    def _release(self, ep: Endpoint, target: str, outcome: Outcome) -> None:
        for t in self._core.finished(ep, target, outcome, self._clock()):
            if t in self._subchannels:
                self._spawn(self._drop(t).close())

    def _may_retry(self, exc: grpc.RpcError, method: str) -> bool:
        code = exc.code() if hasattr(exc, "code") else None
        idem = self._idempotent is True or (not isinstance(self._idempotent, bool) and method in self._idempotent)
        details = (exc.details() if hasattr(exc, "details") else "") or ""
        if not isinstance(code, grpc.StatusCode) or not retryable(code.name, details, idempotent=idem):
            return False
        return self._core.try_retry()

    @staticmethod
    def _outcome(code: grpc.StatusCode | None, seconds: float) -> Outcome:
        if code == grpc.StatusCode.UNAVAILABLE:
            return Outcome(seconds=None, transport_failed=True)
        if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, None):
            return Outcome(seconds=None)
        return Outcome(seconds=seconds)

    def _release_when_done(self, call: Any, ep: Endpoint, target: str, started: float) -> None:
        """Release the attempt once its (request-streaming) call ends."""

        async def finish() -> None:
            try:
                code = await call.code()
            except BaseException:  # cancelled: no answer
                code = None
            self._release(ep, target, self._outcome(code, self._clock() - started))

        call.add_done_callback(lambda _call: self._spawn(finish()))

    # -- grpc.aio.Channel -----------------------------------------------------------

    def unary_unary(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                    _registered_method: bool | None = False) -> _AioUnaryUnary:
        return _AioUnaryUnary(self, method, request_serializer, response_deserializer, _registered_method)

    def unary_stream(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                     _registered_method: bool | None = False) -> _AioUnaryStream:
        return _AioUnaryStream(self, method, request_serializer, response_deserializer, _registered_method)

    def stream_unary(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                     _registered_method: bool | None = False) -> _AioStreaming:
        return _AioStreaming(self, method, request_serializer, response_deserializer, _registered_method, "stream_unary")

    def stream_stream(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                      _registered_method: bool | None = False) -> _AioStreaming:
        return _AioStreaming(self, method, request_serializer, response_deserializer, _registered_method, "stream_stream")

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """READY while the table has an endpoint; IDLE before the first table;
        TRANSIENT_FAILURE when it has none; SHUTDOWN once closed."""
        if self._closed:
            return grpc.ChannelConnectivity.SHUTDOWN
        if self._core.endpoints:
            return grpc.ChannelConnectivity.READY
        return grpc.ChannelConnectivity.TRANSIENT_FAILURE if self._has_answer else grpc.ChannelConnectivity.IDLE

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        while self.get_state() == last_observed_state and not self._closed:
            await self._changed.wait()

    async def channel_ready(self) -> None:
        """Wait until the table has an endpoint."""
        await self.wait_for_endpoints(1)

    async def wait_for_endpoints(self, n: int = 1) -> None:
        """Wait until the table has at least `n` endpoints (bound it with a timeout)."""
        while len(self._core.endpoints) < n:
            if self._closed:
                raise grpc.aio.UsageError("channel closed")
            await self._changed.wait()

    def endpoints(self) -> tuple[Endpoint, ...]:
        return self._core.endpoints

    def subchannels(self) -> tuple[str, ...]:
        return tuple(sorted(self._subchannels))

    def table_version(self) -> int | None:
        return self._core.table.version if self._core.table is not None else None

    async def close(self, grace: float | None = None) -> None:
        """Stop following the table and close every sub-channel."""
        if self._closed:
            return
        self._closed = True
        self._notify()
        self._follower.cancel()
        try:
            await self._follower
        except BaseException:  # noqa: BLE001 - its cancellation, or a failure already reported
            pass
        self._core.close()
        channels = list(self._subchannels.values())
        self._subchannels.clear()
        self._callables.clear()
        for ch in channels:
            await ch.close(grace)
        for task in list(self._background):
            await asyncio.gather(task, return_exceptions=True)
        await self._source.close()

    async def __aenter__(self) -> AioBalancedChannel:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class _AioMulti:
    kind = ""

    def __init__(self, channel: AioBalancedChannel, method: str, ser: Any, deser: Any, registered: bool | None) -> None:
        self._ch = channel
        self._method = method
        self._ser = ser
        self._deser = deser
        self._registered = registered

    def _make(self, sub: grpc.aio.Channel) -> Any:
        factory = getattr(sub, self.kind)
        return factory(self._method, request_serializer=self._ser, response_deserializer=self._deser,
                       _registered_method=self._registered)

    async def _acquire(self, tried: frozenset[str], key: bytes | None, deadline: float | None,
                       wait_for_ready: bool | None) -> tuple[Endpoint, str, Any]:
        return await self._ch._acquire(tried, key, deadline, bool(wait_for_ready), self.kind, self._method, self._make)


class _AioUnaryUnary(_AioMulti, grpc.aio.UnaryUnaryMultiCallable):  # type: ignore[misc]
    kind = "unary_unary"

    def __call__(self, request: Any, *, timeout: float | None = None, metadata: Metadata | None = None,
                 credentials: Any = None, wait_for_ready: bool | None = None, compression: Any = None,
                 hash_key: bytes | str | None = None) -> Coroutine[Any, Any, Any]:
        return self._invoke(request, timeout, metadata, credentials, wait_for_ready, compression, hash_key)

    async def _invoke(self, request: Any, timeout: float | None, metadata: Metadata | None, credentials: Any,
                      wait_for_ready: bool | None, compression: Any, hash_key: bytes | str | None) -> Any:
        ch = self._ch
        deadline = _deadline(timeout, ch._clock)
        key = hash_key_of(hash_key, metadata)
        ch._core.request()
        tried: set[str] = set()
        last: grpc.RpcError | None = None
        while True:
            try:
                ep, target, mc = await self._acquire(frozenset(tried), key, deadline, wait_for_ready)
            except _Exhausted:
                assert last is not None
                raise last from None
            started = ch._clock()
            try:
                response = await mc(request, timeout=_remaining(deadline, ch._clock), metadata=metadata,
                                    credentials=credentials, wait_for_ready=False, compression=compression)
            except grpc.aio.AioRpcError as exc:
                ch._release(ep, target, ch._outcome(exc.code(), ch._clock() - started))
                if ch._may_retry(exc, self._method):
                    tried.add(ep.replica_id)
                    last = exc
                    continue
                raise
            except BaseException:
                ch._release(ep, target, Outcome(seconds=None))
                raise
            ch._release(ep, target, Outcome(seconds=ch._clock() - started))
            return response


class _AioResponseStream:
    """A unary-stream call that may restart on another endpoint until its first response."""

    def __init__(self, owner: _AioUnaryStream, request: Any, timeout: float | None, metadata: Metadata | None,
                 credentials: Any, wait_for_ready: bool | None, compression: Any, key: bytes | None) -> None:
        self._owner = owner
        self._args = (request, metadata, credentials, compression)
        self._deadline = _deadline(timeout, owner._ch._clock)
        self._wait_for_ready = wait_for_ready
        self._key = key
        self._call: Any = None
        self._responses = self._run()

    async def _run(self) -> AsyncIterator[Any]:
        owner, ch = self._owner, self._owner._ch
        request, metadata, credentials, compression = self._args
        ch._core.request()
        tried: set[str] = set()
        last: grpc.RpcError | None = None
        got = False
        while True:
            try:
                ep, target, mc = await owner._acquire(frozenset(tried), self._key, self._deadline, self._wait_for_ready)
            except _Exhausted:
                assert last is not None
                raise last from None
            started = ch._clock()
            outcome = Outcome(seconds=None)
            try:
                self._call = mc(request, timeout=_remaining(self._deadline, ch._clock), metadata=metadata,
                                credentials=credentials, wait_for_ready=False, compression=compression)
                async for item in self._call:
                    got = True
                    yield item
                outcome = Outcome(seconds=ch._clock() - started)
                return
            except grpc.aio.AioRpcError as exc:
                outcome = ch._outcome(exc.code(), ch._clock() - started)
                if not got and ch._may_retry(exc, owner._method):
                    tried.add(ep.replica_id)
                    last = exc
                    continue
                raise
            except GeneratorExit:
                # The caller stopped reading: end the call rather than leave it running
                # on a sub-channel that no longer counts it.
                if self._call is not None:
                    self._call.cancel()
                raise
            finally:
                ch._release(ep, target, outcome)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._responses

    async def read(self) -> Any:
        """The next response, or `grpc.aio.EOF` at the end."""
        try:
            return await self._responses.__anext__()
        except StopAsyncIteration:
            return grpc.aio.EOF

    def cancel(self) -> bool:
        return bool(self._call.cancel()) if self._call is not None else False

    def done(self) -> bool:
        return bool(self._call.done()) if self._call is not None else False

    async def code(self) -> grpc.StatusCode:
        return await self._call.code()  # type: ignore[no-any-return]

    async def details(self) -> str:
        return await self._call.details()  # type: ignore[no-any-return]

    async def initial_metadata(self) -> Any:
        return await self._call.initial_metadata()

    async def trailing_metadata(self) -> Any:
        return await self._call.trailing_metadata()


class _AioUnaryStream(_AioMulti, grpc.aio.UnaryStreamMultiCallable):  # type: ignore[misc]
    kind = "unary_stream"

    def __call__(self, request: Any, *, timeout: float | None = None, metadata: Metadata | None = None,
                 credentials: Any = None, wait_for_ready: bool | None = None, compression: Any = None,
                 hash_key: bytes | str | None = None) -> _AioResponseStream:
        return _AioResponseStream(self, request, timeout, metadata, credentials, wait_for_ready, compression,
                                  hash_key_of(hash_key, metadata))


class _AioStreaming(_AioMulti):
    """Stream-unary and stream-stream: balanced, never retried (requests are consumed
    as they are sent)."""

    def __init__(self, channel: AioBalancedChannel, method: str, ser: Any, deser: Any, registered: bool | None,
                 kind: str) -> None:
        super().__init__(channel, method, ser, deser, registered)
        self.kind = kind

    def __call__(self, request_iterator: Any = None, *, timeout: float | None = None,
                 metadata: Metadata | None = None, credentials: Any = None, wait_for_ready: bool | None = None,
                 compression: Any = None, hash_key: bytes | str | None = None) -> Any:
        args = (request_iterator, timeout, metadata, credentials, wait_for_ready, compression, hash_key)
        if self.kind == "stream_unary":
            return self._unary_response(*args)
        return _AioStreamStream(self, args)

    async def _unary_response(self, *args: Any) -> Any:
        return await (await self._start(*args))

    async def _start(self, request_iterator: Any, timeout: float | None, metadata: Metadata | None,
                     credentials: Any, wait_for_ready: bool | None, compression: Any,
                     hash_key: bytes | str | None) -> Any:
        ch = self._ch
        ch._core.request()
        ep, target, mc = await self._acquire(frozenset(), hash_key_of(hash_key, metadata),
                                             _deadline(timeout, ch._clock), wait_for_ready)
        started = ch._clock()
        try:
            call = mc(request_iterator, timeout=timeout, metadata=metadata, credentials=credentials,
                      wait_for_ready=False, compression=compression)
        except BaseException:
            ch._release(ep, target, Outcome(seconds=None))
            raise
        ch._release_when_done(call, ep, target, started)
        return call


class _AioStreamStream:
    """A stream-stream call whose endpoint is picked when it is first used."""

    def __init__(self, owner: _AioStreaming, args: tuple[Any, ...]) -> None:
        self._owner = owner
        self._args = args
        self._call: Any = None
        self._lock = asyncio.Lock()

    async def _ensure(self) -> Any:
        async with self._lock:
            if self._call is None:
                self._call = await self._owner._start(*self._args)
        return self._call

    async def _iterate(self) -> AsyncIterator[Any]:
        call = await self._ensure()
        async for item in call:
            yield item

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def read(self) -> Any:
        return await (await self._ensure()).read()

    async def write(self, request: Any) -> None:
        await (await self._ensure()).write(request)

    async def done_writing(self) -> None:
        await (await self._ensure()).done_writing()

    def cancel(self) -> bool:
        return bool(self._call.cancel()) if self._call is not None else False

    async def code(self) -> grpc.StatusCode:
        return await (await self._ensure()).code()  # type: ignore[no-any-return]

    async def details(self) -> str:
        return await (await self._ensure()).details()  # type: ignore[no-any-return]
