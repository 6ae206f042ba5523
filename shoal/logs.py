"""Logging set-up: structlog events, key=value on a console, JSON with `--log-json`.

Log lines are events named `component.event` with key=value context
(`raft.became_leader term=3`). Nothing secret is ever a value in a log line.
"""

from __future__ import annotations

import logging
import sys

import structlog

__all__ = ["configure"]


def configure(*, json: bool = False, level: str = "info") -> None:
    """Configure structlog once for the process; logs go to stderr."""
    processors: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json:
        processors.append(structlog.processors.JSONRenderer())
    else:
        processors.append(structlog.processors.LogfmtRenderer(key_order=["timestamp", "level", "event"], bool_as_flag=False))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
