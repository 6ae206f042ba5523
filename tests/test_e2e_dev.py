"""`shoal agent --dev` end to end, on a real Docker Engine, driven through the CLI.

These are the skeleton's acceptance tests: the seed example served round robin on port
80, a killed container replaced with no failed request, scale and delete, an agent
kill -9 that restarts nothing, and bad manifests that change nothing.
"""

from __future__ import annotations

import pathlib
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator

import docker
import pytest

from tests.cluster import DevAgent, http_get, service_manifest, wait_until, whoami_deployment

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "hello-world"
WHOAMI = "shoal-test/whoami:latest"


def seed_manifests(tmp: pathlib.Path, image: str) -> pathlib.Path:
    """The seed's deployment.yaml and service.yaml, only the image changed."""
    out = tmp / "manifests"
    out.mkdir(exist_ok=True)
    for name in ("deployment.yaml", "service.yaml"):
        text = (EXAMPLE / name).read_text().replace("shoal-example/hello-world:latest", image)
        (out / name).write_text(text)
    return out


@pytest.fixture(scope="module")
def docker_client() -> Iterator[docker.DockerClient]:
    client = docker.from_env()
    for image in (WHOAMI, "shoal-example/hello-world:latest"):
        try:
            client.images.get(image)
        except docker.errors.ImageNotFound:
            subprocess.run(["bash", str(ROOT / "scripts" / "build-images.sh")], check=True)
    yield client
    client.close()


@pytest.fixture
def agent(tmp_path: pathlib.Path, docker_client: docker.DockerClient) -> Iterator[DevAgent]:
    a = DevAgent(data_dir=tmp_path / "data")
    a.start()
    try:
        yield a
    finally:
        a.stop()
        a.cleanup_workloads()


def containers(client: docker.DockerClient, node: str) -> list[docker.models.containers.Container]:
    return client.containers.list(filters={"label": f"io.shoal.node={node}"})


def ready_pods(agent: DevAgent, n: int) -> list[dict[str, object]]:
    pods = agent.get_json("pods")
    if len(pods) == n and all(p.get("ready") for p in pods):
        return pods
    return []


def endpoints_of(agent: DevAgent, service: str) -> list[dict[str, object]]:
    for t in agent.get_json("endpoints"):
        if t["service"] == service:
            return list(t.get("endpoints", []))
    return []


def serving(port: int, expect: str | None = None) -> bool:
    try:
        body = http_get(port)
    except OSError:
        return False
    return expect is None or expect in body


def test_seed_example_serves_hello_world(agent: DevAgent, tmp_path: pathlib.Path, docker_client: docker.DockerClient) -> None:
    r = agent.cli("apply", "-f", str(EXAMPLE))
    assert r.code == 0, r.err
    assert "deployment/hello-world created" in r.out and "service/hello-world created" in r.out
    wait_until(lambda: ready_pods(agent, 3), 60, what="3 ready pods")
    wait_until(lambda: len(endpoints_of(agent, "hello-world")) == 3, 20, what="3 endpoints")
    for _ in range(3):
        assert wait_until(lambda: serving(80, "Hello World!"), 10, what="port 80")


def test_round_robin_reaches_every_replica_in_order(agent: DevAgent, tmp_path: pathlib.Path, docker_client: docker.DockerClient) -> None:
    r = agent.cli("apply", "-f", str(seed_manifests(tmp_path, WHOAMI)))
    assert r.code == 0, r.err
    wait_until(lambda: ready_pods(agent, 3), 60, what="3 ready pods")
    wait_until(lambda: len(endpoints_of(agent, "hello-world")) == 3, 20, what="3 endpoints in the table")
    cs = containers(docker_client, agent.node)
    assert len(cs) == 3
    for c in cs:
        labels = c.labels
        assert labels["io.shoal.deployment"] == "hello-world"
        assert labels["io.shoal.replica"].startswith("hello-world-")
        assert labels["io.shoal.generation"] == "1"
    # Endpoint order in the table is by replica id; whoami answers with its replica id.
    order = [str(e["pod"]) for e in endpoints_of(agent, "hello-world")]
    answers = [http_get(80).strip() for _ in range(30)]
    counts = Counter(answers)
    assert set(counts) == set(order), (counts, order)
    assert all(v == 10 for v in counts.values()), counts
    # S = (R mod N) + 1: consecutive requests walk the endpoint list cyclically.
    start = order.index(answers[0])
    assert answers == [order[(start + i) % 3] for i in range(30)]


