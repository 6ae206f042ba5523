"""Per-replica CPU and memory on `/metrics`: `shoal_replica_cpu_seconds_total` and
`shoal_replica_memory_bytes`, labelled deployment and replica.

- The cgroup locating and parsing (`shoal.agent.runtime.cgroups`) on tables: v1, v2,
  hybrid hosts, a mount of a subtree, a path that is not the container's.
- The stats API's answer as the docker driver's fallback reads it (v1 and v2 keys).
- The process driver on real processes: CPU of the whole tree (a child that worked and
  was reaped counts), resident memory, nothing once the replica is stopped.
- The docker driver on a real container: figures from the cgroup files, the stats API
  when those cannot be read, nothing once the container is gone.
- A real `shoal agent --dev` with the process driver: the series appear on /metrics
  after some CPU work and vanish when the deployment is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import sys
import textwrap
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from shoal.agent.metrics import AgentMetrics, ReplicaUsage
from shoal.agent.runtime import cgroups
from shoal.agent.runtime.base import Observed
from shoal.agent.runtime.process import ProcessRuntime
from shoal.model import Driver, RunSpec
from tests.cluster import DevAgent, process_deployment
from tests.helpers import docker_with_image, eventually, free_port, wait_until

MIB = 1024 * 1024

# --------------------------------------------------------------------------- cgroup files

V1_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
"""
V2_MOUNTINFO = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate\n"
SUBTREE_MOUNTINFO = "30 23 0:26 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
ID = "34f0466e430e"
V1_CGROUP = f"""\
9:name=systemd:/docker/{ID}
4:memory:/docker/{ID}
2:cpu,cpuacct:/docker/{ID}
0::/docker/{ID}
"""
V2_CGROUP = f"0::/system.slice/docker-{ID}.scope\n"


@pytest.mark.parametrize(("mountinfo", "proc_cgroup", "expect", "files"), [
    (V1_MOUNTINFO, V1_CGROUP, ID, cgroups.CgroupFiles(
        cpu=pathlib.Path(f"/sys/fs/cgroup/cpu,cpuacct/docker/{ID}/cpuacct.usage"),
        memory=pathlib.Path(f"/sys/fs/cgroup/memory/docker/{ID}/memory.usage_in_bytes"),
        memory_stat=pathlib.Path(f"/sys/fs/cgroup/memory/docker/{ID}/memory.stat"), v2=False)),
    (V2_MOUNTINFO, V2_CGROUP, ID, cgroups.CgroupFiles(
        cpu=pathlib.Path(f"/sys/fs/cgroup/system.slice/docker-{ID}.scope/cpu.stat"),
        memory=pathlib.Path(f"/sys/fs/cgroup/system.slice/docker-{ID}.scope/memory.current"),
        memory_stat=pathlib.Path(f"/sys/fs/cgroup/system.slice/docker-{ID}.scope/memory.stat"), v2=True)),
    # Only a subtree is mounted (a cgroup namespace, a container's view): paths under it resolve...
    (SUBTREE_MOUNTINFO, f"0::/kubepods/pod1/{ID}\n", ID, cgroups.CgroupFiles(
        cpu=pathlib.Path(f"/sys/fs/cgroup/{ID}/cpu.stat"), memory=pathlib.Path(f"/sys/fs/cgroup/{ID}/memory.current"),
        memory_stat=pathlib.Path(f"/sys/fs/cgroup/{ID}/memory.stat"), v2=True)),
    # ...paths outside it do not.
    (SUBTREE_MOUNTINFO, f"0::/other/{ID}\n", ID, None),
    # The pid now belongs to something else (or to another host's engine).
    (V2_MOUNTINFO, "0::/user.slice/session-1.scope\n", ID, None),
    # No cgroup mounted at all.
    ("22 1 0:21 / /proc rw - proc proc rw\n", V2_CGROUP, ID, None),
])
def test_a_process_cgroup_files_are_found_from_its_paths_and_the_mounts(
        mountinfo: str, proc_cgroup: str, expect: str, files: cgroups.CgroupFiles | None) -> None:
    got = cgroups.resolve(cgroups.parse_mounts(mountinfo), cgroups.parse_proc_cgroup(proc_cgroup), expect=expect)
    assert got == files


@pytest.mark.parametrize(("v2", "cpu_text", "memory_text", "stat_text", "expected"), [
    (False, "2500000000\n", "104857600\n", "cache 5\ntotal_inactive_file 4194304\n", (2.5, 100 * MIB - 4 * MIB)),
    (True, "usage_usec 1500000\nuser_usec 1000000\n", "52428800\n", "anon 1\ninactive_file 2097152\n",
     (1.5, 50 * MIB - 2 * MIB)),
    (True, "usage_usec 7\n", "1000\n", "inactive_file 5000\n", (7e-6, 0)),  # never negative
])
def test_cgroup_figures_are_cpu_seconds_and_the_working_set(
        tmp_path: pathlib.Path, v2: bool, cpu_text: str, memory_text: str, stat_text: str,
        expected: tuple[float, int]) -> None:
    files = cgroups.CgroupFiles(cpu=tmp_path / "cpu", memory=tmp_path / "mem", memory_stat=tmp_path / "stat", v2=v2)
    files.cpu.write_text(cpu_text)
    files.memory.write_text(memory_text)
    files.memory_stat.write_text(stat_text)
    cpu, memory = cgroups.read(files) or (None, None)
    assert cpu == pytest.approx(expected[0]) and memory == expected[1]
    files.cpu.unlink()  # the container is gone
    assert cgroups.read(files) is None


