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
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import grpc

from shoal.balancing import EjectionConfig, Endpoint, RetryBudget
from shoal.call_balancer import CallBalancer, Outcome, TableChange, retryable, table_from_pb
from shoal.errors import NotFound, ShoalError
from shoal.v1 import control_pb2, control_pb2_grpc, types_pb2

__all__ = [
    "AgentTables",
    "BalancedChannel",
    "BalancerRpcError",
    "HASH_KEY_METADATA",
    "TableSource",
    "TableWatch",
    "hash_key_of",
]

HASH_KEY_METADATA = "shoal-hash-key"
"""Metadata entry whose value is a consistent-hash call's key."""

TABLE_WAIT = 10.0
"""Seconds a call without a deadline waits for the first table: longer than an agent
takes to hear from a leader after a restart, short enough to report a dead agent."""

WATCH_BACKOFF = (0.1, 5.0)
"""First and longest pause (seconds) before reopening a broken table stream."""

Metadata = Sequence[tuple[str, str | bytes]]


class TableWatch(Protocol):
    """A stream of one service's tables: iterate it; `cancel()` ends it from another thread."""

    def __iter__(self) -> Iterator[types_pb2.Table]: ...

    def cancel(self) -> bool: ...


class TableSource(Protocol):
    """Where a balanced channel follows its table from (an agent, or a test's twin).
    A watch raises `grpc.RpcError` (NOT_FOUND: no such service) or `NotFound`."""

    def watch(self, service: str) -> TableWatch: ...

    def close(self) -> None: ...


