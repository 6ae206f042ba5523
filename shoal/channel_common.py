"""What the sync and aio balanced channels (`shoal.channel`, `shoal.aio_channel`) share.

Both shells keep the same state around one `CallBalancer` and take the same decisions;
they differ only in how they wait (a `threading.Condition`, or an `asyncio.Event`
replaced at every change) and how they close a sub-channel (at once, or in a task).
`ChannelShell` holds the state and the decisions; a shell supplies the lock, the
wake-up and the closing.

Rules
- Every method of `ChannelShell` that touches the state takes `self._lock` (the sync
  shell's condition; a no-op context on the aio shell, whose loop is its lock), and
  never waits or closes a channel while holding it: it hands what to close back, or to
  `_close_channels` after the lock is released.
- A table stream's failure is classified in one place (`_watch_failed`): NOT_FOUND
  means the service is gone (no endpoints until it is back); anything else is a
  failure to follow, reported only while no table was ever received.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Generic, TypeVar

import grpc

from shoal.balancing import EjectionConfig, Endpoint, RetryBudget
from shoal.call_balancer import CallBalancer, Outcome, TableChange, retryable
from shoal.errors import NotFound, ShoalError
from shoal.v1 import control_pb2, control_pb2_grpc

__all__ = [
    "AgentTablesShell",
    "Attempts",
    "BalancerRpcError",
    "ChannelShell",
    "Exhausted",
    "HASH_KEY_METADATA",
    "Metadata",
    "MultiCallableShell",
    "TABLE_WAIT",
    "WATCH_BACKOFF",
    "code_of",
    "deadline_after",
    "hash_key_of",
    "open_channel",
    "remaining",
]

HASH_KEY_METADATA = "shoal-hash-key"
"""Metadata entry whose value is a consistent-hash call's key."""

TABLE_WAIT = 10.0
"""Seconds a call without a deadline waits for the first table: longer than an agent
takes to hear from a leader after a restart, short enough to report a dead agent."""

WATCH_BACKOFF = (0.1, 5.0)
"""First and longest pause (seconds) before reopening a broken table stream."""

Metadata = Sequence[tuple[str, str | bytes]]

SourceT = TypeVar("SourceT")


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


class Exhausted(Exception):
    """Every endpoint was tried for this call: the caller re-raises its last error."""


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


def code_of(exc: BaseException) -> grpc.StatusCode | None:
    """A gRPC error's status code; None for one that has none."""
    code = exc.code() if hasattr(exc, "code") else None
    return code if isinstance(code, grpc.StatusCode) else None


def deadline_after(timeout: float | None, clock: Callable[[], float]) -> float | None:
    return None if timeout is None else clock() + timeout


def remaining(deadline: float | None, clock: Callable[[], float]) -> float | None:
    return None if deadline is None else max(0.0, deadline - clock())


def open_channel(api: Any, target: str, credentials: grpc.ChannelCredentials | None,
                 options: Sequence[tuple[str, Any]] = ()) -> Any:
    """A channel to `target` from `api` (the `grpc` or the `grpc.aio` module)."""
    if credentials is not None:
        return api.secure_channel(target, credentials, options=list(options))
    return api.insecure_channel(target, options=list(options))


