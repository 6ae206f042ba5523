"""Probes through the whole loop: leader (control loop, dispatcher, API) and agent shell in
one process over real gRPC, replicas run by the process driver (build/bin/whoami), by
Docker (shoal-test/whoami) when an engine is there, or by the fake runtime.

whoami's `GET /fail` makes its `/healthz` answer 500 from then on: a readiness probe
must take that replica out of every table, a liveness probe must restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import random
import subprocess
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from helpers import eventually, free_port
from shoal.agent.agent import AgentIdentity, AgentShell
from shoal.agent.proxy import ProxyConfig, ServiceProxy
from shoal.agent.reconciler import BackoffConfig, Reconciler
from shoal.agent.runtime.base import Runtime
from shoal.agent.runtime.fake import FakeRuntime
from shoal.agent.runtime.process import ProcessRuntime
from shoal.leader.api import ControlService
from shoal.leader.controller import Controller
from shoal.leader.dispatcher import AgentService
from shoal.leader.leader import ControlLoop
from shoal.leader.records import Phase, ReplicaRecord, TableRecord
from shoal.leader.scheduler import Scheduler, SchedulerConfig
from shoal.leader.store import MemoryStore
from shoal.model import Driver, Resources, RunSpec
from shoal.v1 import agent_pb2_grpc, control_pb2, control_pb2_grpc

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]

ROOT = pathlib.Path(__file__).resolve().parent.parent
WHOAMI_IMAGE = "shoal-test/whoami:latest"


@pytest.fixture(scope="module")
def whoami() -> str:
    """build/bin/whoami, built (binaries only, no Docker needed) if missing or stale."""
    build = subprocess.run(
        [str(ROOT / "scripts" / "build-images.sh"), "--binaries-only"], capture_output=True, text=True, timeout=600
    )
    assert build.returncode == 0, f"build-images.sh failed:\n{build.stdout}\n{build.stderr}"
    return str(ROOT / "build" / "bin" / "whoami")


def manifest(*, driver: str, command: str, replicas: int, probes: str, service_port: int) -> str:
    container = (
        f'        command: ["{command}"]\n' if driver == "process" else f"        image: {WHOAMI_IMAGE}\n"
    )
    return f"""\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: who
  annotations:
    shoal.io/driver: {driver}
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: who}}
  template:
    metadata:
      labels: {{app: who}}
    spec:
      containers:
      - name: whoami
{container}        ports:
        - containerPort: 8080
          name: web
{probes}
---
apiVersion: v1
kind: Service
metadata:
  name: who
spec:
  selector: {{app: who}}
  ports:
  - port: {service_port}
    targetPort: web
"""


READINESS = """\
        readinessProbe:
          httpGet: {path: /healthz, port: web}
          periodSeconds: 1
          failureThreshold: 1"""

LIVENESS = """\
        livenessProbe:
          httpGet: {path: /healthz, port: 8080}
          periodSeconds: 1
          failureThreshold: 1"""


@dataclass
class Cluster:
    store: MemoryStore
    runtime: Runtime
    shell: AgentShell
    control: control_pb2_grpc.ControlStub

    def replicas(self) -> list[ReplicaRecord]:
        return [ReplicaRecord.from_dict(r) for r in self.store.state.list("replicas")]

    def replica(self, rid: str) -> ReplicaRecord:
        return ReplicaRecord.from_dict(self.store.state.get("replicas", rid) or {})

    def table_pods(self, service: str) -> set[str]:
        """Endpoints of `service` in the leader's table."""
        raw = self.store.state.get("tables", service)
        return {e["pod"] for e in TableRecord.from_dict(raw).endpoints} if raw else set()

    def agent_table_pods(self, service: str) -> set[str]:
        """Endpoints of `service` in the tables the agent last received."""
        return {e.pod for t in self.shell.tables if t.service == service for e in t.endpoints}

    def events(self, reason: str) -> list[dict[str, Any]]:
        return [e for e in self.store.state.events if e["reason"] == reason]

    async def apply(self, text: str) -> None:
        await self.control.Apply(
            control_pb2.ApplyRequest(documents=[control_pb2.Document(source="who.yaml", content=text)])
        )

    def all_ready(self, n: int) -> bool:
        reps = self.replicas()
        return len(reps) == n and all(r.ready and r.phase == Phase.RUNNING and r.handle for r in reps)


