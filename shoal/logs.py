"""Logging set-up: structlog events, key=value on a console, JSON with `--log-json`.

Log lines are events named `component.event` with key=value context
(`raft.became_leader term=3`). Nothing secret is ever a value in a log line.

The level lives in one `LogLevelGate`, a processor at the head of every logger's chain:
loggers are bound and cached at start-up, so a new level cannot be configured into them,
but moving the gate (SIGHUP, `shoal.agent.main.run`) reaches them all.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any

import structlog

from shoal.errors import ConfigError

__all__ = ["LOG_LEVELS", "LogLevelGate", "configure"]

LOG_LEVELS = ("debug", "info", "warning", "error")

_METHOD_LEVELS = {
    "debug": logging.DEBUG, "info": logging.INFO, "msg": logging.INFO, "warning": logging.WARNING,
    "warn": logging.WARNING, "error": logging.ERROR, "exception": logging.ERROR, "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}


@dataclass(slots=True)
class LogLevelGate:
    """A structlog processor that drops events below `level`; the one place the log level
    lives once logging is set up, so a reload can move it."""

    level: str = "info"
    _threshold: int = field(default=logging.INFO, init=False, repr=False)

    def __post_init__(self) -> None:
        self.set(self.level)

    def set(self, level: str) -> None:
        if level not in LOG_LEVELS:
            raise ConfigError(f'unknown log level "{level}"; use {", ".join(LOG_LEVELS[:-1])} or {LOG_LEVELS[-1]}')
        self.level = level
        self._threshold = _METHOD_LEVELS[level]

    def __call__(self, logger: Any, method: str, event: Any) -> Any:
        if _METHOD_LEVELS.get(method, logging.INFO) < self._threshold:
            raise structlog.DropEvent
        return event

    def install(self) -> None:
        """Put the gate at the head of structlog's processors and let every level reach
        it (call before any logger is used)."""
        cfg = structlog.get_config()
        structlog.configure(
            processors=[self, *(p for p in cfg["processors"] if not isinstance(p, LogLevelGate))],
            wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        )


def configure(*, json: bool = False, level: str = "info") -> LogLevelGate:
    """Configure structlog once for the process; logs go to stderr. Returns the gate
    that holds the level, for a reload to move."""
    gate = LogLevelGate(level)
    processors: list[structlog.typing.Processor] = [
        gate,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json:
        processors.append(structlog.processors.JSONRenderer())
    else:
        processors.append(structlog.processors.LogfmtRenderer(key_order=["timestamp", "level", "event"], bool_as_flag=False))
    structlog.configure(
        processors=processors,
        # Every level reaches the gate, which decides.
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    return gate