def _load(port: int, stop: threading.Event, results: list[str | Exception]) -> None:
    while not stop.is_set():
        try:
            results.append(http_get(port, timeout=5.0).strip())
        except Exception as exc:  # every failure is counted, none hidden
            results.append(exc)


def test_killed_container_is_replaced_without_failed_requests(agent: DevAgent, tmp_path: pathlib.Path, docker_client: docker.DockerClient) -> None:
    assert agent.cli("apply", "-f", str(seed_manifests(tmp_path, WHOAMI))).code == 0
    wait_until(lambda: ready_pods(agent, 3), 60, what="3 ready pods")
    wait_until(lambda: len(endpoints_of(agent, "hello-world")) == 3, 20, what="3 endpoints")
    victim = containers(docker_client, agent.node)[0]
    replica = victim.labels["io.shoal.replica"]
    stop = threading.Event()
    results: list[str | Exception] = []
    loader = threading.Thread(target=_load, args=(80, stop, results))
    loader.start()
    try:
        wait_until(lambda: len(results) > 20, 10, what="load running")
        killed_at = time.monotonic()
        victim.kill()

        def replaced() -> bool:
            running = [c for c in containers(docker_client, agent.node) if c.status == "running"]
            return len(running) == 3 and victim.id not in {c.id for c in running} and bool(ready_pods(agent, 3))

        wait_until(replaced, 15, what="the killed replica to be replaced")
        took = time.monotonic() - killed_at
        seen = len(results)
        wait_until(lambda: len(results) > seen + 20, 10, what="load after replacement")
    finally:
        stop.set()
        loader.join(timeout=10)
    failures = [r for r in results if isinstance(r, Exception)]
    assert not failures, f"{len(failures)} failed of {len(results)}: {failures[:3]}"
    pods = {p["name"]: p for p in agent.get_json("pods")}
    assert replica in pods and int(pods[replica].get("restarts", 0)) >= 1, pods
    print(f"replaced in {took:.2f}s; {len(results)} requests, 0 failed")


def test_scale_and_delete(agent: DevAgent, tmp_path: pathlib.Path, docker_client: docker.DockerClient) -> None:
    manifests = seed_manifests(tmp_path, WHOAMI)
    assert agent.cli("apply", "-f", str(manifests)).code == 0
    wait_until(lambda: ready_pods(agent, 3), 60, what="3 ready pods")
    r = agent.cli("scale", "deployment/hello-world", "--replicas", "5")
    assert r.code == 0, r.err
    wait_until(lambda: ready_pods(agent, 5), 60, what="5 ready pods")
    wait_until(lambda: len(containers(docker_client, agent.node)) == 5, 20, what="5 containers")
    wait_until(lambda: len(endpoints_of(agent, "hello-world")) == 5, 20, what="5 endpoints")
    assert len({http_get(80).strip() for _ in range(5)}) == 5
    assert agent.cli("scale", "deployment/hello-world", "--replicas", "1").code == 0
    wait_until(lambda: ready_pods(agent, 1), 60, what="1 ready pod")
    wait_until(lambda: len(containers(docker_client, agent.node)) == 1, 30, what="1 container")
    r = agent.cli("delete", "-f", str(manifests))
    assert r.code == 0, r.err
    wait_until(lambda: not containers(docker_client, agent.node), 30, what="no containers")

    def port_closed() -> bool:
        try:
            socket.create_connection(("127.0.0.1", 80), timeout=1).close()
        except OSError:
            return True
        return False

    wait_until(port_closed, 10, what="port 80 to close")
    assert agent.get_json("pods") == []