@contextlib.asynccontextmanager
async def cluster_with(runtime: Runtime) -> AsyncIterator[Cluster]:
    store = MemoryStore()
    controller = Controller(Scheduler(SchedulerConfig(), random.Random(3)), random.Random(3))
    server = grpc.aio.server()
    control_pb2_grpc.add_ControlServicer_to_server(ControlService(store, controller), server)
    agent_pb2_grpc.add_AgentServicer_to_server(AgentService(store, controller), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    reconciler = Reconciler({runtime.driver: runtime}, config=BackoffConfig(base=0.05, cap=1.0, reset=30.0))
    proxy = ServiceProxy(ProxyConfig(bind_host="127.0.0.1"))
    identity = AgentIdentity(node=runtime_node(runtime), address="127.0.0.1", role="server",
                             capacity=Resources(cpu_millis=4000, memory_bytes=8 << 30))
    shell = AgentShell(identity, f"127.0.0.1:{port}", reconciler, proxy, report_interval=1.0, resync_interval=0.2)
    tasks = [asyncio.create_task(ControlLoop(store, controller, tick=0.1).run()), asyncio.create_task(shell.run())]
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Cluster(store, runtime, shell, control_pb2_grpc.ControlStub(channel))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for rid in [o.replica_id for o in await runtime.list()]:
            with contextlib.suppress(Exception):
                await runtime.stop(rid, timeout=1.0)
        await runtime.close()
        await proxy.close()
        await channel.close()
        await server.stop(None)


def runtime_node(runtime: Runtime) -> str:
    return str(getattr(runtime, "node_name"))


@contextlib.asynccontextmanager
async def process_cluster(tmp_path: pathlib.Path) -> AsyncIterator[Cluster]:
    runtime = ProcessRuntime(f"test-{uuid.uuid4().hex[:8]}", tmp_path / "processes", poll_interval=0.05)
    async with cluster_with(runtime) as c:
        yield c


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


async def get(port: int, path: str) -> tuple[int, str]:
    return await asyncio.to_thread(http_get, port, path)


async def timed(fn: Callable[[], Any], timeout: float, what: str) -> float:
    """Seconds until `fn` holds (failing at `timeout`)."""
    t0 = time.monotonic()
    await eventually(fn, timeout, interval=0.02, what=what)
    return time.monotonic() - t0


async def test_readiness_probe_takes_a_failing_replica_out_of_every_table(tmp_path: pathlib.Path, whoami: str) -> None:
    service_port = free_port()
    async with process_cluster(tmp_path) as c:
        await c.apply(manifest(driver="process", command=whoami, replicas=2, probes=READINESS, service_port=service_port))
        await eventually(lambda: c.all_ready(2), 20, what="2 replicas ready by their readiness probe")
        pods = {r.id for r in c.replicas()}
        await eventually(lambda: c.table_pods("who") == pods == c.agent_table_pods("who"), 10, what="both endpoints in every table")
        sick, well = sorted(c.replicas(), key=lambda r: r.id)
        assert sick.host_port is not None

        assert (await get(sick.host_port, "/fail"))[0] == 200
        # failureThreshold 1, periodSeconds 1: out of every table within one period plus
        # about a second (slack here for a loaded test machine).
        elapsed = await timed(
            lambda: c.table_pods("who") == {well.id} == c.agent_table_pods("who"), 10, "the sick endpoint gone"
        )
        assert elapsed < 4.0, f"took {elapsed:.2f} s"
        rec = c.replica(sick.id)
        assert not rec.ready and rec.phase == Phase.RUNNING and rec.restarts == 0 and rec.handle == sick.handle
        (event,) = [e for e in c.events("Unhealthy") if e["object"] == f"pod/{sick.id}"]
        assert event["type"] == "Warning" and event["message"].startswith("Readiness probe failed:")
        assert "status 500" in event["message"]
        # The proxy follows the table: every request lands on the healthy replica.
        answers = {(await get(service_port, "/"))[1].strip() for _ in range(4)}
        assert answers == {well.id}


async def test_liveness_probe_restarts_a_failing_replica(tmp_path: pathlib.Path, whoami: str) -> None:
    async with process_cluster(tmp_path) as c:
        await c.apply(manifest(driver="process", command=whoami, replicas=1, probes=LIVENESS, service_port=free_port()))
        await eventually(lambda: c.all_ready(1), 20, what="the replica ready")
        (before,) = c.replicas()
        assert before.host_port is not None and before.restarts == 0
        assert (await get(before.host_port, "/fail"))[0] == 200

        def restarted() -> bool:
            rec = c.replica(before.id)
            return rec.restarts == 1 and rec.ready and rec.handle not in ("", before.handle)

        await eventually(restarted, 15, what="the replica restarted by its liveness probe, ready again")
        (event,) = [e for e in c.events("Unhealthy") if e["object"] == f"pod/{before.id}"]
        assert event["type"] == "Warning"
        assert event["message"].startswith("Liveness probe failed 1 time in a row: HTTP GET")
        assert event["message"].endswith("; restarting")
        # The new incarnation is healthy: no second restart.
        assert (await get(before.host_port, "/healthz"))[0] == 200
        assert c.replica(before.id).restarts == 1


async def test_exec_liveness_on_the_fake_runtime_restarts_with_back_off() -> None:
    runtime = FakeRuntime(f"fake-{uuid.uuid4().hex[:8]}", driver=Driver.PROCESS)
    probes = """\
        livenessProbe:
          exec: {command: [check, --deep]}
          periodSeconds: 1
          failureThreshold: 2"""
    async with cluster_with(runtime) as c:
        runtime.set_exec(1)
        text = manifest(driver="process", command="whoami", replicas=1, probes=probes, service_port=free_port())
        await c.apply(text)
        await eventually(lambda: c.replicas() and c.replicas()[0].restarts >= 1, 15, what="a restart for the exec probe")
        runtime.set_exec(0)
        (rec,) = c.replicas()
        assert ("exec", (rec.id, ("check", "--deep"))) in runtime.calls
        assert c.events("Unhealthy")[0]["message"] == (
            'Liveness probe failed 2 times in a row: exec "check --deep": exit status 1; restarting'
        )


@pytest.mark.docker
async def test_docker_replica_liveness_restart(tmp_path: pathlib.Path) -> None:
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env()
        client.ping()
        client.images.get(WHOAMI_IMAGE)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"Docker Engine or {WHOAMI_IMAGE} not available: {exc}")
    finally:
        with contextlib.suppress(Exception):
            client.close()
    from shoal.agent.runtime.docker import DockerRuntime

    both = READINESS + "\n" + LIVENESS
    async with cluster_with(DockerRuntime(f"test-{uuid.uuid4().hex[:8]}")) as c:
        await c.apply(manifest(driver="docker", command="", replicas=1, probes=both, service_port=free_port()))
        await eventually(lambda: c.all_ready(1), 30, what="the container ready by its probe")
        (before,) = c.replicas()
        assert before.host_port is not None
        assert (await get(before.host_port, "/fail"))[0] == 200
        await eventually(lambda: not c.replica(before.id).ready, 10, what="not ready after /fail")

        def restarted() -> bool:
            rec = c.replica(before.id)
            return rec.restarts == 1 and rec.ready and rec.handle not in ("", before.handle)

        await eventually(restarted, 30, what="the container restarted and ready again")


