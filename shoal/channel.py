"""A `grpc.Channel` that balances calls over a shoal service's endpoints, in the client.

Python's grpcio has no public API to plug in a name resolver or a load-balancing policy,
so `BalancedChannel` is a channel of its own: it follows the service's table from an
agent (`Control.WatchTable`), keeps one ordinary gRPC sub-channel per endpoint, and
sends each call to the endpoint the service's algorithm picks (`shoal.call_balancer`).
Generated stubs take it like any channel: `WhoamiStub(channel)`.

Rules
- The table is followed on one daemon thread for the life of the channel; a broken
  stream is reopened with back-off, and the last table stays in use meanwhile.
- A call waits for the first table (at most until its deadline, or `table_wait`
  seconds). With no endpoint to send to it fails UNAVAILABLE at once, or, with
  `wait_for_ready=True`, waits for one until its deadline.
- Unary-request calls (unary-unary, unary-stream) are retried on another endpoint when
  the attempt failed before anything left the client (the endpoint's sub-channel could
  not connect), or on any UNAVAILABLE for methods declared idempotent; a unary-stream
  call only before its first response. Each retry spends the retry budget. Calls that
  stream requests are balanced but never retried (their requests are consumed as sent).
  `future()` is balanced and not retried.
- Sub-channel attempts always use `wait_for_ready=False`, so an endpoint that is down
  fails fast (and is retried elsewhere) instead of holding the call.
- Consistent hashing takes its key from the call's `hash_key=` keyword, or else from
  the `shoal-hash-key` metadata entry; without one, a call hashes at random.

What this channel shares with `shoal.aio_channel` (its state around the `CallBalancer`,
picking, retries, releasing attempts) is `shoal.channel_common`; this module adds the
thread, the condition it waits on and the sync multicallables.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import grpc

from shoal.balancing import Endpoint
from shoal.call_balancer import Outcome, table_from_pb
from shoal.channel_common import (HASH_KEY_METADATA, WATCH_BACKOFF, AgentTablesShell, Attempts, BalancerRpcError,
                                  ChannelShell, Exhausted, Metadata, MultiCallableShell, deadline_after,
                                  hash_key_of, remaining)
from shoal.v1 import types_pb2

__all__ = [
    "AgentTables",
    "BalancedChannel",
    "BalancerRpcError",
    "HASH_KEY_METADATA",
    "TableSource",
    "TableWatch",
    "hash_key_of",
]


class TableWatch(Protocol):
    """A stream of one service's tables: iterate it; `cancel()` ends it from another thread."""

    def __iter__(self) -> Iterator[types_pb2.Table]: ...

    def cancel(self) -> bool: ...


class TableSource(Protocol):
    """Where a balanced channel follows its table from (an agent, or a test's twin).
    A watch raises `grpc.RpcError` (NOT_FOUND: no such service) or `NotFound`."""

    def watch(self, service: str) -> TableWatch: ...

    def close(self) -> None: ...


class AgentTables(AgentTablesShell):
    """Tables from a shoal agent's `Control.WatchTable`."""

    def close(self) -> None:
        self._channel.close()


