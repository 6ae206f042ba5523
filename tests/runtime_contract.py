"""Behaviour every runtime driver (`shoal.agent.runtime.base.Runtime`) must share, as
scenarios the Docker and process driver tests both run."""

from __future__ import annotations

import asyncio

from helpers import eventually
from shoal.agent.runtime.base import Runtime

from shoal.model import RunSpec


async def close_ends_changes_and_followers(rt: Runtime, s: RunSpec) -> None:
    """Start `s` (its output must say "listening") with a `changes()` watcher and a log
    follower running; `close()` ends both, without an error."""
    seen: list[str] = []

    async def watch() -> None:
        async for replica_id in rt.changes():
            seen.append(replica_id)

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0)  # one loop turn: the watcher is inside changes() now
    await rt.start(s)
    await eventually(lambda: s.replica_id in seen, what="the start to be announced")
    followed = bytearray()

    async def follow() -> None:
        async for chunk in rt.logs(s.replica_id, follow=True):
            followed.extend(chunk)

    follower = asyncio.create_task(follow())
    await eventually(lambda: b"listening" in followed, what="the follower to read the log")
    await rt.close()
    await asyncio.wait_for(watcher, timeout=5)
    await asyncio.wait_for(follower, timeout=5)
    assert follower.exception() is None
    assert watcher.done() and watcher.exception() is None
