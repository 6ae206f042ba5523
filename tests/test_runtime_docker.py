"""DockerRuntime against the real Docker Engine, with the locally built test images.

Each test gets its own node name, so it sees only its own containers, and a teardown
that force-removes every container labelled with that node, pass or fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio

from helpers import eventually, free_port
from runtime_contract import close_ends_changes_and_followers
from shoal.agent.runtime.base import Observed
from shoal.errors import ImageNotFound, NotFound, RuntimeDriverError
from shoal.model import Driver, Resources, RunSpec

docker = pytest.importorskip("docker")

from shoal.agent.runtime.docker import (  # noqa: E402 - after the importorskip
    LABEL_DEPLOYMENT,
    LABEL_GENERATION,
    LABEL_HOST_PORT,
    LABEL_NODE,
    LABEL_REPLICA,
    DockerRuntime,
    container_name,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.docker, pytest.mark.timeout(120)]

ROOT = pathlib.Path(__file__).resolve().parent.parent
WHOAMI = "shoal-test/whoami:latest"
HELLO = "shoal-example/hello-world:latest"


@pytest.fixture(scope="module")
def docker_client() -> Iterator[Any]:
    """A plain SDK client, once the engine answers and the test images are built."""
    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"Docker Engine not reachable (scripts/ensure-docker.sh starts one): {exc}")
    build = subprocess.run(
        [str(ROOT / "scripts" / "build-images.sh")], capture_output=True, text=True, timeout=600
    )
    assert build.returncode == 0, f"build-images.sh failed:\n{build.stdout}\n{build.stderr}"
    yield client
    client.close()


@pytest.fixture
def node(docker_client: Any) -> Iterator[str]:
    """A node name of this test's own; its containers are removed afterwards."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    for container in docker_client.containers.list(all=True, filters={"label": f"{LABEL_NODE}={name}"}):
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            container.remove(force=True)


@pytest_asyncio.fixture
async def runtime(node: str) -> AsyncIterator[DockerRuntime]:
    rt = DockerRuntime(node)
    yield rt
    await rt.close()


def spec(replica_id: str | None = None, **overrides: Any) -> RunSpec:
    replica_id = replica_id or f"r-{uuid.uuid4().hex[:10]}"
    fields: dict[str, Any] = {
        "replica_id": replica_id,
        "deployment": "whoami",
        "generation": 3,
        "driver": Driver.DOCKER,
        "image": WHOAMI,
        "env": (("SHOAL_REPLICA", replica_id),),
        "container_port": 8080,
        "host_port": free_port(),
    }
    fields.update(overrides)
    return RunSpec(**fields)


def http_get_sync(port: int | None, path: str = "/") -> str:
    assert port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
        return str(resp.read().decode())


async def http_get(port: int | None, path: str = "/") -> str:
    return await asyncio.to_thread(http_get_sync, port, path)


async def serving(port: int | None, path: str = "/") -> str:
    """The answer on `port` once the replica listens."""
    return str(await eventually(lambda: http_get(port, path), timeout=15, what=f"an answer on port {port}"))


async def observed(rt: DockerRuntime, replica_id: str) -> Observed | None:
    return next((o for o in await rt.list() if o.replica_id == replica_id), None)


async def test_start_serves_on_host_port_and_lists_with_labels(runtime: DockerRuntime, docker_client: Any) -> None:
    s = spec()
    started = await runtime.start(s)
    assert started.running and started.replica_id == s.replica_id
    assert started.host_port == s.host_port and started.generation == 3 and started.driver is Driver.DOCKER

    assert await serving(s.host_port) == f"{s.replica_id}\n"

    (seen,) = await runtime.list()
    assert seen.handle == started.handle
    assert seen.running and seen.exit_code is None and seen.error == ""
    assert seen.deployment == "whoami" and seen.generation == 3 and seen.host_port == s.host_port
    assert seen.started_at is not None and abs(seen.started_at - time.time()) < 60

    labels = docker_client.containers.get(container_name(s.replica_id)).labels
    assert labels[LABEL_REPLICA] == s.replica_id
    assert labels[LABEL_DEPLOYMENT] == "whoami"
    assert labels[LABEL_GENERATION] == "3"
    assert labels[LABEL_NODE] == runtime.node_name
    assert labels[LABEL_HOST_PORT] == str(s.host_port)
    attrs = docker_client.containers.get(container_name(s.replica_id)).attrs
    assert attrs["HostConfig"]["RestartPolicy"]["Name"] in ("", "no")