def test_the_stats_api_fallback_reads_v1_and_v2_answers() -> None:
    docker_runtime = pytest.importorskip("shoal.agent.runtime.docker")
    usage = docker_runtime._usage_from_stats
    v1 = {"cpu_stats": {"cpu_usage": {"total_usage": 3_000_000_000}},
          "memory_stats": {"usage": 10 * MIB, "stats": {"total_inactive_file": MIB}}}
    v2 = {"cpu_stats": {"cpu_usage": {"total_usage": 1_000_000}},
          "memory_stats": {"usage": 10 * MIB, "stats": {"inactive_file": 2 * MIB}}}
    assert (usage(v1).cpu_seconds, usage(v1).memory_bytes) == (3.0, 9 * MIB)
    assert (usage(v2).cpu_seconds, usage(v2).memory_bytes) == (0.001, 8 * MIB)
    assert usage({"cpu_stats": {}, "memory_stats": {}}) is None  # a stopped container's answer


# --------------------------------------------------------------------------- /metrics


def _samples(text: str, name: str) -> dict[tuple[str, str], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[(s.labels["deployment"], s.labels["replica"])] = s.value
    return out


def test_the_collector_shows_exactly_the_replicas_read_at_each_scrape(tmp_path: pathlib.Path) -> None:
    rows = [ReplicaUsage(deployment="web", replica="web-1", cpu_seconds=1.25, memory_bytes=3 * MIB),
            ReplicaUsage(deployment="db", replica="db-1", cpu_seconds=0.5, memory_bytes=MIB)]
    m = AgentMetrics(tmp_path)
    m.add_replica_usage(lambda: list(rows))
    text = m.render().decode()
    assert _samples(text, "shoal_replica_cpu_seconds_total") == {("web", "web-1"): 1.25, ("db", "db-1"): 0.5}
    assert _samples(text, "shoal_replica_memory_bytes") == {("web", "web-1"): 3 * MIB, ("db", "db-1"): MIB}
    assert "# TYPE shoal_replica_cpu_seconds_total counter" in text
    rows.pop()  # db-1 stopped
    text = m.render().decode()
    assert set(_samples(text, "shoal_replica_cpu_seconds_total")) == {("web", "web-1")}
    assert set(_samples(text, "shoal_replica_memory_bytes")) == {("web", "web-1")}


# --------------------------------------------------------------------------- process driver

# Works in a child (reaped: its time moves to the parent's), then holds ~40 MiB and waits.
_WORKER = textwrap.dedent("""\
    import subprocess, sys, time
    subprocess.run([sys.executable, "-c",
                    "import time\\nt = time.process_time()\\nwhile time.process_time() - t < 0.3: pass"], check=True)
    ballast = bytearray(40 * 1024 * 1024)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    print("ready", flush=True)
    time.sleep(3600)
""")


def _process_spec(replica_id: str) -> RunSpec:
    return RunSpec(replica_id=replica_id, deployment="burn", generation=1, driver=Driver.PROCESS,
                   image="", command=(sys.executable, "-c", _WORKER))


@pytest_asyncio.fixture
async def process_runtime(tmp_path: pathlib.Path) -> AsyncIterator[ProcessRuntime]:
    rt = ProcessRuntime(f"test-{uuid.uuid4().hex[:8]}", tmp_path / "processes")
    yield rt
    for o in await rt.list():
        with contextlib.suppress(Exception):
            await rt.stop(o.replica_id, timeout=1.0)
    await rt.close()


@pytest.mark.asyncio
async def test_process_replicas_report_their_tree_cpu_and_memory_and_nothing_once_stopped(
        process_runtime: ProcessRuntime, tmp_path: pathlib.Path) -> None:
    rt = process_runtime
    started = await rt.start(_process_spec("burn-1"))
    log = tmp_path / "processes" / "burn-1.log"
    await eventually(lambda: log.exists() and b"ready" in log.read_bytes(), 30, what="the worker's child to finish")
    usage = rt.usages([started])["burn-1"]
    # The child's 0.3 s of CPU counts although it is gone; the ballast is resident.
    assert usage.cpu_seconds >= 0.25
    assert 40 * MIB <= usage.memory_bytes < 1024 * MIB
    again = rt.usages([started])["burn-1"]
    assert again.cpu_seconds >= usage.cpu_seconds  # a counter
    await rt.stop("burn-1", timeout=2.0)
    assert rt.usages([started]) == {}
    stopped = Observed(**{**{f: getattr(started, f) for f in started.__dataclass_fields__}, "running": False})
    assert rt.usages([stopped]) == {}


# --------------------------------------------------------------------------- docker driver


@pytest.fixture(scope="module")
def docker_client() -> Iterator[Any]:
    client = docker_with_image()
    yield client
    client.close()


@pytest_asyncio.fixture
async def docker_runtime(docker_client: Any) -> AsyncIterator[Any]:
    from shoal.agent.runtime.docker import LABEL_NODE, DockerRuntime

    node = f"test-{uuid.uuid4().hex[:10]}"
    rt = DockerRuntime(node)
    yield rt
    await rt.close()
    for c in docker_client.containers.list(all=True, filters={"label": f"{LABEL_NODE}={node}"}):
        with contextlib.suppress(Exception):
            c.remove(force=True)


def _docker_spec(replica_id: str) -> RunSpec:
    return RunSpec(replica_id=replica_id, deployment="whoami", generation=1, driver=Driver.DOCKER,
                   image="shoal-test/whoami:latest", container_port=8080, host_port=free_port())


def _get(port: int | None, path: str = "/") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
        return str(resp.read().decode())


async def _work(port: int | None) -> None:
    """Some CPU work inside the container: HTTP requests it answers."""
    await eventually(lambda: asyncio.to_thread(_get, port), 15, what="the container to answer")
    for _ in range(50):
        await asyncio.to_thread(_get, port)


@pytest.mark.docker
@pytest.mark.asyncio
async def test_containers_report_cgroup_cpu_and_memory_and_nothing_once_removed(docker_runtime: Any) -> None:
    rt = docker_runtime
    spec = _docker_spec(f"r-{uuid.uuid4().hex[:8]}")
    await rt.start(spec)
    await _work(spec.host_port)
    [running] = [o for o in await rt.list() if o.replica_id == spec.replica_id]  # list() learns the pid
    usage = rt.usages([running])[spec.replica_id]
    assert rt._cgroups[running.handle] is not None  # read from the cgroup, not the slow stats API
    assert usage.cpu_seconds > 0
    assert 256 * 1024 <= usage.memory_bytes < 512 * MIB  # a small Go server
    await _work(spec.host_port)
    assert rt.usages([running])[spec.replica_id].cpu_seconds > usage.cpu_seconds
    await rt.stop(spec.replica_id, timeout=2.0)
    assert rt.usages([running]) == {}


@pytest.mark.docker
@pytest.mark.asyncio
async def test_containers_fall_back_to_the_stats_api_where_the_cgroup_is_not_readable(
        docker_runtime: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import shoal.agent.runtime.docker as docker_driver

    monkeypatch.setattr(docker_driver.cgroups, "locate", lambda pid, expect="": None)
    rt = docker_runtime
    spec = _docker_spec(f"r-{uuid.uuid4().hex[:8]}")
    await rt.start(spec)
    await _work(spec.host_port)
    [running] = [o for o in await rt.list() if o.replica_id == spec.replica_id]
    # The first scrape starts the stats thread and has nothing yet; a later one has its figures.
    usage = await eventually(lambda: rt.usages([running]).get(spec.replica_id), 30, what="figures from the stats API")
    assert usage.cpu_seconds > 0 and 256 * 1024 <= usage.memory_bytes < 512 * MIB
    await rt.stop(spec.replica_id, timeout=2.0)
    await eventually(lambda: not rt._stats_busy.is_set(), 30, what="the stats thread to finish")
    assert rt.usages([]) == {} and rt._stats == {}  # nothing kept for a container that is gone


# --------------------------------------------------------------------------- a real agent


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


@pytest.mark.e2e
def test_an_agent_serves_replica_series_while_they_run_and_drops_them_after(tmp_path: pathlib.Path) -> None:
    agent = DevAgent(tmp_path / "agent", extra_args=("--driver", "process"))
    try:
        agent.start(timeout=60)
        manifest = tmp_path / "burn.yaml"
        manifest.write_text(process_deployment("burn", 2, "burn", [sys.executable, "-c", _WORKER]))
        r = agent.cli("apply", "-f", str(manifest))
        assert r.code == 0, r.err

        def worked() -> bool:
            # Both workers past their child's CPU work and holding their ballast.
            text = _scrape(agent.metrics_port)
            cpu = {k: v for k, v in _samples(text, "shoal_replica_cpu_seconds_total").items() if k[0] == "burn"}
            memory = {k: v for k, v in _samples(text, "shoal_replica_memory_bytes").items() if k[0] == "burn"}
            return (len(cpu) == 2 and set(memory) == set(cpu) and all(v >= 0.25 for v in cpu.values())
                    and all(40 * MIB <= v < 1024 * MIB for v in memory.values()))

        wait_until(worked, 60, interval=0.5, what="two burn replicas with their CPU and memory on /metrics")
        r = agent.cli("delete", "deployment", "burn")
        assert r.code == 0, r.err

        def gone() -> bool:
            text = _scrape(agent.metrics_port)
            return not any(k[0] == "burn" for name in ("shoal_replica_cpu_seconds_total", "shoal_replica_memory_bytes")
                           for k in _samples(text, name))

        wait_until(gone, 30, interval=0.5, what="the burn series to vanish")
    finally:
        agent.stop()
        agent.cleanup_workloads()