class AgentTables:
    """Tables from a shoal agent's `Control.WatchTable`."""

    def __init__(self, agent: str, *, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.agent = agent
        self._channel = (grpc.secure_channel(agent, credentials) if credentials is not None
                         else grpc.insecure_channel(agent))
        self._stub = control_pb2_grpc.ControlStub(self._channel)

    def watch(self, service: str) -> TableWatch:
        call: TableWatch = self._stub.WatchTable(control_pb2.WatchTableRequest(service=service))
        return call

    def close(self) -> None:
        self._channel.close()


class BalancerRpcError(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """A call the balanced channel failed by itself (no table, no endpoint), shaped like
    the errors gRPC raises so callers handle both alike."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> Metadata:
        return ()

    def trailing_metadata(self) -> Metadata:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False

    def debug_error_string(self) -> str:
        return self._details


def hash_key_of(hash_key: bytes | str | None, metadata: Metadata | None) -> bytes | None:
    """A consistent-hash call's key: the keyword, else the metadata entry, else None."""
    if hash_key is None and metadata:
        for k, v in metadata:
            if k == HASH_KEY_METADATA:
                hash_key = v
                break
    if isinstance(hash_key, str):
        return hash_key.encode()
    return hash_key


class _Exhausted(Exception):
    """Every endpoint was tried for this call: the caller re-raises its last error."""


def _deadline(timeout: float | None, clock: Callable[[], float]) -> float | None:
    return None if timeout is None else clock() + timeout


def _remaining(deadline: float | None, clock: Callable[[], float]) -> float | None:
    return None if deadline is None else max(0.0, deadline - clock())


class BalancedChannel(grpc.Channel):  # type: ignore[misc]
    """A channel to every endpoint of one service; see the module docstring."""

    def __init__(
        self,
        service: str,
        source: TableSource,
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
        # True: every method; else the full method names ("/pkg.Service/Method").
        self._idempotent: bool | frozenset[str] = idempotent if isinstance(idempotent, bool) else frozenset(idempotent)
        self._credentials = credentials
        self._options = list(options)
        self._table_wait = table_wait
        self._clock = clock
        self._core = CallBalancer(service, rng or random.Random(), ejection, retry_budget or RetryBudget())
        self._cond = threading.Condition()
        self._subchannels: dict[str, grpc.Channel] = {}
        self._callables: dict[tuple[str, str, str], Any] = {}
        self._closed = False
        self._watch: TableWatch | None = None
        self._has_answer = False  # a table or a definite error came from the source
        self._thread = threading.Thread(target=self._follow, name=f"shoal-table-{service}", daemon=True)
        self._thread.start()

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
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                if code == grpc.StatusCode.NOT_FOUND:
                    self._apply(self._core.lost, exc.details() or f'service "{self.service}" not found')
                else:
                    self._failed(f"{code.name if code else 'error'}: {exc.details() if hasattr(exc, 'details') else exc}")
            except NotFound as exc:
                self._apply(self._core.lost, str(exc))
            except ShoalError as exc:
                self._failed(str(exc))
            except Exception as exc:  # noqa: BLE001 - a bad message must not end the following
                self._failed(repr(exc))
            with self._cond:
                self._watch = None
                if self._closed:
                    return
                # Back-off between reconnections; close() wakes it.
                self._cond.wait(pause)
            pause = min(pause * 2, WATCH_BACKOFF[1])

    def _apply(self, step: Callable[[Any], TableChange], arg: Any) -> None:
        with self._cond:
            if self._closed:
                return
            change = step(arg)
            for target in change.opened:
                self._subchannels[target] = self._open(target)
            gone = [self._drop(t) for t in change.closed]
            self._has_answer = True
            self._cond.notify_all()
        for ch in gone:
            ch.close()

    def _failed(self, why: str) -> None:
        with self._cond:
            if self._core.table is None and not self._core.missing:
                self._core.error = f"cannot follow it from the agent ({why})"
            self._cond.notify_all()

    def _open(self, target: str) -> grpc.Channel:
        if self._credentials is not None:
            return grpc.secure_channel(target, self._credentials, options=self._options)
        return grpc.insecure_channel(target, options=self._options)

    def _drop(self, target: str) -> grpc.Channel:
        """Forget a target's sub-channel (held lock); the caller closes it outside."""
        for k in [k for k in self._callables if k[0] == target]:
            del self._callables[k]
        return self._subchannels.pop(target)

    # -- picking ----------------------------------------------------------------------

    def _acquire(self, tried: frozenset[str], key: bytes | None, deadline: float | None,
                 wait_for_ready: bool, kind: str, method: str, make: Callable[[grpc.Channel], Any]) -> tuple[Endpoint, str, Any]:
        """An endpoint for the next attempt, its target (counted in flight) and the
        sub-channel's multicallable. `_Exhausted` when every endpoint was tried;
        BalancerRpcError when there is none to try."""
        # Without wait_for_ready, a call waits only for the agent's first answer.
        first_answer = None if wait_for_ready else _deadline(self._table_wait, self._clock)
        with self._cond:
            while True:
                if self._closed:
                    raise ValueError("Cannot invoke RPC on closed channel!")
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
                self._cond.wait(left)

    def _no_endpoint(self) -> BalancerRpcError:
        core = self._core
        if core.missing:
            return BalancerRpcError(grpc.StatusCode.NOT_FOUND, core.error or f'service "{self.service}" not found')
        if core.table is None:
            why = f": {core.error}" if core.error else " (the agent has not answered)"
            return BalancerRpcError(grpc.StatusCode.UNAVAILABLE, f"no table for service {self.service} yet{why}")
        return BalancerRpcError(grpc.StatusCode.UNAVAILABLE,
                                f"service {self.service} has no ready endpoint (table version {core.table.version})")

    def _release(self, ep: Endpoint, target: str, outcome: Outcome, *, in_callback: bool = False) -> None:
        with self._cond:
            gone = [self._drop(t) for t in self._core.finished(ep, target, outcome, self._clock())]
        if gone and in_callback:
            # A call's termination callback runs inside its channel's machinery, and
            # closing that channel from there deadlocks: close it from a thread.
            threading.Thread(target=lambda: [ch.close() for ch in gone], name="shoal-subchannel-close",
                             daemon=True).start()
            return
        for ch in gone:
            ch.close()

    def _request(self) -> None:
        with self._cond:
            self._core.request()

    def _may_retry(self, exc: grpc.RpcError, method: str) -> bool:
        code = exc.code() if hasattr(exc, "code") else None
        idem = self._idempotent is True or (not isinstance(self._idempotent, bool) and method in self._idempotent)
        if code is None or not retryable(code.name, exc.details() or "", idempotent=idem):
            return False
        with self._cond:
            return self._core.try_retry()

    def _outcome(self, exc: grpc.RpcError | None, seconds: float) -> Outcome:
        if exc is None:
            return Outcome(seconds=seconds)
        code = exc.code() if hasattr(exc, "code") else None
        if code == grpc.StatusCode.UNAVAILABLE:
            return Outcome(seconds=None, transport_failed=True)
        if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            return Outcome(seconds=None)
        return Outcome(seconds=seconds)  # the endpoint answered, with an error status

    # -- grpc.Channel -----------------------------------------------------------------

    def unary_unary(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                    _registered_method: bool | None = False) -> _UnaryUnary:
        return _UnaryUnary(self, method, request_serializer, response_deserializer, _registered_method)

    def unary_stream(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                     _registered_method: bool | None = False) -> _UnaryStream:
        return _UnaryStream(self, method, request_serializer, response_deserializer, _registered_method)

    def stream_unary(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                     _registered_method: bool | None = False) -> _StreamUnary:
        return _StreamUnary(self, method, request_serializer, response_deserializer, _registered_method)

    def stream_stream(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                      _registered_method: bool | None = False) -> _StreamStream:
        return _StreamStream(self, method, request_serializer, response_deserializer, _registered_method)

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
            self._core.close()
            channels = list(self._subchannels.values())
            self._subchannels.clear()
            self._callables.clear()
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

    def endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints calls are balanced over now."""
        with self._cond:
            return self._core.endpoints

    def subchannels(self) -> tuple[str, ...]:
        """The targets with an open sub-channel (endpoints, and removed ones still finishing calls)."""
        with self._cond:
            return tuple(sorted(self._subchannels))

    def table_version(self) -> int | None:
        with self._cond:
            return self._core.table.version if self._core.table is not None else None

    def wait_for_endpoints(self, n: int = 1, timeout: float | None = None) -> bool:
        """Block until the table has at least `n` endpoints; False at the timeout."""
        deadline = _deadline(timeout, self._clock)
        with self._cond:
            while len(self._core.endpoints) < n:
                left = _remaining(deadline, self._clock)
                if left is not None and left <= 0 or self._closed:
                    return False
                self._cond.wait(left)
            return True


class _Multi:
    """What the four multicallables share: the method and how to reach a sub-channel's."""

    kind = ""

    def __init__(self, channel: BalancedChannel, method: str, ser: Any, deser: Any, registered: bool | None) -> None:
        self._ch = channel
        self._method = method
        self._ser = ser
        self._deser = deser
        self._registered = registered

    def _make(self, sub: grpc.Channel) -> Any:
        factory = getattr(sub, self.kind)
        return factory(self._method, request_serializer=self._ser, response_deserializer=self._deser,
                       _registered_method=self._registered)

    def _acquire(self, tried: frozenset[str], key: bytes | None, deadline: float | None,
                 wait_for_ready: bool | None) -> tuple[Endpoint, str, Any]:
        return self._ch._acquire(tried, key, deadline, bool(wait_for_ready), self.kind, self._method, self._make)

    def _on_done(self, ep: Endpoint, target: str, started: float) -> Callable[[Any], None]:
        """A callback that releases the attempt when its call terminates."""
        ch = self._ch

        def done(call: Any) -> None:
            code = call.code()
            exc = None if code == grpc.StatusCode.OK else call
            ch._release(ep, target, ch._outcome(exc, ch._clock() - started), in_callback=True)

        return done


class _UnaryUnary(_Multi, grpc.UnaryUnaryMultiCallable):  # type: ignore[misc]
    kind = "unary_unary"

    def _invoke(self, request: Any, timeout: float | None, metadata: Metadata | None, credentials: Any,
                wait_for_ready: bool | None, compression: Any, hash_key: bytes | str | None,
                with_call: bool) -> tuple[Any, grpc.Call | None]:
        ch = self._ch
        deadline = _deadline(timeout, ch._clock)
        key = hash_key_of(hash_key, metadata)
        ch._request()
        tried: set[str] = set()
        last: grpc.RpcError | None = None
        while True:
            try:
                ep, target, mc = self._acquire(frozenset(tried), key, deadline, wait_for_ready)
            except _Exhausted:
                assert last is not None
                raise last from None
            started = ch._clock()
            try:
                kw = dict(timeout=_remaining(deadline, ch._clock), metadata=metadata, credentials=credentials,
                          wait_for_ready=False, compression=compression)
                # with_call only when asked: it costs a call object per call.
                response, call = mc.with_call(request, **kw) if with_call else (mc(request, **kw), None)
            except grpc.RpcError as exc:
                ch._release(ep, target, ch._outcome(exc, ch._clock() - started))
                if ch._may_retry(exc, self._method):
                    tried.add(ep.replica_id)
                    last = exc
                    continue
                raise
            except BaseException:
                ch._release(ep, target, Outcome(seconds=None))
                raise
            ch._release(ep, target, Outcome(seconds=ch._clock() - started))
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
        ch = self._ch
        ch._request()
        ep, target, mc = self._acquire(frozenset(), hash_key_of(hash_key, metadata), _deadline(timeout, ch._clock),
                                       wait_for_ready)
        fut = mc.future(request, timeout=timeout, metadata=metadata, credentials=credentials,
                        wait_for_ready=False, compression=compression)
        fut.add_done_callback(self._on_done(ep, target, ch._clock()))
        return fut


class _ResponseStream(grpc.Call):  # type: ignore[misc]
    """A unary-stream call that may restart on another endpoint until its first response."""

    def __init__(self, owner: _UnaryStream, start: Callable[[frozenset[str]], tuple[Endpoint, Any]]) -> None:
        self._owner = owner
        self._start = start
        self._tried: set[str] = set()
        self._got = False
        ep, self._call = start(frozenset())
        self._ep = ep

    def __iter__(self) -> _ResponseStream:
        return self

    def __next__(self) -> Any:
        while True:
            try:
                item = next(self._call)
            except grpc.RpcError as exc:
                if not self._got and self._owner._ch._may_retry(exc, self._owner._method):
                    self._tried.add(self._ep.replica_id)
                    try:
                        self._ep, self._call = self._start(frozenset(self._tried))
                    except _Exhausted:
                        raise exc from None
                    continue
                raise
            self._got = True
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
        deadline = _deadline(timeout, ch._clock)
        key = hash_key_of(hash_key, metadata)
        ch._request()

        def start(tried: frozenset[str]) -> tuple[Endpoint, Any]:
            ep, target, mc = self._acquire(tried, key, deadline, wait_for_ready)
            started = ch._clock()
            try:
                call = mc(request, timeout=_remaining(deadline, ch._clock), metadata=metadata,
                          credentials=credentials, wait_for_ready=False, compression=compression)
            except BaseException:
                ch._release(ep, target, Outcome(seconds=None))
                raise
            done = self._on_done(ep, target, started)
            if not call.add_callback(lambda: done(call)):
                done(call)
            return ep, call

        return _ResponseStream(self, start)


class _StreamUnary(_Multi, grpc.StreamUnaryMultiCallable):  # type: ignore[misc]
    kind = "stream_unary"

    def _start(self, timeout: float | None, metadata: Metadata | None, wait_for_ready: bool | None,
               hash_key: bytes | str | None) -> tuple[Endpoint, str, Any, float]:
        ch = self._ch
        ch._request()
        ep, target, mc = self._acquire(frozenset(), hash_key_of(hash_key, metadata), _deadline(timeout, ch._clock),
                                       wait_for_ready)
        return ep, target, mc, ch._clock()

    def with_call(self, request_iterator: Iterator[Any], timeout: float | None = None,
                  metadata: Metadata | None = None, credentials: Any = None, wait_for_ready: bool | None = None,
                  compression: Any = None, *, hash_key: bytes | str | None = None) -> tuple[Any, grpc.Call]:
        ch = self._ch
        ep, target, mc, started = self._start(timeout, metadata, wait_for_ready, hash_key)
        try:
            result: tuple[Any, grpc.Call] = mc.with_call(
                request_iterator, timeout=timeout, metadata=metadata, credentials=credentials,
                wait_for_ready=False, compression=compression)
        except grpc.RpcError as exc:
            ch._release(ep, target, ch._outcome(exc, ch._clock() - started))
            raise
        except BaseException:
            ch._release(ep, target, Outcome(seconds=None))
            raise
        ch._release(ep, target, Outcome(seconds=ch._clock() - started))
        return result

    def __call__(self, request_iterator: Iterator[Any], timeout: float | None = None,
                 metadata: Metadata | None = None, credentials: Any = None, wait_for_ready: bool | None = None,
                 compression: Any = None, *, hash_key: bytes | str | None = None) -> Any:
        return self.with_call(request_iterator, timeout, metadata, credentials, wait_for_ready, compression,
                              hash_key=hash_key)[0]

    def future(self, request_iterator: Iterator[Any], timeout: float | None = None,
               metadata: Metadata | None = None, credentials: Any = None, wait_for_ready: bool | None = None,
               compression: Any = None, *, hash_key: bytes | str | None = None) -> Any:
        ep, target, mc, started = self._start(timeout, metadata, wait_for_ready, hash_key)
        fut = mc.future(request_iterator, timeout=timeout, metadata=metadata, credentials=credentials,
                        wait_for_ready=False, compression=compression)
        fut.add_done_callback(self._on_done(ep, target, started))
        return fut


class _StreamStream(_Multi, grpc.StreamStreamMultiCallable):  # type: ignore[misc]
    kind = "stream_stream"

    def __call__(self, request_iterator: Iterator[Any], timeout: float | None = None,
                 metadata: Metadata | None = None, credentials: Any = None, wait_for_ready: bool | None = None,
                 compression: Any = None, *, hash_key: bytes | str | None = None) -> Any:
        ch = self._ch
        ch._request()
        ep, target, mc = self._acquire(frozenset(), hash_key_of(hash_key, metadata), _deadline(timeout, ch._clock),
                                       wait_for_ready)
        started = ch._clock()
        try:
            call = mc(request_iterator, timeout=timeout, metadata=metadata, credentials=credentials,
                      wait_for_ready=False, compression=compression)
        except BaseException:
            ch._release(ep, target, Outcome(seconds=None))
            raise
        done = self._on_done(ep, target, started)
        if not call.add_callback(lambda: done(call)):
            done(call)
        return call