async def test_an_agent_with_the_same_node_name_adopts_and_another_does_not(runtime: DockerRuntime) -> None:
    s = spec()
    started = await runtime.start(s)
    same = DockerRuntime(runtime.node_name)
    other = DockerRuntime(f"{runtime.node_name}-other")
    try:
        (adopted,) = await same.list()
        assert adopted.handle == started.handle and adopted.running
        assert await other.list() == []
    finally:
        await same.close()
        await other.close()
    assert await serving(s.host_port) == f"{s.replica_id}\n"


async def test_docker_kill_is_reported_by_changes_and_list(runtime: DockerRuntime, docker_client: Any) -> None:
    s = spec()
    await runtime.start(s)
    await serving(s.host_port)
    seen: list[str] = []

    async def watch() -> None:
        async for replica_id in runtime.changes():
            seen.append(replica_id)

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0)  # one loop turn: the watcher is inside changes() now
    try:
        # changes() counts from the moment it was called, so the kill cannot be missed
        # even if the events stream connects after it.
        await asyncio.to_thread(docker_client.containers.get(container_name(s.replica_id)).kill)
        await eventually(lambda: s.replica_id in seen, timeout=10, what="a change for the killed replica")
        dead = await eventually(lambda: _dead(runtime, s.replica_id), what="list() to show it stopped")
        assert dead.exit_code == 137 and "137" in dead.error
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def _dead(rt: DockerRuntime, replica_id: str) -> Observed | None:
    o = await observed(rt, replica_id)
    return o if o is not None and not o.running else None


async def test_a_crash_keeps_its_exit_code(runtime: DockerRuntime) -> None:
    s = spec()
    await runtime.start(s)
    await serving(s.host_port)
    await http_get(s.host_port, "/exit")
    dead = await eventually(lambda: _dead(runtime, s.replica_id), what="the replica to exit")
    assert dead.exit_code == 1


async def test_stop_removes_and_is_idempotent(runtime: DockerRuntime, docker_client: Any) -> None:
    s = spec()
    await runtime.start(s)
    begun = time.monotonic()
    await runtime.stop(s.replica_id, timeout=10)
    # whoami exits on SIGTERM; a stop that waited for SIGKILL would take the full timeout.
    assert time.monotonic() - begun < 8
    assert await runtime.list() == []
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(container_name(s.replica_id))
    await runtime.stop(s.replica_id)
    await runtime.stop("never-existed")


async def test_start_replaces_a_container_of_the_same_id(runtime: DockerRuntime) -> None:
    s = spec()
    first = await runtime.start(s)
    second = await runtime.start(spec(s.replica_id, generation=4, host_port=s.host_port))
    assert second.handle != first.handle
    (only,) = await runtime.list()
    assert only.handle == second.handle and only.generation == 4
    assert await serving(s.host_port) == f"{s.replica_id}\n"


async def test_limits_are_applied(runtime: DockerRuntime, docker_client: Any) -> None:
    s = spec(limits=Resources(cpu_millis=250, memory_bytes=64 * 1024 * 1024))
    await runtime.start(s)
    host = docker_client.containers.get(container_name(s.replica_id)).attrs["HostConfig"]
    assert host["NanoCpus"] == 250_000_000
    assert host["Memory"] == 64 * 1024 * 1024


