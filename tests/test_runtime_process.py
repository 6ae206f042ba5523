"""ProcessRuntime with real processes: build/bin/whoami and small shell scripts.

Every test has its own state directory and node name; a teardown kills every process
group a state file names, pass or fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psutil
import pytest
import pytest_asyncio

from helpers import eventually, free_port, wait_until
from runtime_contract import close_ends_changes_and_followers
from shoal.agent.runtime.base import Observed
from shoal.agent.runtime.process import ProcessRuntime, exit_code_from_returncode
from shoal.errors import NotFound, RuntimeDriverError
from shoal.model import Driver, RunSpec

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def whoami() -> str:
    """build/bin/whoami, built (binaries only, no Docker needed) if missing or stale."""
    build = subprocess.run(
        [str(ROOT / "scripts" / "build-images.sh"), "--binaries-only"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, f"build-images.sh failed:\n{build.stdout}\n{build.stderr}"
    path = ROOT / "build" / "bin" / "whoami"
    assert os.access(path, os.X_OK)
    return str(path)


@pytest.fixture
def state_dir(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A state directory whose replicas are all killed afterwards."""
    directory = tmp_path / "state"
    yield directory
    for path in directory.glob("*.json"):
        with contextlib.suppress(Exception):
            state = json.loads(path.read_text())
            proc = psutil.Process(state["pid"])
            if abs(proc.create_time() - state["create_time"]) < 0.05:
                os.killpg(state["pid"], signal.SIGKILL)


@pytest_asyncio.fixture
async def runtime(state_dir: pathlib.Path) -> AsyncIterator[ProcessRuntime]:
    rt = ProcessRuntime(f"test-{uuid.uuid4().hex[:10]}", state_dir)
    yield rt
    await rt.close()


def spec(command: tuple[str, ...], replica_id: str | None = None, **overrides: Any) -> RunSpec:
    fields: dict[str, Any] = {
        "replica_id": replica_id or f"r-{uuid.uuid4().hex[:10]}",
        "deployment": "whoami",
        "generation": 2,
        "driver": Driver.PROCESS,
        "image": "ignored",
        "command": command,
        "host_port": free_port(),
    }
    fields.update(overrides)
    return RunSpec(**fields)


async def http_get(port: int | None, path: str = "/") -> str:
    assert port is not None

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return str(resp.read().decode())

    return await asyncio.to_thread(get)


async def serving(port: int | None, path: str = "/") -> str:
    return str(await eventually(lambda: http_get(port, path), timeout=15, what=f"an answer on port {port}"))


async def observed(rt: ProcessRuntime, replica_id: str) -> Observed | None:
    return next((o for o in await rt.list() if o.replica_id == replica_id), None)


async def dead(rt: ProcessRuntime, replica_id: str) -> Observed | None:
    o = await observed(rt, replica_id)
    return o if o is not None and not o.running else None


def pid_of(o: Observed) -> int:
    return int(o.handle.removeprefix("pid:"))


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_port_env_and_replica_id_reach_the_process(runtime: ProcessRuntime, whoami: str) -> None:
    s = spec((whoami,), env=(("GREETING", "hello"), ("PORT", "1")))
    started = await runtime.start(s)
    assert started.running and started.driver is Driver.PROCESS and started.handle.startswith("pid:")
    # PORT is the host port (shoal's value wins over the spec's), SHOAL_REPLICA the id.
    assert await serving(s.host_port) == f"{s.replica_id}\n"
    assert await http_get(s.host_port, "/env?key=GREETING") == "hello\n"

    (seen,) = await runtime.list()
    assert (seen.replica_id, seen.deployment, seen.generation, seen.host_port) == (
        s.replica_id,
        "whoami",
        2,
        s.host_port,
    )
    assert seen.running and seen.exit_code is None and seen.handle == started.handle
    assert seen.started_at is not None and abs(seen.started_at - time.time()) < 60


async def test_state_file_is_complete_and_written_whole(
    runtime: ProcessRuntime, state_dir: pathlib.Path, whoami: str
) -> None:
    s = spec((whoami,), args=("a",))
    started = await runtime.start(s)
    state = json.loads((state_dir / f"{s.replica_id}.json").read_text())
    pid = pid_of(started)
    assert state["replica"] == s.replica_id and state["deployment"] == "whoami"
    assert state["generation"] == 2 and state["node"] == runtime.node_name
    assert state["host_port"] == s.host_port and state["pid"] == pid
    assert state["create_time"] == pytest.approx(psutil.Process(pid).create_time(), abs=0.05)
    assert [p.name for p in state_dir.iterdir() if p.name.endswith(".tmp")] == []
    assert os.getpgid(pid) == pid and os.getsid(pid) == pid  # its own session and group


