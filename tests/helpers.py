"""Waiting on conditions with deadlines, for integration tests.

Rules: a test never sleeps to let something happen; it states the condition it needs
and a deadline. `eventually` (async) and `wait_until` (sync) call `fn` until it returns
something truthy and return that value. An exception from `fn` counts as "not yet" (the
server may not listen yet); at the deadline they fail with AssertionError naming what
was awaited and the last value or error seen.

`docker_with_image` is the gate of the tests that need the Docker Engine: a client, or
the test skipped with the reason.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

__all__ = ["docker_with_image", "eventually", "free_port", "wait_until"]


def _timed_out(what: str, timeout: float, last_value: Any, last_exc: BaseException | None) -> AssertionError:
    detail = f"last error: {last_exc!r}" if last_exc is not None else f"last value: {last_value!r}"
    return AssertionError(f"timed out after {timeout:g} s waiting for {what} ({detail})")


async def eventually(
    fn: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.05,
    *,
    what: str = "condition",
) -> Any:
    """Call (and await, if it returns an awaitable) `fn` until it is truthy; return it."""
    deadline = time.monotonic() + timeout
    last_value: Any = None
    last_exc: BaseException | None = None
    while True:
        try:
            value = fn()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            last_value, last_exc = value, None
        except Exception as exc:  # noqa: BLE001 - "not yet", reported at the deadline
            last_exc = exc
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, last_value, last_exc) from last_exc
        await asyncio.sleep(interval)


def wait_until(
    fn: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.05,
    *,
    what: str = "condition",
) -> Any:
    """Call `fn` until it is truthy; return it. The synchronous twin of `eventually`."""
    deadline = time.monotonic() + timeout
    last_value: Any = None
    last_exc: BaseException | None = None
    while True:
        try:
            value = fn()
            if value:
                return value
            last_value, last_exc = value, None
        except Exception as exc:  # noqa: BLE001 - "not yet", reported at the deadline
            last_exc = exc
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, last_value, last_exc) from last_exc
        time.sleep(interval)


def free_port() -> int:
    """A TCP port free on all interfaces right now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def docker_with_image(image: str = "shoal-test/whoami:latest") -> Any:
    """A Docker SDK client whose engine answers and holds `image`; skips the test otherwise."""
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env()
        client.ping()
        client.images.get(image)
    except Exception as exc:  # noqa: BLE001 - any failure means no usable engine here
        pytest.skip(f"Docker Engine or the {image} image not available: {exc}")
    return client