def test_agent_kill9_restarts_nothing(agent: DevAgent, tmp_path: pathlib.Path, docker_client: docker.DockerClient) -> None:
    assert agent.cli("apply", "-f", str(seed_manifests(tmp_path, WHOAMI))).code == 0
    wait_until(lambda: ready_pods(agent, 3), 60, what="3 ready pods")
    before = {c.id: c.attrs["State"]["StartedAt"] for c in containers(docker_client, agent.node)}
    assert len(before) == 3
    agent.kill9()
    # The workloads outlive the agent.
    assert {c.id for c in containers(docker_client, agent.node)} == set(before)
    agent.start()
    wait_until(lambda: ready_pods(agent, 3), 30, what="3 ready pods after restart")
    wait_until(lambda: len(endpoints_of(agent, "hello-world")) == 3, 20, what="tables rebuilt")
    wait_until(lambda: serving(80), 10, what="traffic through port 80")
    after = {c.id: c for c in containers(docker_client, agent.node)}
    assert set(after) == set(before)
    for cid, c in after.items():
        c.reload()
        assert c.attrs["State"]["StartedAt"] == before[cid], "a container was restarted"
        assert c.attrs["RestartCount"] == 0
    assert all(int(p.get("restarts", 0)) == 0 for p in agent.get_json("pods"))
    assert len({http_get(80).strip() for _ in range(3)}) == 3


def test_bad_manifest_reports_every_problem_and_changes_nothing(agent: DevAgent, tmp_path: pathlib.Path) -> None:
    assert agent.cli("apply", "-f", str(seed_manifests(tmp_path, WHOAMI))).code == 0
    def declared() -> list[tuple[object, ...]]:
        return [(d["name"], d["generation"], d["manifest"]) for d in agent.get_json("deployments")]

    before = declared()
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: apps/v1\n"
        "kind: Deployment\n"
        "metadata:\n"
        "  name: hello-world\n"
        "spec:\n"
        "  replicas: -2\n"
        "  selector:\n"
        "    matchLabels:\n"
        "      app: hello-world\n"
        "  template:\n"
        "    metadata:\n"
        "      labels:\n"
        "        app: hello-world\n"
        "    spec:\n"
        "      containers:\n"
        "      - name: hello-world\n"
        "        image: shoal-test/whoami:latest\n"
        "        volumeMounts: []\n"
        "        ports:\n"
        '        - containerPort: "80a"\n'
    )
    r = agent.cli("apply", "-f", str(bad))
    assert r.code != 0
    lines = [line for line in r.err.splitlines() if line.startswith(str(bad))]
    assert any(":6: spec.replicas" in line for line in lines), r.err
    assert any(":18: spec.template.spec.containers[0].volumeMounts" in line for line in lines), r.err
    assert any(":20: spec.template.spec.containers[0].ports[0].containerPort" in line and "80a" in line for line in lines), r.err
    assert "Traceback" not in r.err
    assert declared() == before


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        ("apiVersion: v1\nkind: Pod\nmetadata:\n  name: x\n", "kind"),
        ("apiVersion: apps/v1beta1\nkind: Deployment\nmetadata:\n  name: x\n", "apiVersion"),
        ("", "no documents"),
        ("{{{ not: yaml\n  - [", ""),
        (None, "larger than"),
    ],
    ids=["unknown-kind", "bad-apiversion", "empty", "not-yaml", "10MB"],
)
def test_one_line_errors(agent: DevAgent, tmp_path: pathlib.Path, content: str | None, expect: str) -> None:
    f = tmp_path / "m.yaml"
    if content is None:
        f.write_text("# " + "x" * (10 * 1024 * 1024) + "\n")
    else:
        f.write_text(content)
    r = agent.cli("apply", "-f", str(f))
    assert r.code == 1
    problems = [line for line in r.err.splitlines() if line.startswith(str(f))]
    assert len(problems) == 1, r.err
    assert expect in problems[0]
    assert "Traceback" not in r.err
    assert agent.get_json("deployments") == []


def process_manifest(name: str, replicas: int, port: int | None = None) -> str:
    """A Deployment of the whoami binary on the process driver, and a round robin
    Service for it on `port` (none if `port` is None)."""
    whoami = ROOT / "build" / "bin" / "whoami"
    assert whoami.exists(), "scripts/build-images.sh builds build/bin/whoami"
    text = whoami_deployment(whoami, name, replicas)
    if port is not None:
        text += "---\n" + service_manifest(name, port, balance="round_robin")
    return text


