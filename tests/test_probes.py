"""Probe executors (agent/probes.py) against real local servers, and exec through the
process driver and the fake runtime. Every wait has a deadline; timeouts are short."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import pathlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from helpers import docker_with_image, eventually, free_port
from shoal.agent.probe_state import Change, ReadinessChanged, ReplicaProbes, Restart, Role
from shoal.agent.probes import (
    ProbeExecutor,
    ProbeResult,
    exec_command,
    grpc_health,
    http_get,
    run_probes,
    tcp_connect,
)
from shoal.agent.runtime.fake import FakeRuntime
from shoal.agent.runtime.process import ProcessRuntime
from shoal.errors import RuntimeDriverError
from shoal.model import Driver, Probe, ProbeKind, RunSpec

pytestmark = [pytest.mark.timeout(60)]  # asyncio_mode is auto


# ------------------------------------------------------------------------ HTTP


class HttpServer:
    """A tiny HTTP/1.1 server on loopback: answers every request with `status`, or
    nothing at all with `hang`, or `raw` bytes instead of a response."""

    def __init__(self) -> None:
        self.status = 200
        self.hang = False
        self.raw: bytes | None = None
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests.append(head)
            if self.hang:
                await reader.read()  # until the client gives up
                return
            if self.raw is not None:
                writer.write(self.raw)
            else:
                body = b"ok\n"
                writer.write(
                    f"HTTP/1.1 {self.status} X\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
                )
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> HttpServer:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


@pytest.mark.parametrize(("status", "ok"), [(200, True), (204, True), (301, True), (399, True), (404, False), (500, False)])
async def test_http_status_decides(status: int, ok: bool) -> None:
    async with HttpServer() as srv:
        srv.status = status
        result = await http_get("127.0.0.1", srv.port, "/healthz", 1.0)
    assert result.ok is ok
    assert f"status {status}" in result.message
    head = srv.requests[0].decode()
    assert head.startswith("GET /healthz HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{srv.port}\r\n" in head


async def test_http_path_is_sent_as_written_and_escaped_where_needed() -> None:
    async with HttpServer() as srv:
        assert (await http_get("127.0.0.1", srv.port, "/a b?x=1&y=%20", 1.0)).ok
    assert srv.requests[0].startswith(b"GET /a%20b?x=1&y=%20 HTTP/1.1\r\n")


async def test_http_no_answer_times_out() -> None:
    async with HttpServer() as srv:
        srv.hang = True
        t0 = time.monotonic()
        result = await http_get("127.0.0.1", srv.port, "/", 0.2)
        elapsed = time.monotonic() - t0
    assert not result.ok and "no answer within 0.2 s" in result.message
    assert elapsed < 2.0


async def test_http_refused_and_garbage_fail() -> None:
    refused = await http_get("127.0.0.1", free_port(), "/", 1.0)
    assert not refused.ok and "refused" in refused.message.lower()
    async with HttpServer() as srv:
        srv.raw = b"SSH-2.0-OpenSSH\r\n"
        garbage = await http_get("127.0.0.1", srv.port, "/", 1.0)
        srv.raw = b""
        closed = await http_get("127.0.0.1", srv.port, "/", 1.0)
    assert not garbage.ok and "not an HTTP response" in garbage.message
    assert not closed.ok and "closed" in closed.message


# ------------------------------------------------------------------------- TCP


async def test_tcp_accepted_and_refused() -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        assert (await tcp_connect("127.0.0.1", port, 1.0)).ok
    finally:
        server.close()
        await server.wait_closed()
    refused = await tcp_connect("127.0.0.1", port, 1.0)
    assert not refused.ok and f"127.0.0.1:{port}" in refused.message


# ------------------------------------------------------------------------ gRPC


class _HangingHealth(health_pb2_grpc.HealthServicer):
    async def Check(self, request: Any, context: Any) -> Any:
        await asyncio.Event().wait()


@pytest_asyncio.fixture
async def grpc_server() -> AsyncIterator[tuple[int, health.aio.HealthServicer]]:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port, servicer
    finally:
        await server.stop(None)


async def test_grpc_serving_passes_and_not_serving_fails(grpc_server: tuple[int, Any]) -> None:
    port, servicer = grpc_server
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await servicer.set("shop", health_pb2.HealthCheckResponse.NOT_SERVING)
    ok = await grpc_health("127.0.0.1", port, "", 1.0)
    assert ok.ok and "SERVING" in ok.message
    bad = await grpc_health("127.0.0.1", port, "shop", 1.0)
    assert not bad.ok and "NOT_SERVING" in bad.message
    unknown = await grpc_health("127.0.0.1", port, "nope", 1.0)
    assert not unknown.ok and 'does not know the service "nope"' in unknown.message


async def test_grpc_without_health_service_refused_and_hanging() -> None:
    plain = grpc.aio.server()
    plain_port = plain.add_insecure_port("127.0.0.1:0")
    hanging = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(_HangingHealth(), hanging)
    hanging_port = hanging.add_insecure_port("127.0.0.1:0")
    await plain.start()
    await hanging.start()
    try:
        unimpl = await grpc_health("127.0.0.1", plain_port, "", 1.0)
        assert not unimpl.ok and "does not implement grpc.health.v1" in unimpl.message
        t0 = time.monotonic()
        slow = await grpc_health("127.0.0.1", hanging_port, "", 0.3)
        assert not slow.ok and "no answer within 0.3 s" in slow.message
        assert time.monotonic() - t0 < 2.0
    finally:
        await plain.stop(None)
        await hanging.stop(None)
    refused = await grpc_health("127.0.0.1", free_port(), "", 1.0)
    assert not refused.ok and "UNAVAILABLE" in refused.message


# ------------------------------------------------------------------------ exec


def spec(**overrides: Any) -> RunSpec:
    fields: dict[str, Any] = {
        "replica_id": f"r-{uuid.uuid4().hex[:10]}",
        "deployment": "d",
        "generation": 1,
        "driver": Driver.PROCESS,
        "image": "ignored",
        "command": ("sleep", "60"),
    }
    fields.update(overrides)
    return RunSpec(**fields)


async def test_exec_through_the_fake_runtime() -> None:
    rt = FakeRuntime(driver=Driver.PROCESS)
    s = spec()
    await rt.start(s)
    assert (await exec_command(rt, s.replica_id, ("check",), 1.0)).ok
    rt.set_exec(3, s.replica_id)
    failed = await exec_command(rt, s.replica_id, ("check", "--deep"), 1.0)
    assert not failed.ok and failed.message == 'exec "check --deep": exit status 3'
    rt.set_exec(RuntimeDriverError("did not finish within 1 s"), s.replica_id)
    assert "did not finish" in (await exec_command(rt, s.replica_id, ("check",), 1.0)).message
    rt.crash(s.replica_id)
    gone = await exec_command(rt, s.replica_id, ("check",), 1.0)
    assert not gone.ok and "not found" in gone.message
    assert rt.calls_to("exec")[0] == (s.replica_id, ("check",))


@pytest_asyncio.fixture
async def process_runtime(tmp_path: pathlib.Path) -> AsyncIterator[ProcessRuntime]:
    rt = ProcessRuntime(f"test-{uuid.uuid4().hex[:10]}", tmp_path / "state")
    started: list[str] = []
    rt.started = started  # type: ignore[attr-defined]
    try:
        yield rt
    finally:
        for rid in started:
            with contextlib.suppress(Exception):
                await rt.stop(rid, timeout=0.0)
        await rt.close()


async def test_process_exec_has_the_replicas_env_and_cwd(process_runtime: ProcessRuntime, tmp_path: pathlib.Path) -> None:
    s = spec(env=(("FLAVOUR", "mint"),), host_port=4321)
    await process_runtime.start(s)
    process_runtime.started.append(s.replica_id)  # type: ignore[attr-defined]
    env_ok = ("sh", "-c", 'test "$FLAVOUR" = mint && test "$PORT" = 4321 && test "$SHOAL_REPLICA" = "$1"', "sh", s.replica_id)
    assert await process_runtime.exec(s.replica_id, env_ok, 5.0) == 0
    cwd_ok = ("sh", "-c", f'test "$(pwd)" = "{os.getcwd()}"')
    assert await process_runtime.exec(s.replica_id, cwd_ok, 5.0) == 0
    assert await process_runtime.exec(s.replica_id, ("sh", "-c", "exit 3"), 5.0) == 3
    with pytest.raises(RuntimeDriverError, match="not found or not executable"):
        await process_runtime.exec(s.replica_id, ("no-such-command-here",), 5.0)


async def test_process_exec_timeout_kills_the_command(process_runtime: ProcessRuntime, tmp_path: pathlib.Path) -> None:
    s = spec()
    await process_runtime.start(s)
    process_runtime.started.append(s.replica_id)  # type: ignore[attr-defined]
    marker = tmp_path / "still-running"
    t0 = time.monotonic()
    with pytest.raises(RuntimeDriverError, match="did not finish within 0.3 s"):
        await process_runtime.exec(s.replica_id, ("sh", "-c", f"sleep 30; touch {marker}"), 0.3)
    assert time.monotonic() - t0 < 3.0
    # The whole session went, the shell's child (sleep) included: nothing is left that
    # could still run `touch`.
    result = await exec_command(process_runtime, s.replica_id, ("sh", "-c", "exit 0"), 5.0)
    assert result.ok
    assert not marker.exists()


async def test_process_exec_of_a_replica_that_is_not_running(process_runtime: ProcessRuntime) -> None:
    result = await exec_command(process_runtime, "never-started", ("true",), 1.0)
    assert not result.ok and 'replica "never-started" not found' in result.message


# ---------------------------------------------------------------- where probes go


def tcp_probe(port: int | None) -> Probe:
    return Probe(kind=ProbeKind.TCP, port=port, timeout_seconds=1.0)


async def test_executor_targets_the_published_port_or_the_direct_address() -> None:
    rt = FakeRuntime()
    s = spec(container_port=8080, host_port=31000)
    await rt.start(s)
    ex = ProbeExecutor(s, rt, "10.1.2.3")
    assert await ex.address(tcp_probe(8080)) == ("10.1.2.3", 31000)
    assert await ex.address(tcp_probe(None)) == ("10.1.2.3", 31000)  # no port: the published one
    assert await ex.address(tcp_probe(9090)) == ("127.0.0.1", 9090)
    assert await ex.address(tcp_probe(9090)) == ("127.0.0.1", 9090)
    assert rt.calls_to("address") == [(s.replica_id, 9090)]  # resolved once per incarnation
    no_ports = ProbeExecutor(spec(), rt, "10.1.2.3")
    result = await no_ports.run(tcp_probe(None))
    assert not result.ok and "names no port" in result.message


async def test_executor_runs_each_kind() -> None:
    async with HttpServer() as srv:
        rt = FakeRuntime()
        s = spec(container_port=8080, host_port=srv.port)
        await rt.start(s)
        ex = ProbeExecutor(s, rt, "127.0.0.1")
        assert (await ex.run(Probe(kind=ProbeKind.HTTP, port=8080, path="/h"))).ok
        assert (await ex.run(Probe(kind=ProbeKind.TCP, port=8080))).ok
        assert (await ex.run(Probe(kind=ProbeKind.EXEC, command=("true",)))).ok
        srv.status = 503
        assert not (await ex.run(Probe(kind=ProbeKind.HTTP, port=8080, path="/h"))).ok
        # A direct port (the fake says loopback) where nothing listens.
        assert not (await ex.run(Probe(kind=ProbeKind.GRPC, port=free_port(), timeout_seconds=0.5))).ok


# -------------------------------------------------------------------- the loop


async def test_run_probes_flips_readiness_and_ends_on_restart() -> None:
    """Scripted results through the real loop: ready, unready, then a liveness restart."""
    readiness = Probe(kind=ProbeKind.TCP, port=1, period_seconds=0.02, failure_threshold=1)
    liveness = Probe(kind=ProbeKind.TCP, port=2, period_seconds=0.02, failure_threshold=2)
    machine = ReplicaProbes(started_at=time.time(), readiness=readiness, liveness=liveness)
    script = {1: [True, False, True, True, True], 2: [True, True, True, False, False, True]}
    seen: list[tuple[Role, Change]] = []

    async def run(p: Probe) -> ProbeResult:
        results = script[p.port or 0]
        ok = results.pop(0) if results else True
        return ProbeResult(ok=ok, message=f"port {p.port} {'ok' if ok else 'failed'}")

    async def on_changes(role: Role, result: ProbeResult, changes: tuple[Change, ...]) -> None:
        seen.extend((role, c) for c in changes)

    await asyncio.wait_for(run_probes(machine, run, on_changes, clock=time.time), 10.0)
    assert seen[0] == (Role.READINESS, ReadinessChanged(ready=True, message="port 1 ok"))
    assert seen[1] == (Role.READINESS, ReadinessChanged(ready=False, message="port 1 failed"))
    assert seen[-1] == (Role.LIVENESS, Restart(role=Role.LIVENESS, failures=2, message="port 2 failed"))
    assert machine.failed and not machine.ready


async def test_run_probes_cancels_what_is_in_flight() -> None:
    machine = ReplicaProbes(started_at=time.time() - 100, liveness=Probe(kind=ProbeKind.TCP, port=1))
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def run(p: Probe) -> ProbeResult:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return ProbeResult(ok=True)

    async def on_changes(*_: Any) -> None:
        raise AssertionError("no result was expected")

    loop_task = asyncio.create_task(run_probes(machine, run, on_changes, clock=time.time))
    await asyncio.wait_for(started.wait(), 5.0)
    loop_task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loop_task
    await eventually(cancelled.is_set, 5.0, what="the in-flight probe cancelled")


# ---------------------------------------------------------------------- Docker


@pytest_asyncio.fixture
async def docker_runtime() -> AsyncIterator[Any]:
    """A DockerRuntime with a node name of its own; skipped without an engine and image."""
    client = docker_with_image()
    from shoal.agent.runtime.docker import LABEL_NODE, DockerRuntime

    node = f"test-{uuid.uuid4().hex[:10]}"
    rt = DockerRuntime(node)
    try:
        yield rt
    finally:
        await rt.close()
        for container in client.containers.list(all=True, filters={"label": f"{LABEL_NODE}={node}"}):
            with contextlib.suppress(Exception):
                container.remove(force=True)
        client.close()


@pytest.mark.docker
async def test_docker_exec_and_direct_address(docker_runtime: Any) -> None:
    s = spec(driver=Driver.DOCKER, image="shoal-test/whoami:latest", command=(), container_port=8080, host_port=free_port())
    await docker_runtime.start(s)
    # The image is FROM scratch: /whoami is the only program. A second one cannot bind
    # 8080 (the first has it) and exits 2.
    assert await docker_runtime.exec(s.replica_id, ("/whoami",), 10.0) == 2
    with pytest.raises(RuntimeDriverError, match="cannot be run in its container"):
        await docker_runtime.exec(s.replica_id, ("/nope",), 10.0)
    failed = await exec_command(docker_runtime, s.replica_id, ("/whoami",), 10.0)
    assert not failed.ok and failed.message == 'exec "/whoami": exit status 2'
    # A probe of a port that is not published goes to the container's own address.
    host, port = await docker_runtime.address(s.replica_id, 8080)
    assert port == 8080 and host not in ("", "127.0.0.1")
    # Seen as if another port were the published one, 8080 is probed there directly.
    ex = ProbeExecutor(dataclasses.replace(s, container_port=9999), docker_runtime, "127.0.0.1")
    probe = Probe(kind=ProbeKind.HTTP, port=8080, path="/healthz", timeout_seconds=2.0)
    assert await ex.address(probe) == (host, 8080)
    assert await eventually(lambda: _passing(ex.run(probe)), 10.0, what="whoami answering on its container IP")


async def _passing(result: Awaitable[ProbeResult]) -> ProbeResult | None:
    r = await result
    return r if r.ok else None


# ------------------------------------------------------------------- the wire


def test_probes_cross_the_wire_unchanged() -> None:
    from shoal.agent.agent import run_spec_from_pb
    from shoal.leader.dispatcher import probe_pb
    from shoal.v1 import agent_pb2

    http = Probe(kind=ProbeKind.HTTP, port=8080, path="/healthz", initial_delay_seconds=2.0, period_seconds=0.5,
                 timeout_seconds=0.25, success_threshold=2, failure_threshold=4)
    exe = Probe(kind=ProbeKind.EXEC, command=("cat", "/tmp/ok"))
    grpc_probe = Probe(kind=ProbeKind.GRPC, port=9000, service="shop")
    run = agent_pb2.RunSpec(driver="process", command=["x"])
    run.readiness.CopyFrom(probe_pb(http))
    run.liveness.CopyFrom(probe_pb(exe))
    run.startup.CopyFrom(probe_pb(grpc_probe))
    a = agent_pb2.Assignment(replica_id="r1", deployment="d", generation=1, spec=run)
    a = agent_pb2.Assignment.FromString(a.SerializeToString())
    s = run_spec_from_pb(a)
    assert (s.readiness, s.liveness, s.startup) == (http, exe, grpc_probe)
    assert run_spec_from_pb(agent_pb2.Assignment(replica_id="r2", spec=agent_pb2.RunSpec(driver="process"))).readiness is None

    a.spec.liveness.kind = "carrier-pigeon"
    with pytest.raises(ValueError):
        run_spec_from_pb(a)
