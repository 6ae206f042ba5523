"""The leader's control loop: run the controller whenever the state changes.

The controller is pure; this shell only commits what it returns and waits for the next
change (or a periodic tick, so time-based work such as back-off still happens in a quiet
cluster).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import structlog

from shoal.errors import Conflict, StoreError, Unavailable
from shoal.leader.controller import Controller
from shoal.leader.store import Store

__all__ = ["ControlLoop"]

# A reconcile pass that keeps producing changes without settling is a bug; after this many
# back-to-back passes the loop slows to one per tick and says so, instead of spinning.
_MAX_BUSY_PASSES = 50


class ControlLoop:
    def __init__(
        self,
        store: Store,
        controller: Controller,
        *,
        tick: float = 1.0,
        clock: Callable[[], float] = time.time,
        logger: Any = None,
    ) -> None:
        self._store = store
        self._controller = controller
        self._tick = tick
        self._clock = clock
        self._log = logger or structlog.get_logger("shoal.leader")

    async def run(self) -> None:
        busy = 0
        while True:
            revision = self._store.state.revision
            try:
                # Guarded: if an API write or an agent report changed an object this pass
                # writes, the pass runs again on the new state instead of overwriting it.
                committed = await self._store.update(lambda st: self._controller.reconcile(st, self._clock()))
                if committed is not None:
                    revision = committed
            except (StoreError, Unavailable, Conflict) as exc:
                self._log.error("leader.commit_failed", error=str(exc))
                await asyncio.sleep(self._tick)
                continue
            except Exception:
                # A bug in one pass must not take the control plane down with it: say so
                # loudly and try again on the next tick, from whatever state is current.
                self._log.exception("leader.reconcile_failed")
                await asyncio.sleep(self._tick)
                continue
            if committed is None:
                busy = 0
                await self._store.wait(revision, timeout=self._tick)
                continue
            busy += 1
            if busy >= _MAX_BUSY_PASSES:
                if busy == _MAX_BUSY_PASSES:
                    self._log.error("leader.not_settling", passes=busy)
                await asyncio.sleep(self._tick)
