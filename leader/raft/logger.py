"""The logger seam of the Raft core: structlog-style events, a no-op by default.

Events are named `raft.<what>` with key=value context (`raft.became_leader term=3`).
The shell injects a structlog `BoundLogger` (which satisfies `Logger`); tests and the
simulator use `NullLogger`, which costs one method call per event.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Logger", "NullLogger"]


class Logger(Protocol):
    """The subset of structlog's bound logger the core uses."""

    def debug(self, event: str, **kw: object) -> object: ...

    def info(self, event: str, **kw: object) -> object: ...

    def warning(self, event: str, **kw: object) -> object: ...


class NullLogger:
    """A logger that drops every event."""

    __slots__ = ()

    def debug(self, event: str, **kw: object) -> None:
        return None

    def info(self, event: str, **kw: object) -> None:
        return None

    def warning(self, event: str, **kw: object) -> None:
        return None