async def test_command_and_args_follow_kubernetes(runtime: DockerRuntime, docker_client: Any) -> None:
    only_args = spec(args=("one", "two"))
    both = spec(command=("/whoami",), args=("three",))
    await runtime.start(only_args)
    await runtime.start(both)
    assert await serving(only_args.host_port, "/args") == "one\ntwo\n"
    assert await serving(both.host_port, "/args") == "three\n"
    config = docker_client.containers.get(container_name(only_args.replica_id)).attrs["Config"]
    assert config["Entrypoint"] == ["/whoami"] and config["Cmd"] == ["one", "two"]


async def test_env_is_passed(runtime: DockerRuntime) -> None:
    s = spec(env=(("SHOAL_REPLICA", "x"), ("GREETING", "hi there")))
    await runtime.start(s)
    assert await serving(s.host_port, "/env?key=GREETING") == "hi there\n"


async def test_logs_and_follow(runtime: DockerRuntime) -> None:
    s = spec()
    await runtime.start(s)
    await serving(s.host_port)

    async def text(**kwargs: Any) -> str:
        return b"".join([c async for c in runtime.logs(s.replica_id, **kwargs)]).decode()

    assert f"whoami: {s.replica_id} listening" in await eventually(lambda: text())
    assert (await text(tail=1)).count("\n") == 1

    received = bytearray()

    async def follow() -> None:
        async for chunk in runtime.logs(s.replica_id, follow=True, tail=0):
            received.extend(chunk)

    follower = asyncio.create_task(follow())
    try:
        await eventually(lambda: _hit_and_seen(s.host_port, received), what="the followed log line")
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower

    with pytest.raises(NotFound):
        async for _ in runtime.logs("never-existed"):
            pass


async def _hit_and_seen(port: int | None, received: bytearray) -> bool:
    await http_get(port, "/healthz?from=follow")
    return b"GET /healthz?from=follow" in received


async def test_close_ends_changes_and_followers(node: str) -> None:
    rt = DockerRuntime(node)
    await close_ends_changes_and_followers(rt, spec())
    assert [r async for r in rt.changes()] == []


async def test_missing_image_is_image_not_found(runtime: DockerRuntime) -> None:
    with pytest.raises(ImageNotFound) as err:
        await runtime.start(spec(image="shoal-test/does-not-exist:latest"))
    assert err.value.image == "shoal-test/does-not-exist:latest"
    assert await runtime.list() == []


@pytest.mark.parametrize("holder", ["container", "socket"])
async def test_port_in_use_is_a_driver_error_naming_it(runtime: DockerRuntime, holder: str) -> None:
    port = free_port()
    with contextlib.ExitStack() as stack:
        if holder == "container":
            await runtime.start(spec(host_port=port))
        else:
            sock = stack.enter_context(socket.socket())
            sock.bind(("0.0.0.0", port))
            sock.listen()
        loser = spec(host_port=port)
        with pytest.raises(RuntimeDriverError) as err:
            await runtime.start(loser)
        assert f"host port {port} is already in use" in str(err.value)
        assert loser.replica_id not in {o.replica_id for o in await runtime.list()}


async def test_a_missing_command_is_a_driver_error(runtime: DockerRuntime) -> None:
    with pytest.raises(RuntimeDriverError, match="command cannot be run"):
        await runtime.start(spec(command=("/no/such/binary",)))
    assert await runtime.list() == []


async def test_hello_world_example_image_serves(runtime: DockerRuntime) -> None:
    s = spec(image=HELLO, deployment="hello-world", env=())
    await runtime.start(s)
    assert await serving(s.host_port) == "Hello World!"
    # hello.go installs no SIGTERM handler and runs as PID 1, which ignores SIGTERM:
    # only the SIGKILL after the timeout stops it.
    await runtime.stop(s.replica_id, timeout=1)
    assert await runtime.list() == []