class BalancedChannel(ChannelShell[TableSource], grpc.Channel):  # type: ignore[misc]
    """A channel to every endpoint of one service; see the module docstring.
    Keywords: see `shoal.channel_common.ChannelShell`."""

    _closed_error = ValueError

    def _multicallable_types(self) -> Mapping[str, Callable[..., Any]]:
        return {"unary_unary": _UnaryUnary, "unary_stream": _UnaryStream,
                "stream_unary": _StreamUnary, "stream_stream": _StreamStream}

    def _make_lock(self) -> threading.Condition:
        self._cond = threading.Condition()
        return self._cond

    def _start(self) -> None:
        self._watch: TableWatch | None = None
        self._thread = threading.Thread(target=self._follow, name=f"shoal-table-{self.service}", daemon=True)
        self._thread.start()

    def _notify(self) -> None:
        self._cond.notify_all()

    def _close_channels(self, channels: list[grpc.Channel], *, in_callback: bool = False) -> None:
        if channels and in_callback:
            # A call's termination callback runs inside its channel's machinery, and
            # closing that channel from there deadlocks: close it from a thread.
            threading.Thread(target=lambda: [ch.close() for ch in channels], name="shoal-subchannel-close",
                             daemon=True).start()
            return
        for ch in channels:
            ch.close()

    # -- following the table ------------------------------------------------------

    def _follow(self) -> None:
        pause = WATCH_BACKOFF[0]
        while True:
            with self._cond:
                if self._closed:
                    return
            try:
                watch = self._source.watch(self.service)
                with self._cond:
                    if self._closed:
                        watch.cancel()
                        return
                    self._watch = watch
                for t in watch:
                    self._apply(self._core.update, table_from_pb(t))
                    pause = WATCH_BACKOFF[0]
            except Exception as exc:  # noqa: BLE001 - classified; a bad message must not end the following
                self._watch_failed(exc)
            with self._cond:
                self._watch = None
                if self._closed:
                    return
                # Back-off between reconnections; close() wakes it.
                self._cond.wait(pause)
            pause = min(pause * 2, WATCH_BACKOFF[1])

    # -- picking ----------------------------------------------------------------------

    def _acquire(self, tried: frozenset[str], key: bytes | None, deadline: float | None,
                 wait_for_ready: bool, kind: str, method: str, make: Callable[[grpc.Channel], Any]) -> tuple[Endpoint, str, Any]:
        """An endpoint for the next attempt, its target (counted in flight) and the
        sub-channel's multicallable. `Exhausted` when every endpoint was tried;
        BalancerRpcError when there is none to try."""
        first_answer = self._first_answer(wait_for_ready)
        with self._cond:
            while (got := self._pick(tried, key, kind, method, make)) is None:
                self._cond.wait(self._wait_time(tried, deadline, first_answer, wait_for_ready))
            return got

    # -- grpc.Channel -----------------------------------------------------------------

    def subscribe(self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False) -> None:
        raise NotImplementedError("a balanced channel has one connectivity state per endpoint; "
                                  "use endpoints() and wait_for_endpoints() instead")

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        raise NotImplementedError("a balanced channel has no channel-wide connectivity to subscribe to")

    def close(self) -> None:
        """Stop following the table and close every sub-channel (their calls end)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            watch = self._watch
            channels = self._forget_all()
            self._cond.notify_all()
        if watch is not None:
            watch.cancel()
        self._source.close()
        for ch in channels:
            ch.close()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)

    def __enter__(self) -> BalancedChannel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- inspection ------------------------------------------------------------------

    def wait_for_endpoints(self, n: int = 1, timeout: float | None = None) -> bool:
        """Block until the table has at least `n` endpoints; False at the timeout."""
        deadline = deadline_after(timeout, self._clock)
        with self._cond:
            while len(self._core.endpoints) < n:
                left = remaining(deadline, self._clock)
                if left is not None and left <= 0 or self._closed:
                    return False
                self._cond.wait(left)
            return True


class _Multi(MultiCallableShell):
    """What the four multicallables share: reaching a sub-channel's."""

    _ch: BalancedChannel

    def _acquire(self, attempts: Attempts, key: bytes | None, deadline: float | None,
                 wait_for_ready: bool | None) -> tuple[Endpoint, str, Any]:
        try:
            return self._ch._acquire(attempts.exclude, key, deadline, bool(wait_for_ready), self.kind, self._method,
                                     self._make)
        except Exhausted:
            raise attempts.exhausted() from None

    def _acquire_once(self, timeout: float | None, metadata: Metadata | None, wait_for_ready: bool | None,
                      hash_key: bytes | str | None) -> tuple[Endpoint, str, Any]:
        """The endpoint of a call that is never retried."""
        deadline, key, attempts = self._begin(timeout, metadata, hash_key, retry=False)
        return self._acquire(attempts, key, deadline, wait_for_ready)

    def _released_when_done(self, ep: Endpoint, target: str, open_call: Callable[[], Any]) -> Any:
        """A streaming call opened on the picked sub-channel; the attempt is released when
        the call terminates."""
        ch = self._ch
        started = ch._clock()
        try:
            call = open_call()
        except BaseException:
            ch._release(ep, target, Outcome(seconds=None))
            raise
        done = self._on_done(ep, target, started)
        if not call.add_callback(lambda: done(call)):
            done(call)
        return call

    def _on_done(self, ep: Endpoint, target: str, started: float) -> Callable[[Any], None]:
        """A callback that releases the attempt when its call terminates."""
        ch = self._ch

        def done(call: Any) -> None:
            ch._release(ep, target, ch._outcome(call.code(), ch._clock() - started), in_callback=True)

        return done