class AgentTablesShell:
    """Tables from a shoal agent's `Control.WatchTable`, on the channel kind of `_api`."""

    _api: ClassVar[Any] = grpc

    def __init__(self, agent: str, *, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.agent = agent
        self._channel = open_channel(self._api, agent, credentials)
        self._stub = control_pb2_grpc.ControlStub(self._channel)

    def watch(self, service: str) -> Any:
        return self._stub.WatchTable(control_pb2.WatchTableRequest(service=service))


def _multicallable_factory(kind: str) -> Callable[..., Any]:
    """`grpc.Channel.unary_unary` and its three siblings: each builds the shell's
    multicallable of that kind."""

    def factory(self: ChannelShell[Any], method: str, request_serializer: Any = None,
                response_deserializer: Any = None, _registered_method: bool | None = False) -> Any:
        return self._multicallable_types()[kind](self, method, request_serializer, response_deserializer,
                                          _registered_method)

    factory.__name__ = factory.__qualname__ = kind
    return factory


class ChannelShell(Generic[SourceT]):
    """The state and decisions of a balanced channel; see the module docstring.
    A shell sets `_api` and `_closed_error`, and implements `_multicallable_types`,
    `_make_lock`, `_start`, `_notify` and `_close_channels`."""

    _api: ClassVar[Any] = grpc
    """The module whose channels are the sub-channels (`grpc` or `grpc.aio`)."""
    _closed_error: ClassVar[type[Exception]] = ValueError
    """What a call on a closed channel raises (as gRPC's own channels do)."""

    unary_unary = _multicallable_factory("unary_unary")
    unary_stream = _multicallable_factory("unary_stream")
    stream_unary = _multicallable_factory("stream_unary")
    stream_stream = _multicallable_factory("stream_stream")

    def __init__(
        self,
        service: str,
        source: SourceT,
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
        self._subchannels: dict[str, Any] = {}
        self._callables: dict[tuple[str, str, str], Any] = {}
        self._closed = False
        self._has_answer = False  # a table or a definite error came from the source
        self._lock: AbstractContextManager[Any] = self._make_lock()
        self._start()

    # -- what a shell supplies -----------------------------------------------------------

    def _multicallable_types(self) -> Mapping[str, Callable[..., Any]]:
        """Kind ("unary_unary"...) → the shell's multicallable class."""
        raise NotImplementedError

    def _make_lock(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _start(self) -> None:
        """Start following the table."""
        raise NotImplementedError

    def _notify(self) -> None:
        """Wake every waiter (called holding the lock)."""
        raise NotImplementedError

    def _close_channels(self, channels: list[Any], *, in_callback: bool = False) -> None:
        """Close sub-channels the state no longer holds (called without the lock)."""
        raise NotImplementedError

    # -- following the table ------------------------------------------------------

    def _apply(self, step: Callable[[Any], TableChange], arg: Any) -> None:
        with self._lock:
            if self._closed:
                return
            change = step(arg)
            for target in change.opened:
                self._subchannels[target] = open_channel(self._api, target, self._credentials, self._options)
            gone = [self._drop(t) for t in change.closed]
            self._has_answer = True
            self._notify()
        self._close_channels(gone)

    def _failed(self, why: str) -> None:
        with self._lock:
            if self._core.table is None and not self._core.missing:
                self._core.error = f"cannot follow it from the agent ({why})"
            self._notify()

    def _watch_failed(self, exc: Exception) -> None:
        """The table stream ended with `exc`."""
        if isinstance(exc, grpc.RpcError):
            code = code_of(exc)
            details = (exc.details() if hasattr(exc, "details") else str(exc)) or ""
            if code == grpc.StatusCode.NOT_FOUND:
                self._apply(self._core.lost, details or f'service "{self.service}" not found')
            else:
                self._failed(f"{code.name if code else 'error'}: {details}")
        elif isinstance(exc, NotFound):
            self._apply(self._core.lost, str(exc))
        elif isinstance(exc, ShoalError):
            self._failed(str(exc))
        else:  # a bad message must not end the following
            self._failed(repr(exc))

    def _drop(self, target: str) -> Any:
        """Forget a target's sub-channel (held lock); the caller closes it outside."""
        for k in [k for k in self._callables if k[0] == target]:
            del self._callables[k]
        return self._subchannels.pop(target)

    def _forget_all(self) -> list[Any]:
        """Closing (held lock): every sub-channel, for the caller to close outside."""
        self._core.close()
        channels = list(self._subchannels.values())
        self._subchannels.clear()
        self._callables.clear()
        return channels

    # -- picking ----------------------------------------------------------------------

    def _first_answer(self, wait_for_ready: bool) -> float | None:
        """Until when a call waits for the agent's first answer (not at all with wait_for_ready)."""
        return None if wait_for_ready else deadline_after(self._table_wait, self._clock)

    def _pick(self, tried: frozenset[str], key: bytes | None, kind: str, method: str,
              make: Callable[[Any], Any]) -> tuple[Endpoint, str, Any] | None:
        """(held lock) An endpoint for the next attempt, its target (counted in flight)
        and the sub-channel's multicallable; None when there is none to pick now."""
        if self._closed:
            raise self._closed_error("Cannot invoke RPC on closed channel!")
        ep = self._core.pick(self._clock(), tried, key)
        if ep is None:
            return None
        target = self._core.started(ep)
        mc = self._callables.get((target, kind, method))
        if mc is None:
            mc = self._callables[(target, kind, method)] = make(self._subchannels[target])
        return ep, target, mc

    def _wait_time(self, tried: frozenset[str], deadline: float | None, first_answer: float | None,
                   wait_for_ready: bool) -> float | None:
        """(held lock) Nothing to pick: how long to wait for a change (None: no limit).
        `Exhausted` when every endpoint was tried; BalancerRpcError when there is none
        to try and no reason to wait."""
        if tried:
            raise Exhausted()
        if self._has_answer and not wait_for_ready:
            raise self._no_endpoint()
        limits = [t for t in (deadline, None if self._has_answer else first_answer) if t is not None]
        until = min(limits) if limits else None
        left = remaining(until, self._clock)
        if left is not None and left <= 0:
            if until == deadline:
                raise BalancerRpcError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                       f"no endpoint of {self.service} to call before the deadline "
                                       f"({self._no_endpoint().details()})")
            raise self._no_endpoint()
        return left

    def _no_endpoint(self) -> BalancerRpcError:
        core = self._core
        if core.missing:
            return BalancerRpcError(grpc.StatusCode.NOT_FOUND, core.error or f'service "{self.service}" not found')
        if core.table is None:
            why = f": {core.error}" if core.error else " (the agent has not answered)"
            return BalancerRpcError(grpc.StatusCode.UNAVAILABLE, f"no table for service {self.service} yet{why}")
        return BalancerRpcError(grpc.StatusCode.UNAVAILABLE,
                                f"service {self.service} has no ready endpoint (table version {core.table.version})")

    def _request(self) -> None:
        with self._lock:
            self._core.request()

    def _release(self, ep: Endpoint, target: str, outcome: Outcome, *, in_callback: bool = False) -> None:
        with self._lock:
            gone = [self._drop(t) for t in self._core.finished(ep, target, outcome, self._clock())
                    if t in self._subchannels]
        self._close_channels(gone, in_callback=in_callback)

    def _may_retry(self, exc: grpc.RpcError, method: str) -> bool:
        code = code_of(exc)
        idem = self._idempotent is True or (not isinstance(self._idempotent, bool) and method in self._idempotent)
        details = (exc.details() if hasattr(exc, "details") else "") or ""
        if code is None or not retryable(code.name, details, idempotent=idem):
            return False
        with self._lock:
            return self._core.try_retry()

    @staticmethod
    def _outcome(code: grpc.StatusCode | None, seconds: float) -> Outcome:
        """An attempt that ended with `code` (None: cancelled before any status)."""
        if code == grpc.StatusCode.UNAVAILABLE:
            return Outcome(seconds=None, transport_failed=True)
        if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, None):
            return Outcome(seconds=None)
        return Outcome(seconds=seconds)  # an answer: OK, or an error status from the endpoint

    # -- inspection ------------------------------------------------------------------

    def endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints calls are balanced over now."""
        with self._lock:
            return self._core.endpoints

    def subchannels(self) -> tuple[str, ...]:
        """The targets with an open sub-channel (endpoints, and removed ones still finishing calls)."""
        with self._lock:
            return tuple(sorted(self._subchannels))

    def table_version(self) -> int | None:
        with self._lock:
            return self._core.table.version if self._core.table is not None else None


class Attempts:
    """One call's attempts, on one endpoint after another: the endpoints it tried, and
    the error to raise once none is left. `attempt()` brackets each attempt."""

    def __init__(self, channel: ChannelShell[Any], method: str, *, retry: bool = True) -> None:
        self._ch = channel
        self._method = method
        self.retry = retry
        """Whether a failed attempt may still be retried (a stream: until its first response)."""
        self.tried: set[str] = set()
        self._last: grpc.RpcError | None = None

    @property
    def exclude(self) -> frozenset[str]:
        return frozenset(self.tried)

    def exhausted(self) -> grpc.RpcError:
        """The error to raise when every endpoint was tried: the last attempt's."""
        assert self._last is not None
        return self._last

    def retrying(self, ep: Endpoint, exc: grpc.RpcError) -> bool:
        """Whether the call goes on elsewhere after `exc` on `ep` (spends the budget)."""
        if not self.retry or not self._ch._may_retry(exc, self._method):
            return False
        self.tried.add(ep.replica_id)
        self._last = exc
        return True

    @contextlib.contextmanager
    def attempt(self, ep: Endpoint, target: str) -> Iterator[None]:
        """Release the attempt as it ends, its outcome counted. An error the call may
        retry elsewhere is swallowed: the caller loops to the next attempt."""
        ch = self._ch
        started = ch._clock()
        try:
            yield
        except grpc.RpcError as exc:
            ch._release(ep, target, ch._outcome(code_of(exc), ch._clock() - started))
            if self.retrying(ep, exc):
                return
            raise
        except BaseException:
            ch._release(ep, target, Outcome(seconds=None))
            raise
        ch._release(ep, target, Outcome(seconds=ch._clock() - started))


class MultiCallableShell:
    """What a balanced channel's multicallables share: the method and how to build a
    sub-channel's multicallable for it."""

    kind = ""

    def __init__(self, channel: Any, method: str, ser: Any, deser: Any, registered: bool | None) -> None:
        self._ch = channel
        self._method = method
        self._ser = ser
        self._deser = deser
        self._registered = registered

    def _begin(self, timeout: float | None, metadata: Metadata | None, hash_key: bytes | str | None, *,
               retry: bool = True) -> tuple[float | None, bytes | None, Attempts]:
        """A call starts (the retry budget hears of it): its deadline, hash key and attempts."""
        ch = self._ch
        ch._request()
        return deadline_after(timeout, ch._clock), hash_key_of(hash_key, metadata), Attempts(ch, self._method,
                                                                                              retry=retry)

    def _make(self, sub: Any) -> Any:
        factory = getattr(sub, self.kind)
        return factory(self._method, request_serializer=self._ser, response_deserializer=self._deser,
                       _registered_method=self._registered)
