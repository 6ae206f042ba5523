"""An in-memory twin of the runtime drivers, for unit tests of the reconciler.

Rules:
- It keeps the `Runtime` contract exactly: `start()` replaces a replica of the same id,
  `stop()` is idempotent, `list()` returns every replica running or not, `changes()`
  yields ids until `close()`.
- Nothing runs and nothing waits: every method completes at once, so tests are
  deterministic. Time comes from the injected `clock` (default: a counter starting at
  1000.0 that advances by one per start), never from the wall clock.
- Tests drive the world through helpers: `crash()` a replica, `adopt()` one that "was
  already running" before the agent started, `fail_next_start()` to make a start fail,
  `write_log()` to give a replica output, `set_exec()` to decide what an exec probe's
  command returns (exit status 0 unless told), `set_usage()` to give a replica CPU and
  memory figures for `usages()` (which is not recorded in `calls`: scrapes are not
  decisions).
- Every protocol call is appended to `calls` as `(method, argument)`, so a test can
  assert what the reconciler did and in which order.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from shoal.agent.runtime.base import Observed, Usage
from shoal.errors import NotFound, ShoalError
from shoal.model import Driver, RunSpec

__all__ = ["FakeRuntime", "FakeReplica"]


@dataclass(slots=True)
class FakeReplica:
    """One replica as the fake runtime holds it."""

    spec: RunSpec
    observed: Observed
    log: bytearray = field(default_factory=bytearray)


class FakeRuntime:
    """The `Runtime` protocol in memory; see the module docstring."""

    driver: Driver

    def __init__(
        self,
        node_name: str = "fake",
        *,
        driver: Driver = Driver.DOCKER,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.driver = driver
        self.node_name = node_name
        self.replicas: dict[str, FakeReplica] = {}
        self.calls: list[tuple[str, Any]] = []
        self.closed = False
        self._ticks = 1000.0
        self._clock = clock if clock is not None else self._tick
        self._serial = 0
        self._usage: dict[str, Usage] = {}
        self._start_failures: list[tuple[str | None, ShoalError]] = []
        self._subscribers: set[asyncio.Queue[str | None]] = set()
        self._log_waiters: set[asyncio.Event] = set()
        # replica id (None: any) → exit status, or the error `exec()` raises
        self._exec_results: dict[str | None, int | ShoalError] = {}

    # -- test helpers

    def crash(self, replica_id: str, exit_code: int = 1, *, error: str = "") -> None:
        """The replica's process dies with `exit_code`."""
        replica = self.replicas[replica_id]
        replica.observed = replace(
            replica.observed,
            running=False,
            exit_code=exit_code,
            error=error or f"exited with code {exit_code}",
        )
        self._announce(replica_id)

    def adopt(self, spec: RunSpec, *, running: bool = True, exit_code: int | None = None) -> Observed:
        """Put a replica in place as if an earlier agent had started it (no call recorded)."""
        observed = self._observe(spec, running=running, exit_code=exit_code)
        self.replicas[spec.replica_id] = FakeReplica(spec=spec, observed=observed)
        return observed

    def fail_next_start(self, error: ShoalError, replica_id: str | None = None) -> None:
        """Make the next `start()` (of `replica_id`, or of any replica) raise `error`."""
        self._start_failures.append((replica_id, error))

    def write_log(self, replica_id: str, data: bytes) -> None:
        """Append output to a replica's log; wakes followers."""
        self.replicas[replica_id].log.extend(data)
        for event in self._log_waiters:
            event.set()

    def set_exec(self, result: int | ShoalError, replica_id: str | None = None) -> None:
        """What `exec()` in `replica_id` (or in any replica) returns from now on: an exit
        status, or an error to raise (a `RuntimeDriverError` stands for a timeout too)."""
        self._exec_results[replica_id] = result

    def set_usage(self, replica_id: str, usage: Usage) -> None:
        self._usage[replica_id] = usage

    def running_ids(self) -> set[str]:
        """Ids of the replicas running now."""
        return {rid for rid, r in self.replicas.items() if r.observed.running}

    def calls_to(self, method: str) -> list[Any]:
        """The arguments of every recorded call to `method`, in order."""
        return [arg for name, arg in self.calls if name == method]

    # -- Runtime protocol

    async def list(self) -> list[Observed]:
        self.calls.append(("list", None))
        return [r.observed for r in self.replicas.values()]

    async def start(self, spec: RunSpec) -> Observed:
        self.calls.append(("start", spec))
        for i, (target, error) in enumerate(self._start_failures):
            if target is None or target == spec.replica_id:
                del self._start_failures[i]
                raise error
        observed = self._observe(spec, running=True, exit_code=None)
        self.replicas[spec.replica_id] = FakeReplica(spec=spec, observed=observed)
        self._announce(spec.replica_id)
        return observed

    async def stop(self, replica_id: str, *, timeout: float = 10.0) -> None:
        self.calls.append(("stop", replica_id))
        if self.replicas.pop(replica_id, None) is not None:
            self._announce(replica_id)

    def usages(self, replicas: Sequence[Observed]) -> dict[str, Usage]:
        out: dict[str, Usage] = {}
        for o in replicas:
            replica = self.replicas.get(o.replica_id)
            if replica is not None and replica.observed.running and o.replica_id in self._usage:
                out[o.replica_id] = self._usage[o.replica_id]
        return out

    async def exec(self, replica_id: str, command: Sequence[str], timeout: float) -> int:
        self.calls.append(("exec", (replica_id, tuple(command))))
        replica = self.replicas.get(replica_id)
        if replica is None or not replica.observed.running:
            raise NotFound("replica", replica_id)
        result = self._exec_results.get(replica_id, self._exec_results.get(None, 0))
        if isinstance(result, ShoalError):
            raise result
        return result

    async def address(self, replica_id: str, container_port: int) -> tuple[str, int]:
        self.calls.append(("address", (replica_id, container_port)))
        if replica_id not in self.replicas:
            raise NotFound("replica", replica_id)
        return ("127.0.0.1", container_port)

    async def logs(
        self, replica_id: str, *, follow: bool = False, tail: int | None = None
    ) -> AsyncIterator[bytes]:
        self.calls.append(("logs", replica_id))
        replica = self.replicas.get(replica_id)
        if replica is None:
            raise NotFound("replica", replica_id)
        data = bytes(replica.log)
        if tail is not None:
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-tail:]) if tail > 0 else b""
        sent = len(replica.log)
        if data:
            yield data
        if not follow:
            return
        wake = asyncio.Event()
        self._log_waiters.add(wake)
        try:
            while not self.closed:
                await wake.wait()
                wake.clear()
                current = self.replicas.get(replica_id)
                if current is not None and len(current.log) > sent:
                    chunk = bytes(current.log[sent:])
                    sent = len(current.log)
                    yield chunk
        finally:
            self._log_waiters.discard(wake)

    async def changes(self) -> AsyncIterator[str]:
        if self.closed:
            return
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            while True:
                replica_id = await queue.get()
                if replica_id is None:
                    return
                yield replica_id
        finally:
            self._subscribers.discard(queue)

    async def close(self) -> None:
        self.calls.append(("close", None))
        self.closed = True
        for queue in self._subscribers:
            queue.put_nowait(None)
        for event in self._log_waiters:
            event.set()

    # -- internals

    def _tick(self) -> float:
        self._ticks += 1.0
        return self._ticks

    def _observe(self, spec: RunSpec, *, running: bool, exit_code: int | None) -> Observed:
        self._serial += 1
        return Observed(
            replica_id=spec.replica_id,
            deployment=spec.deployment,
            generation=spec.generation,
            driver=self.driver,
            handle=f"fake-{self._serial}",
            running=running,
            exit_code=None if running else exit_code,
            started_at=self._clock(),
            host_port=spec.host_port,
            error="" if running else f"exited with code {exit_code}",
        )

    def _announce(self, replica_id: str) -> None:
        for queue in self._subscribers:
            queue.put_nowait(replica_id)