async def test_reconciler_kill_counts_a_crash_and_restarts_after_back_off() -> None:
    now = [1000.0]
    runtime = FakeRuntime("n", driver=Driver.PROCESS, clock=lambda: now[0])
    rec = Reconciler({Driver.PROCESS: runtime}, config=BackoffConfig(base=0.2, cap=5.0, reset=30.0), clock=lambda: now[0])
    spec = RunSpec(replica_id="r1", deployment="d", generation=1, driver=Driver.PROCESS, image="", command=("x",))
    rec.set_desired({"r1": spec})
    await rec.reconcile()
    handle = rec.observed["r1"].handle

    assert not await rec.kill("r1", "Liveness probe failed", handle="another-incarnation")
    assert not await rec.kill("nobody", "Liveness probe failed")
    assert runtime.running_ids() == {"r1"}

    assert await rec.kill("r1", "Liveness probe failed", handle=handle, timeout=0.0)
    assert runtime.running_ids() == set() and runtime.calls_to("stop") == ["r1"]
    assert await rec.reconcile() == []  # in back-off: counted as the first crash
    (view,) = rec.views({})
    assert view.state == "starting" and view.restarts == 0
    assert view.message == "back-off 0.2s restarting failed replica (Liveness probe failed)"
    assert rec.next_deadline() == pytest.approx(1000.2)

    now[0] += 0.2
    (action,) = await rec.reconcile()
    assert action.kind.value == "restart" and runtime.running_ids() == {"r1"}
    (view,) = rec.views({})
    assert view.restarts == 1 and view.state == "running" and view.message == ""
    assert rec.history["r1"].failures == 1 and rec.next_deadline() is None

    # Killed again soon after: the next back-off step (0.4 s).
    assert await rec.kill("r1", "Liveness probe failed", timeout=0.0)
    assert rec.next_deadline() == pytest.approx(now[0] + 0.4)