class _UnaryUnary(_Multi, grpc.UnaryUnaryMultiCallable):  # type: ignore[misc]
    kind = "unary_unary"

    def _invoke(self, request: Any, timeout: float | None, metadata: Metadata | None, credentials: Any,
                wait_for_ready: bool | None, compression: Any, hash_key: bytes | str | None,
                with_call: bool) -> tuple[Any, grpc.Call | None]:
        ch = self._ch
        deadline, key, attempts = self._begin(timeout, metadata, hash_key)
        while True:
            ep, target, mc = self._acquire(attempts, key, deadline, wait_for_ready)
            with attempts.attempt(ep, target):  # a retryable failure goes round again
                kw = dict(timeout=remaining(deadline, ch._clock), metadata=metadata, credentials=credentials,
                          wait_for_ready=False, compression=compression)
                # with_call only when asked: it costs a call object per call.
                response, call = mc.with_call(request, **kw) if with_call else (mc(request, **kw), None)
                return response, call

    def __call__(self, request: Any, timeout: float | None = None, metadata: Metadata | None = None,
                 credentials: Any = None, wait_for_ready: bool | None = None, compression: Any = None,
                 *, hash_key: bytes | str | None = None) -> Any:
        return self._invoke(request, timeout, metadata, credentials, wait_for_ready, compression, hash_key, False)[0]

    def with_call(self, request: Any, timeout: float | None = None, metadata: Metadata | None = None,
                  credentials: Any = None, wait_for_ready: bool | None = None, compression: Any = None,
                  *, hash_key: bytes | str | None = None) -> tuple[Any, grpc.Call]:
        response, call = self._invoke(request, timeout, metadata, credentials, wait_for_ready, compression,
                                      hash_key, True)
        assert call is not None
        return response, call

    def future(self, request: Any, timeout: float | None = None, metadata: Metadata | None = None,
               credentials: Any = None, wait_for_ready: bool | None = None, compression: Any = None,
               *, hash_key: bytes | str | None = None) -> Any:
        ep, target, mc = self._acquire_once(timeout, metadata, wait_for_ready, hash_key)
        fut = mc.future(request, timeout=timeout, metadata=metadata, credentials=credentials,
                        wait_for_ready=False, compression=compression)
        fut.add_done_callback(self._on_done(ep, target, self._ch._clock()))
        return fut


class _ResponseStream(grpc.Call):  # type: ignore[misc]
    """A unary-stream call that may restart on another endpoint until its first response."""

    def __init__(self, attempts: Attempts, start: Callable[[], tuple[Endpoint, Any]]) -> None:
        self._attempts = attempts
        self._start = start
        ep, self._call = start()
        self._ep = ep

    def __iter__(self) -> _ResponseStream:
        return self

    def __next__(self) -> Any:
        while True:
            try:
                item = next(self._call)
            except grpc.RpcError as exc:
                if self._attempts.retrying(self._ep, exc):
                    self._ep, self._call = self._start()  # every endpoint tried: raises exc
                    continue
                raise
            self._attempts.retry = False  # the first response came: the call stays here
            return item

    def __getattr__(self, name: str) -> Any:  # code(), details(), cancel(), metadata...
        return getattr(self._call, name)

    def is_active(self) -> bool:
        return bool(self._call.is_active())

    def time_remaining(self) -> float | None:
        return self._call.time_remaining()  # type: ignore[no-any-return]

    def cancel(self) -> bool:
        return bool(self._call.cancel())

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return bool(self._call.add_callback(callback))

    def initial_metadata(self) -> Any:
        return self._call.initial_metadata()

    def trailing_metadata(self) -> Any:
        return self._call.trailing_metadata()

    def code(self) -> grpc.StatusCode:
        return self._call.code()  # type: ignore[no-any-return]

    def details(self) -> str:
        return self._call.details()  # type: ignore[no-any-return]


