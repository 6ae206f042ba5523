"""The runtime protocol every driver (docker, process, the fake twin) implements.

Rules:
- A driver owns only what it labelled itself: every container or process it starts is
  tagged with the replica id, deployment, generation and the owning agent's name, and
  `list()` returns exactly those. That is what lets a restarted agent *adopt* running
  replicas instead of restarting them.
- `start()` creates and starts a replica that does not exist; starting a replica id that
  already exists (running or exited) replaces the old one.
- `stop()` is idempotent: stopping what is already gone is not an error.
- Methods are coroutines; blocking SDK calls run in a worker thread inside the driver.
- `exec()` and `address()` serve the agent's probes; they never change what runs.
- `usages()` serves `/metrics` at scrape time: synchronous and cheap (kernel counters,
  not an engine round trip), and only for the running replicas it is given.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from shoal.model import Driver, RunSpec

__all__ = ["LABEL_PREFIX", "Observed", "Runtime", "Usage"]

# Docker labels (and the process driver's state files) use these keys, suffixed with
# replica, deployment, generation, node, host-port.
LABEL_PREFIX = "io.shoal."


@dataclass(frozen=True, slots=True, kw_only=True)
class Observed:
    """What a driver sees of one replica right now."""

    replica_id: str
    deployment: str
    generation: int
    driver: Driver
    handle: str  # container id, or "pid:<pid>" for the process driver
    running: bool
    exit_code: int | None = None
    started_at: float | None = None  # unix seconds
    host_port: int | None = None
    error: str = ""  # why it is not running, when the runtime says


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    """What one running replica uses, as the kernel counts it."""

    cpu_seconds: float  # CPU time (user + system) of everything in it since it started
    memory_bytes: int  # resident working set now (page cache the kernel can drop excluded)


class Runtime(Protocol):
    """A driver that runs replicas on this host."""

    driver: Driver

    async def list(self) -> list[Observed]:
        """Every replica this agent owns on this runtime, running or not."""
        ...

    async def start(self, spec: RunSpec) -> Observed:
        """Create and start a replica; replaces an existing one with the same id."""
        ...

    async def stop(self, replica_id: str, *, timeout: float = 10.0) -> None:
        """Stop (SIGTERM, then SIGKILL after `timeout`) and remove a replica."""
        ...

    async def exec(self, replica_id: str, command: Sequence[str], timeout: float) -> int:
        """Run `command` as the replica would (its container; for a process, its
        environment and working directory) and return its exit status.

        For exec probes. Raises `NotFound` when the replica is not running and
        `RuntimeDriverError` when the command cannot be run or does not finish within
        `timeout` seconds.
        """
        ...

    async def address(self, replica_id: str, container_port: int) -> tuple[str, int]:
        """Where this host reaches `container_port` of the replica directly, not through
        its published host port (for probes of a port that is not published)."""
        ...

    def logs(self, replica_id: str, *, follow: bool = False, tail: int | None = None) -> AsyncIterator[bytes]:
        """The replica's output, stdout and stderr interleaved; follows until cancelled."""
        ...

    def usages(self, replicas: Sequence[Observed]) -> dict[str, Usage]:
        """CPU time and memory of the given running replicas, by replica id; a replica
        whose figures cannot be read right now is left out. Called on the event loop at
        scrape time, so it must not block on anything slower than /proc and /sys."""
        ...

    def changes(self) -> AsyncIterator[str]:
        """Replica ids whose state may have changed (a container died, a process exited).

        A hint for a prompt reconcile; the reconciler also polls `list()`.
        """
        ...

    async def close(self) -> None:
        """Release connections and background threads; replicas keep running."""
        ...