async def test_a_new_instance_adopts_the_same_process(
    runtime: ProcessRuntime, state_dir: pathlib.Path, whoami: str
) -> None:
    s = spec((whoami,))
    started = await runtime.start(s)
    await serving(s.host_port)
    again = ProcessRuntime(runtime.node_name, state_dir)
    other_node = ProcessRuntime("someone-else", state_dir)
    (adopted,) = await again.list()
    assert adopted.handle == started.handle and adopted.running
    assert await other_node.list() == []
    # The adopter can stop it, too.
    await again.stop(s.replica_id, timeout=5)
    assert not alive(pid_of(started))
    assert await runtime.list() == []


async def test_replicas_survive_the_agent_being_killed(state_dir: pathlib.Path, whoami: str) -> None:
    node = f"test-{uuid.uuid4().hex[:10]}"
    port = free_port()
    agent = textwrap.dedent(
        f"""
        import asyncio, pathlib, sys
        from shoal.agent.runtime.process import ProcessRuntime
        from shoal.model import Driver, RunSpec

        async def main():
            rt = ProcessRuntime({node!r}, pathlib.Path({str(state_dir)!r}))
            await rt.start(RunSpec(replica_id="survivor", deployment="d", generation=1,
                                   driver=Driver.PROCESS, image="-", command=({whoami!r},),
                                   host_port={port}))
            print("started", flush=True)
            await asyncio.Event().wait()

        asyncio.run(main())
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", agent], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        # structlog's default logger prints to stdout as well.
        lines = iter(proc.stdout.readline, "")
        assert any(line.strip() == "started" for line in lines), "the agent never started its replica"
        before = json.loads((state_dir / "survivor.json").read_text())["pid"]
        proc.kill()  # SIGKILL: the agent gets no chance to clean up
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert await serving(port) == "survivor\n"
    rt = ProcessRuntime(node, state_dir)
    try:
        (adopted,) = await rt.list()
        assert adopted.running and pid_of(adopted) == before
    finally:
        await rt.stop("survivor", timeout=5)
        await rt.close()
    assert not alive(before)


async def test_a_crash_is_reported_with_its_exit_code(runtime: ProcessRuntime, whoami: str) -> None:
    s = spec((whoami,))
    await runtime.start(s)
    await serving(s.host_port)
    seen: list[str] = []

    async def watch() -> None:
        async for replica_id in runtime.changes():
            seen.append(replica_id)

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0)  # one loop turn: the watcher is inside changes() now
    try:
        await http_get(s.host_port, "/exit")
        await eventually(lambda: s.replica_id in seen, what="a change for the crashed replica")
        gone = await eventually(lambda: dead(runtime, s.replica_id), what="list() to show it exited")
        assert gone.exit_code == 1 and "1" in gone.error
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def test_an_adopted_process_that_dies_shows_unknown_exit_code(
    runtime: ProcessRuntime, state_dir: pathlib.Path, whoami: str
) -> None:
    s = spec((whoami,))
    started = await runtime.start(s)
    adopter = ProcessRuntime(runtime.node_name, state_dir)
    os.kill(pid_of(started), signal.SIGKILL)
    gone = await eventually(lambda: dead(adopter, s.replica_id), what="the adopter to see it dead")
    assert gone.exit_code is None
    # The instance that started it reaps it and knows; it records that for everyone.
    mine = await eventually(lambda: dead(runtime, s.replica_id), what="the starter to see it dead")
    assert mine.exit_code == 137
    again = await observed(adopter, s.replica_id)
    assert again is not None and again.exit_code == 137


async def test_stop_terminates_the_whole_group(runtime: ProcessRuntime, state_dir: pathlib.Path) -> None:
    s = spec(("/bin/sh", "-c", 'sleep 300 & echo "child $!"; wait'))
    started = await runtime.start(s)
    log = state_dir / f"{s.replica_id}.log"
    line = wait_until(lambda: log.read_text().strip(), what="the child's pid in the log")
    child = int(line.split()[1])
    assert alive(child) and os.getpgid(child) == pid_of(started)
    await runtime.stop(s.replica_id, timeout=5)
    assert not alive(pid_of(started)) and not alive(child)
    assert not (state_dir / f"{s.replica_id}.json").exists()
    assert log.exists()  # the log stays until the replica is started again
    assert await runtime.list() == []
    await runtime.stop(s.replica_id)  # idempotent
    await runtime.stop("never-existed")


async def test_stop_kills_a_group_that_ignores_sigterm(runtime: ProcessRuntime, state_dir: pathlib.Path) -> None:
    s = spec(("/bin/sh", "-c", "trap '' TERM; sleep 300 & echo ready; wait"))
    started = await runtime.start(s)
    log = state_dir / f"{s.replica_id}.log"
    wait_until(lambda: "ready" in log.read_text(), what="the script to be ready")
    begun = time.monotonic()
    await runtime.stop(s.replica_id, timeout=0.5)
    elapsed = time.monotonic() - begun
    assert 0.5 <= elapsed < 5
    assert not alive(pid_of(started))


async def test_pid_reuse_is_not_mistaken_for_the_replica(
    runtime: ProcessRuntime, state_dir: pathlib.Path
) -> None:
    # A state file naming a live process that is not the one it recorded (same pid,
    # different create time): the replica must read as dead and stop() must not kill it.
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / "ghost.json").write_text(
            json.dumps(
                {
                    "replica": "ghost",
                    "deployment": "d",
                    "generation": 1,
                    "node": runtime.node_name,
                    "host_port": None,
                    "pid": bystander.pid,
                    "create_time": psutil.Process(bystander.pid).create_time() - 100,
                }
            )
        )
        (ghost,) = await runtime.list()
        assert not ghost.running and ghost.exit_code is None
        await runtime.stop("ghost", timeout=0.5)
        assert bystander.poll() is None
        assert await runtime.list() == []
    finally:
        bystander.kill()
        bystander.wait()


async def test_start_replaces_the_previous_process(runtime: ProcessRuntime, whoami: str) -> None:
    s = spec((whoami,))
    first = await runtime.start(s)
    second = await runtime.start(spec((whoami,), s.replica_id, generation=3, host_port=s.host_port))
    assert pid_of(first) != pid_of(second) and not alive(pid_of(first))
    (only,) = await runtime.list()
    assert only.handle == second.handle and only.generation == 3
    assert await serving(s.host_port) == f"{s.replica_id}\n"


async def test_missing_or_unrunnable_commands_are_driver_errors(
    runtime: ProcessRuntime, tmp_path: pathlib.Path
) -> None:
    with pytest.raises(RuntimeDriverError, match="not found or not executable"):
        await runtime.start(spec(("/no/such/binary",)))
    with pytest.raises(RuntimeDriverError, match="not found or not executable"):
        await runtime.start(spec(("no-such-command-on-path",)))
    plain = tmp_path / "not-executable"
    plain.write_text("#!/bin/sh\n")
    with pytest.raises(RuntimeDriverError, match="not found or not executable"):
        await runtime.start(spec((str(plain),)))
    with pytest.raises(RuntimeDriverError, match="needs a command"):
        await runtime.start(spec(()))
    assert await runtime.list() == []


async def test_logs_tail_and_follow(runtime: ProcessRuntime, whoami: str) -> None:
    s = spec((whoami,), args=("x",))
    await runtime.start(s)
    await serving(s.host_port)

    async def text(**kwargs: Any) -> str:
        return b"".join([c async for c in runtime.logs(s.replica_id, **kwargs)]).decode()

    everything = await text()
    assert everything.startswith(f"whoami: {s.replica_id} listening on :{s.host_port}")
    assert await text(tail=1) == everything.splitlines(keepends=True)[-1]
    assert await text(tail=0) == ""

    received = bytearray()

    async def follow() -> None:
        async for chunk in runtime.logs(s.replica_id, follow=True, tail=0):
            received.extend(chunk)

    follower = asyncio.create_task(follow())
    try:
        # Asked again each round: the follower starts at the end of the file whenever
        # it gets round to opening it, so a line logged before that is not followed.
        async def hit_and_seen() -> bool:
            await http_get(s.host_port, "/healthz?from=follow")
            return b"GET /healthz?from=follow" in received

        await eventually(hit_and_seen, what="the followed line")
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
    with pytest.raises(NotFound):
        async for _ in runtime.logs("never-existed"):
            pass


async def test_a_follower_carries_on_across_a_restart(runtime: ProcessRuntime) -> None:
    s = spec(("/bin/sh", "-c", 'echo "gen $GEN"; exec sleep 300'), env=(("GEN", "1"),))
    await runtime.start(s)
    received = bytearray()

    async def follow() -> None:
        async for chunk in runtime.logs(s.replica_id, follow=True):
            received.extend(chunk)

    follower = asyncio.create_task(follow())
    try:
        await eventually(lambda: b"gen 1" in received, what="the first incarnation's line")
        await runtime.start(spec(s.command, s.replica_id, env=(("GEN", "2"),)))
        await eventually(lambda: b"gen 2" in received, what="the second incarnation's line")
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower


async def test_close_ends_changes_and_followers(state_dir: pathlib.Path, whoami: str) -> None:
    rt = ProcessRuntime("closer", state_dir)
    s = spec((whoami,))
    await close_ends_changes_and_followers(rt, s)
    await rt.stop(s.replica_id, timeout=5)


@pytest.mark.parametrize(("returncode", "expected"), [(0, 0), (1, 1), (-9, 137), (-15, 143), (2, 2)])
async def test_exit_code_from_returncode(returncode: int, expected: int) -> None:
    assert exit_code_from_returncode(returncode) == expected