class _UnaryStream(_Multi, grpc.UnaryStreamMultiCallable):  # type: ignore[misc]
    kind = "unary_stream"

    def __call__(self, request: Any, timeout: float | None = None, metadata: Metadata | None = None,
                 credentials: Any = None, wait_for_ready: bool | None = None, compression: Any = None,
                 *, hash_key: bytes | str | None = None) -> _ResponseStream:
        ch = self._ch
        deadline, key, attempts = self._begin(timeout, metadata, hash_key)

        def start() -> tuple[Endpoint, Any]:
            ep, target, mc = self._acquire(attempts, key, deadline, wait_for_ready)
            return ep, self._released_when_done(ep, target, lambda: mc(
                request, timeout=remaining(deadline, ch._clock), metadata=metadata, credentials=credentials,
                wait_for_ready=False, compression=compression))

        return _ResponseStream(attempts, start)


class _StreamUnary(_Multi, grpc.StreamUnaryMultiCallable):  # type: ignore[misc]
    kind = "stream_unary"

    def with_call(self, request_iterator: Iterator[Any], timeout: float | None = None,
                  metadata: Metadata | None = None, credentials: Any = None, wait_for_ready: bool | None = None,
                  compression: Any = None, *, hash_key: bytes | str | None = None) -> tuple[Any, grpc.Call]:
        ep, target, mc = self._acquire_once(timeout, metadata, wait_for_ready, hash_key)
        with Attempts(self._ch, self._method, retry=False).attempt(ep, target):
            result: tuple[Any, grpc.Call] = mc.with_call(
                request_iterator, timeout=timeout, metadata=metadata, credentials=credentials,
                wait_for_ready=False, compression=compression)
        return result

    def __call__(self, request_iterator: Iterator[Any], timeout: float | None = None,
                 metadata: Metadata | None = None, credentials: Any = None, wait_for_ready: bool | None = None,
                 compression: Any = None, *, hash_key: bytes | str | None = None) -> Any:
        return self.with_call(request_iterator, timeout, metadata, credentials, wait_for_ready, compression,
                              hash_key=hash_key)[0]

    def future(self, request_iterator: Iterator[Any], timeout: float | None = None,
               metadata: Metadata | None = None, credentials: Any = None, wait_for_ready: bool | None = None,
               compression: Any = None, *, hash_key: bytes | str | None = None) -> Any:
        ep, target, mc = self._acquire_once(timeout, metadata, wait_for_ready, hash_key)
        fut = mc.future(request_iterator, timeout=timeout, metadata=metadata, credentials=credentials,
                        wait_for_ready=False, compression=compression)
        fut.add_done_callback(self._on_done(ep, target, self._ch._clock()))
        return fut


class _StreamStream(_Multi, grpc.StreamStreamMultiCallable):  # type: ignore[misc]
    kind = "stream_stream"

    def __call__(self, request_iterator: Iterator[Any], timeout: float | None = None,
                 metadata: Metadata | None = None, credentials: Any = None, wait_for_ready: bool | None = None,
                 compression: Any = None, *, hash_key: bytes | str | None = None) -> Any:
        ep, target, mc = self._acquire_once(timeout, metadata, wait_for_ready, hash_key)
        return self._released_when_done(ep, target, lambda: mc(
            request_iterator, timeout=timeout, metadata=metadata, credentials=credentials,
            wait_for_ready=False, compression=compression))
