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
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Callable, Coroutine, Mapping
from typing import Any, Protocol

import grpc

from shoal.balancing import Endpoint
from shoal.call_balancer import Outcome, table_from_pb
from shoal.channel_common import (WATCH_BACKOFF, AgentTablesShell, Attempts, ChannelShell, Exhausted, Metadata,
                                  MultiCallableShell, deadline_after, hash_key_of, remaining)
from shoal.v1 import types_pb2

__all__ = ["AioAgentTables", "AioBalancedChannel", "AioTableSource"]


class AioTableSource(Protocol):
    """Where an aio balanced channel follows its table from. A watch raises
    `grpc.RpcError` (NOT_FOUND: no such service) or `NotFound`."""

    def watch(self, service: str) -> AsyncIterable[types_pb2.Table]: ...

    async def close(self) -> None: ...


class AioAgentTables(AgentTablesShell):
    """Tables from a shoal agent's `Control.WatchTable`, over `grpc.aio`."""

    _api = grpc.aio

    async def close(self) -> None:
        await self._channel.close()


class AioBalancedChannel(ChannelShell[AioTableSource], grpc.aio.Channel):  # type: ignore[misc]
    """A `grpc.aio` channel to every endpoint of one service.
    Keywords: see `shoal.channel_common.ChannelShell`."""

    _api = grpc.aio
    _closed_error = grpc.aio.UsageError

    def _multicallable_types(self) -> Mapping[str, Callable[..., Any]]:
        return {"unary_unary": _AioUnaryUnary, "unary_stream": _AioUnaryStream,
                "stream_unary": _AioStreamUnary, "stream_stream": _AioStreamStreamMulti}

    def _make_lock(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()  # one loop: nothing runs between two awaits

    def _start(self) -> None:
        # Replaced at every table change: a waiter holds the event of the state it saw.
        self._changed = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self._follower = asyncio.get_running_loop().create_task(self._follow(), name=f"shoal-table-{self.service}")

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _close_channels(self, channels: list[grpc.aio.Channel], *, in_callback: bool = False) -> None:
        for ch in channels:
            self._spawn(ch.close())

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- following the table ------------------------------------------------------

    async def _follow(self) -> None:
        pause = WATCH_BACKOFF[0]
        while not self._closed:
            try:
                async for t in self._source.watch(self.service):
                    self._apply(self._core.update, table_from_pb(t))
                    pause = WATCH_BACKOFF[0]
            except Exception as exc:  # noqa: BLE001 - classified; a bad message must not end the following
                self._watch_failed(exc)
            await asyncio.sleep(pause)  # back-off before reopening the stream
            pause = min(pause * 2, WATCH_BACKOFF[1])

    # -- picking ----------------------------------------------------------------------

    async def _acquire(self, tried: frozenset[str], key: bytes | None, deadline: float | None,
                       wait_for_ready: bool, kind: str, method: str, make: Callable[[grpc.aio.Channel], Any]) -> tuple[Endpoint, str, Any]:
        first_answer = self._first_answer(wait_for_ready)
        while (got := self._pick(tried, key, kind, method, make)) is None:
            left = self._wait_time(tried, deadline, first_answer, wait_for_ready)
            changed = self._changed
            try:
                async with asyncio.timeout(left):
                    await changed.wait()
            except TimeoutError:
                pass
        return got

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
        for ch in self._forget_all():
            await ch.close(grace)
        for task in list(self._background):
            await asyncio.gather(task, return_exceptions=True)
        await self._source.close()

    async def __aenter__(self) -> AioBalancedChannel:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class _AioMulti(MultiCallableShell):
    _ch: AioBalancedChannel

    async def _acquire(self, attempts: Attempts, key: bytes | None, deadline: float | None,
                       wait_for_ready: bool | None) -> tuple[Endpoint, str, Any]:
        try:
            return await self._ch._acquire(attempts.exclude, key, deadline, bool(wait_for_ready), self.kind,
                                           self._method, self._make)
        except Exhausted:
            raise attempts.exhausted() from None


class _AioUnaryUnary(_AioMulti, grpc.aio.UnaryUnaryMultiCallable):  # type: ignore[misc]
    kind = "unary_unary"

    def __call__(self, request: Any, *, timeout: float | None = None, metadata: Metadata | None = None,
                 credentials: Any = None, wait_for_ready: bool | None = None, compression: Any = None,
                 hash_key: bytes | str | None = None) -> Coroutine[Any, Any, Any]:
        return self._invoke(request, timeout, metadata, credentials, wait_for_ready, compression, hash_key)

    async def _invoke(self, request: Any, timeout: float | None, metadata: Metadata | None, credentials: Any,
                      wait_for_ready: bool | None, compression: Any, hash_key: bytes | str | None) -> Any:
        ch = self._ch
        deadline, key, attempts = self._begin(timeout, metadata, hash_key)
        while True:
            ep, target, mc = await self._acquire(attempts, key, deadline, wait_for_ready)
            with attempts.attempt(ep, target):  # a retryable failure goes round again
                return await mc(request, timeout=remaining(deadline, ch._clock), metadata=metadata,
                                credentials=credentials, wait_for_ready=False, compression=compression)


class _AioResponseStream:
    """A unary-stream call that may restart on another endpoint until its first response."""

    def __init__(self, owner: _AioUnaryStream, request: Any, timeout: float | None, metadata: Metadata | None,
                 credentials: Any, wait_for_ready: bool | None, compression: Any, key: bytes | None) -> None:
        self._owner = owner
        self._args = (request, metadata, credentials, compression)
        self._deadline = deadline_after(timeout, owner._ch._clock)
        self._wait_for_ready = wait_for_ready
        self._key = key
        self._call: Any = None
        self._responses = self._run()

    async def _run(self) -> AsyncIterator[Any]:
        owner, ch = self._owner, self._owner._ch
        request, metadata, credentials, compression = self._args
        ch._request()
        attempts = Attempts(ch, owner._method)
        while True:
            ep, target, mc = await owner._acquire(attempts, self._key, self._deadline, self._wait_for_ready)
            with attempts.attempt(ep, target):  # a retryable failure goes round again
                self._call = mc(request, timeout=remaining(self._deadline, ch._clock), metadata=metadata,
                                credentials=credentials, wait_for_ready=False, compression=compression)
                try:
                    async for item in self._call:
                        attempts.retry = False  # the first response came: the call stays here
                        yield item
                except GeneratorExit:
                    # The caller stopped reading: end the call rather than leave it running
                    # on a sub-channel that no longer counts it.
                    self._call.cancel()
                    raise
                return

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
        deadline, key, attempts = self._begin(timeout, metadata, hash_key, retry=False)
        ep, target, mc = await self._acquire(attempts, key, deadline, wait_for_ready)
        started = ch._clock()
        try:
            call = mc(request_iterator, timeout=timeout, metadata=metadata, credentials=credentials,
                      wait_for_ready=False, compression=compression)
        except BaseException:
            ch._release(ep, target, Outcome(seconds=None))
            raise
        ch._release_when_done(call, ep, target, started)
        return call


class _AioStreamUnary(_AioStreaming):
    kind = "stream_unary"


class _AioStreamStreamMulti(_AioStreaming):
    kind = "stream_stream"


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