def test_process_driver_and_logs(agent: DevAgent, tmp_path: pathlib.Path) -> None:
    port = 18080
    m = tmp_path / "proc.yaml"
    m.write_text(process_manifest("whoproc", 2, port))
    r = agent.cli("apply", "-f", str(m))
    assert r.code == 0, r.err
    wait_until(lambda: ready_pods(agent, 2), 30, what="2 ready process pods")
    wait_until(lambda: len(endpoints_of(agent, "whoproc")) == 2, 20, what="2 endpoints")
    answers = {http_get(port).strip() for _ in range(4)}
    assert answers == {p["name"] for p in agent.get_json("pods")}
    pod = sorted(answers)[0]
    r = agent.cli("logs", pod)
    assert r.code == 0, r.err
    r = agent.cli("get", "pods", "-o", "wide")
    assert r.code == 0 and pod in r.out
    r = agent.cli("describe", "pod", pod)
    assert r.code == 0, r.err
    assert f"name: {pod}" in r.out and "Scheduled" in r.out
    r = agent.cli("events")
    assert r.code == 0 and f"pod/{pod}" in r.out


def test_health_and_reflection_on_the_grpc_port(agent: DevAgent) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(agent.addr) as ch:
        for service in ("", "shoal.v1.Control", "shoal.v1.Agent"):
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
    assert {"shoal.v1.Control", "shoal.v1.Agent", "grpc.health.v1.Health"} <= services


def test_unreachable_server_is_one_clear_line(tmp_path: pathlib.Path) -> None:
    a = DevAgent(data_dir=tmp_path)
    r = a.cli("get", "pods", "--addr", "127.0.0.1:1")
    assert r.code == 1
    assert r.err.strip() == "error: cannot reach shoal at 127.0.0.1:1 — is 'shoal agent --dev' running?"


def test_a_taken_host_port_sends_the_replica_to_another(agent: DevAgent, tmp_path: pathlib.Path) -> None:
    """Something shoal does not manage holds the first port of the dynamic range: the
    replica is told so by its agent, gets another port, and serves."""
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("0.0.0.0", 20000))  # the scheduler's first choice on an empty node
    blocker.listen()
    try:
        m = tmp_path / "one.yaml"
        m.write_text(process_manifest("squatted", 1))
        assert agent.cli("apply", "-f", str(m)).code == 0
        pods = wait_until(lambda: ready_pods(agent, 1), 30, what="the replica ready on another port")
        assert int(pods[0]["host_port"]) != 20000
        assert http_get(int(pods[0]["host_port"])).strip() == pods[0]["name"]
        assert "PortInUse" in agent.cli("events").out
    finally:
        blocker.close()


def test_metrics_count_every_connection_by_endpoint(agent: DevAgent, tmp_path: pathlib.Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    port = 18081
    m = tmp_path / "metered.yaml"
    m.write_text(process_manifest("metered", 2, port))
    assert agent.cli("apply", "-f", str(m)).code == 0
    wait_until(lambda: ready_pods(agent, 2), 30, what="2 ready process pods")
    wait_until(lambda: len(endpoints_of(agent, "metered")) == 2, 20, what="2 endpoints")
    n = 10
    answers = [http_get(port).strip() for _ in range(n)]

    def scrape() -> dict[str, list[tuple[dict[str, str], float]]]:
        text = http_get(agent.metrics_port, "/metrics")
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for fam in text_string_to_metric_families(text):
            for sample in fam.samples:
                out.setdefault(sample.name, []).append((sample.labels, sample.value))
        return out

    metrics = scrape()
    per_endpoint = {labels["endpoint"]: value for labels, value in metrics["shoal_proxy_connections_total"]
                    if labels["service"] == "metered"}
    assert per_endpoint == {pod: float(answers.count(pod)) for pod in set(answers)}
    assert sorted(per_endpoint.values()) == [n / 2, n / 2], "round robin splits them evenly"
    wait_until(lambda: [v for labels, v in scrape()["shoal_proxy_active_connections"]
                        if labels["service"] == "metered"] == [0.0], 5, what="no connection left open")
    assert [v for labels, v in metrics["shoal_service_endpoints"] if labels["service"] == "metered"] == [2.0]
    assert [v for labels, v in metrics["shoal_proxy_first_byte_seconds_count"] if labels["service"] == "metered"] == [n]
    assert {labels["state"]: v for labels, v in metrics["shoal_replicas"]}.get("ready") == 2.0
    assert [v for labels, v in metrics["shoal_raft"] if labels["field"] == "leader"] == [1.0]
    assert metrics["shoal_node_memory_total_bytes"][0][1] > 0
