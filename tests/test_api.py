"""The gRPC edge: `Control` (leader/api.py) and `Agent` (leader/dispatcher.py) on a real
in-process grpc.aio server over a MemoryStore, driven through `shoal.client.Client`
(sync, run in a worker thread) and the aio stubs."""

from __future__ import annotations

import asyncio
import inspect
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import pytest

import shoal.errors
from shoal.client import Client, RequestRejected
from shoal.errors import NotFound, ShoalError
from shoal.leader.api import ControlService, status_for
from shoal.leader.controller import Controller
from shoal.leader.dispatcher import AgentService, apply_report
from shoal.leader.records import NodeRecord, Phase, ReplicaRecord
from shoal.leader.scheduler import Scheduler, SchedulerConfig
from shoal.leader.state import ClusterState, Put, Txn
from shoal.leader.store import MemoryStore
from shoal.v1 import agent_pb2, agent_pb2_grpc, control_pb2, control_pb2_grpc, types_pb2

from helpers import eventually

NOW = 1_700_000_000.0
T = TypeVar("T")

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: web}}
  template:
    metadata:
      labels: {{app: web}}
    spec:
      containers:
      - name: web
        image: {image}
        ports:
        - containerPort: 8080
"""

SERVICE = """\
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector: {app: web}
  ports:
  - port: 80
    targetPort: 8080
"""

BAD = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: broken
spec:
  replicas: -1
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: img
        ports:
        - containerPort: "80a"
        bogusField: 1
"""


def deployment_yaml(replicas: int = 3, image: str = "img:1") -> str:
    return DEPLOYMENT.format(replicas=replicas, image=image)


class RecordingLogger:
    """A structlog stand-in that keeps the event names it was given."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def _record(self, event: str, **_: Any) -> None:
        self.events.append(event)

    info = warning = error = debug = exception = _record


@dataclass
class Env:
    store: MemoryStore
    controller: Controller
    addr: str
    client: Client
    channel: grpc.aio.Channel
    log: RecordingLogger

    @property
    def control(self) -> control_pb2_grpc.ControlStub:
        return control_pb2_grpc.ControlStub(self.channel)

    @property
    def agent(self) -> agent_pb2_grpc.AgentStub:
        return agent_pb2_grpc.AgentStub(self.channel)

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a sync client call off the event loop the server runs on."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def settle(self) -> None:
        for _ in range(10):
            txn = self.controller.reconcile(self.store.state, NOW)
            if not txn:
                return
            await self.store.commit(txn)
        raise AssertionError("controller did not settle")


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    store = MemoryStore()
    controller = Controller(Scheduler(SchedulerConfig(), random.Random(1)), random.Random(1))
    log = RecordingLogger()
    server = grpc.aio.server()
    control_pb2_grpc.add_ControlServicer_to_server(ControlService(store, controller, clock=lambda: NOW, logger=log), server)
    agent_pb2_grpc.add_AgentServicer_to_server(AgentService(store, controller, clock=lambda: NOW, logger=log), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    addr = f"127.0.0.1:{port}"
    client = Client(addr, timeout=5.0)
    channel = grpc.aio.insecure_channel(addr)
    try:
        yield Env(store, controller, addr, client, channel, log)
    finally:
        client.close()
        await channel.close()
        await server.stop(None)


async def with_node(env: Env, name: str = "n1") -> None:
    node = NodeRecord(name=name, address="10.0.0.1", cpu_millis=4000, memory_bytes=8 << 30)
    await env.store.commit(Txn(ops=(Put(kind="nodes", name=name, value=node.to_dict()),)))


def actions(resp: control_pb2.ApplyResponse) -> list[tuple[str, str, str]]:
    return [(o.kind, o.name, o.action) for o in resp.objects]


# -- apply ------------------------------------------------------------------------


async def test_apply_creates_then_is_unchanged_then_configured(env: Env) -> None:
    docs = [("deployment.yaml", deployment_yaml()), ("service.yaml", SERVICE)]
    resp = await env.call(env.client.apply, docs)
    assert actions(resp) == [("Deployment", "web", "created"), ("Service", "web", "created")]
    revision = env.store.state.revision

    resp = await env.call(env.client.apply, docs)
    assert actions(resp) == [("Deployment", "web", "unchanged"), ("Service", "web", "unchanged")]
    assert env.store.state.revision == revision, "an unchanged apply writes nothing"

    # Replica count only: same template, no rollover.
    resp = await env.call(env.client.apply, [("deployment.yaml", deployment_yaml(replicas=5))])
    assert actions(resp) == [("Deployment", "web", "configured")]
    rec = env.store.state.get("deployments", "web")
    assert rec is not None and (rec["generation"], rec["template_generation"]) == (2, 1)

    # New image: a new template generation.
    resp = await env.call(env.client.apply, [("deployment.yaml", deployment_yaml(replicas=5, image="img:2"))])
    assert actions(resp) == [("Deployment", "web", "configured")]
    rec = env.store.state.get("deployments", "web")
    assert rec is not None and (rec["generation"], rec["template_generation"]) == (3, 2)

    reasons = [(e["reason"], e["object"]) for e in env.store.state.events_since(0)]
    assert reasons == [("Created", "deployment/web"), ("Created", "service/web"),
                       ("Configured", "deployment/web"), ("Configured", "deployment/web")]


async def test_dry_run_changes_nothing(env: Env) -> None:
    resp = await env.call(env.client.apply, [("d.yaml", deployment_yaml())], dry_run=True)
    assert actions(resp) == [("Deployment", "web", "created")]
    assert env.store.state.revision == 0


async def test_invalid_apply_lists_every_problem_and_changes_nothing(env: Env) -> None:
    await env.call(env.client.apply, [("service.yaml", SERVICE)])
    revision = env.store.state.revision
    docs = [("good.yaml", deployment_yaml()), ("bad.yaml", BAD), ("dup.yaml", SERVICE)]
    with pytest.raises(RequestRejected) as info:
        await env.call(env.client.apply, docs)
    lines = str(info.value).splitlines()
    assert "bad.yaml:6: spec.replicas: must be an integer >= 0, got -1" in lines
    assert any(line.startswith("bad.yaml:17: spec.template.spec.containers[0].ports[0].containerPort:") for line in lines)
    assert "bad.yaml:18: spec.template.spec.containers[0].bogusField: field not supported by shoal" in lines
    assert len(lines) == 3
    assert env.store.state.revision == revision
    assert env.store.state.get("deployments", "web") is None


async def test_the_same_object_twice_in_one_apply_is_refused(env: Env) -> None:
    with pytest.raises(RequestRejected, match=r"b.yaml:1: metadata.name: Service \"web\" is also defined at a.yaml:1"):
        await env.call(env.client.apply, [("a.yaml", SERVICE), ("b.yaml", SERVICE)])
    assert env.store.state.revision == 0


async def test_invalid_argument_codes_at_the_edge(env: Env) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await env.control.Apply(control_pb2.ApplyRequest(documents=[control_pb2.Document(source="bad.yaml", content=BAD)]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await env.control.Apply(control_pb2.ApplyRequest())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await env.control.Get(control_pb2.GetRequest(kind="widgets"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert 'unknown resource type "widgets"' in (info.value.details() or "")


# -- reads --------------------------------------------------------------------------


async def test_get_lists_and_finds_objects(env: Env) -> None:
    await with_node(env)
    await env.call(env.client.apply, [("d.yaml", deployment_yaml(replicas=2)), ("s.yaml", SERVICE)])
    await env.settle()
    resp = await env.call(env.client.get, "deploy")
    assert [(d.name, d.replicas, d.image) for d in resp.deployments] == [("web", 2, "img:1")]
    pods = (await env.call(env.client.get, "pods")).pods
    assert len(pods) == 2 and all(p.phase == "Assigned" and p.node == "n1" for p in pods)
    one = await env.call(env.client.get, "pod", pods[0].name)
    assert [p.name for p in one.pods] == [pods[0].name]
    assert [s.name for s in (await env.call(env.client.get, "svc")).services] == ["web"]
    assert [t.service for t in (await env.call(env.client.get, "endpoints")).endpoints] == ["web"]
    nodes = (await env.call(env.client.get, "nodes")).nodes
    assert [(n.name, n.pods, n.allocated.cpu_millis) for n in nodes] == [("n1", 2, 200)]


@pytest.mark.parametrize("kind", ["deployments", "services", "pods", "endpoints", "nodes"])
async def test_get_a_missing_name_is_not_found(env: Env, kind: str) -> None:
    with pytest.raises(NotFound, match="nope"):
        await env.call(env.client.get, kind, "nope")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await env.control.Get(control_pb2.GetRequest(kind=kind, name="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_get_unknown_kind_is_rejected(env: Env) -> None:
    with pytest.raises(RequestRejected, match="unknown resource type"):
        await env.call(env.client.get, "widgets")


# -- writes ---------------------------------------------------------------------------


async def test_delete_deployment_removes_its_replicas(env: Env) -> None:
    await with_node(env)
    await env.call(env.client.apply, [("d.yaml", deployment_yaml(replicas=3)), ("s.yaml", SERVICE)])
    await env.settle()
    assert len(env.store.state.list("replicas")) == 3
    resp = await env.call(env.client.delete, "deployment", "web")
    assert (resp.kind, resp.name) == ("deployments", "web")
    assert env.store.state.list("replicas") == []
    assert env.store.state.get("deployments", "web") is None
    await env.settle()  # and the controller agrees: nothing comes back
    assert env.store.state.list("replicas") == []

    await env.call(env.client.delete, "svc", "web")
    assert env.store.state.get("tables", "web") is None
    with pytest.raises(NotFound):
        await env.call(env.client.delete, "deployment", "web")
    with pytest.raises(RequestRejected, match="only deployments and services"):
        await env.call(env.client.delete, "pods", "x")


async def test_scale(env: Env) -> None:
    await env.call(env.client.apply, [("d.yaml", deployment_yaml(replicas=3))])
    with pytest.raises(RequestRejected, match="0 or more"):
        await env.call(env.client.scale, "web", -1)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await env.control.Scale(control_pb2.ScaleRequest(deployment="web", replicas=-1))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(NotFound):
        await env.call(env.client.scale, "nope", 1)
    resp = await env.call(env.client.scale, "web", 5)
    assert (resp.deployment, resp.replicas) == ("web", 5)
    rec = env.store.state.get("deployments", "web")
    assert rec is not None
    assert rec["manifest"]["spec"]["replicas"] == 5
    assert (rec["generation"], rec["template_generation"]) == (2, 1)


# -- events ------------------------------------------------------------------------


async def test_watch_events_without_follow_returns_what_is_there(env: Env) -> None:
    await env.call(env.client.apply, [("d.yaml", deployment_yaml()), ("s.yaml", SERVICE)])
    events = await env.call(lambda: list(env.client.events()))
    assert [(e.seq, e.reason, e.object) for e in events] == [(1, "Created", "deployment/web"), (2, "Created", "service/web")]
    since = await env.call(lambda: list(env.client.events(since=1)))
    assert [e.seq for e in since] == [2]
    only = await env.call(lambda: list(env.client.events(obj="service/web")))
    assert [e.object for e in only] == ["service/web"]


async def test_watch_events_follow_streams_new_events(env: Env) -> None:
    call = env.control.WatchEvents(control_pb2.WatchEventsRequest(follow=True))
    await env.call(env.client.apply, [("s.yaml", SERVICE)])
    first = await asyncio.wait_for(call.read(), 5.0)
    assert (first.reason, first.object) == ("Created", "service/web")
    await env.call(env.client.apply, [("d.yaml", deployment_yaml())])
    second = await asyncio.wait_for(call.read(), 5.0)
    assert (second.seq, second.object) == (2, "deployment/web")
    call.cancel()


# -- errors at the edge --------------------------------------------------------------


def _error_classes() -> set[type[ShoalError]]:
    return {
        obj
        for _, obj in inspect.getmembers(shoal.errors, inspect.isclass)
        if issubclass(obj, ShoalError) and obj is not ShoalError and obj.__module__ == shoal.errors.__name__
    }


# Every error shoal.errors defines, and the code a client sees. A new error fails
# `test_every_error_has_a_status` until it is added here (with a deliberate choice).
EXPECTED_STATUS = {
    shoal.errors.ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    shoal.errors.ManifestError: grpc.StatusCode.INVALID_ARGUMENT,
    shoal.errors.NotFound: grpc.StatusCode.NOT_FOUND,
    shoal.errors.Conflict: grpc.StatusCode.FAILED_PRECONDITION,
    shoal.errors.Unschedulable: grpc.StatusCode.RESOURCE_EXHAUSTED,
    shoal.errors.RuntimeDriverError: grpc.StatusCode.UNAVAILABLE,
    shoal.errors.ImageNotFound: grpc.StatusCode.UNAVAILABLE,
    shoal.errors.RuntimeUnavailable: grpc.StatusCode.UNAVAILABLE,
    shoal.errors.HostPortInUse: grpc.StatusCode.UNAVAILABLE,
    shoal.errors.StoreError: grpc.StatusCode.UNAVAILABLE,
    shoal.errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def test_every_error_has_a_status() -> None:
    classes = _error_classes()
    assert classes == set(EXPECTED_STATUS), "add the new error to EXPECTED_STATUS (and to api._STATUS if needed)"
    for cls in sorted(classes, key=lambda c: c.__name__):
        exc = cls.__new__(cls)  # status_for looks at the type only
        code = status_for(exc)
        assert code is not grpc.StatusCode.UNKNOWN, f"{cls.__name__} has no gRPC status"
        assert code is EXPECTED_STATUS[cls], cls.__name__


def test_every_error_is_exported() -> None:
    assert {c.__name__ for c in _error_classes()} <= set(shoal.errors.__all__)


async def test_an_unexpected_failure_is_internal_with_a_sentence(env: Env) -> None:
    async def broken(txn: Txn) -> int:
        raise RuntimeError("disk on fire")

    env.store.commit = broken  # type: ignore[method-assign]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await env.control.Apply(control_pb2.ApplyRequest(documents=[control_pb2.Document(source="s.yaml", content=SERVICE)]))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    details = info.value.details() or ""
    assert "Traceback" not in details and "\n" not in details


# -- the Agent service ----------------------------------------------------------------


def hello(node: str = "n1") -> agent_pb2.AgentMessage:
    return agent_pb2.AgentMessage(hello=agent_pb2.Hello(
        node=node, address="127.0.0.1", role="server",
        capacity=types_pb2.Resources(cpu_millis=4000, memory_bytes=8 << 30)))


class AgentStream:
    """One agent's Watch stream, with a queue for what the agent sends."""

    def __init__(self, env: Env) -> None:
        self.outbox: asyncio.Queue[agent_pb2.AgentMessage | None] = asyncio.Queue()
        self.call = env.agent.Watch(self._messages())

    async def _messages(self) -> AsyncIterator[agent_pb2.AgentMessage]:
        while (msg := await self.outbox.get()) is not None:
            yield msg

    async def read(self, body: str) -> Any:
        while True:
            msg = await asyncio.wait_for(self.call.read(), 5.0)
            assert msg is not grpc.aio.EOF
            if msg.WhichOneof("body") == body:
                return getattr(msg, body)

    def close(self) -> None:
        self.outbox.put_nowait(None)


def node_status(env: Env, node: str = "n1") -> str | None:
    raw = env.store.state.get("nodes", node)
    return raw["status"] if raw else None


async def test_agent_stream_registers_assigns_and_records_reports(env: Env) -> None:
    stream = AgentStream(env)
    stream.outbox.put_nowait(hello())
    first = await stream.read("assignments")
    assert list(first.assignments) == []
    assert node_status(env) == "Ready"

    await env.call(env.client.apply, [("d.yaml", deployment_yaml(replicas=2)), ("s.yaml", SERVICE)])
    await env.settle()
    assigned = await stream.read("assignments")
    while len(assigned.assignments) < 2:
        assigned = await stream.read("assignments")
    a = assigned.assignments[0]
    assert (a.deployment, a.spec.image, a.spec.container_port, a.spec.driver) == ("web", "img:1", 8080, "docker")
    assert a.host_port > 0

    report = agent_pb2.StatusReport(replicas=[agent_pb2.ReplicaStatus(
        replica_id=a.replica_id, generation=a.generation, state="running", ready=True, handle="c1", started_at=NOW)])
    stream.outbox.put_nowait(agent_pb2.AgentMessage(status=report))
    await eventually(lambda: (env.store.state.get("replicas", a.replica_id) or {}).get("ready"), 5.0,
                     what="the report to be recorded")
    await env.settle()
    tables = await stream.read("tables")
    while not any(t.endpoints for t in tables.tables):
        tables = await stream.read("tables")
    assert [e.pod for e in tables.tables[0].endpoints] == [a.replica_id]

    stream.close()
    await eventually(lambda: node_status(env) == "NotReady", 5.0, what="the node to turn NotReady")


async def test_agent_stream_must_start_with_hello(env: Env) -> None:
    stream = AgentStream(env)
    stream.outbox.put_nowait(agent_pb2.AgentMessage(status=agent_pb2.StatusReport()))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stream.read("assignments")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_an_old_stream_ending_does_not_mark_a_reconnected_node_not_ready(env: Env) -> None:
    old = AgentStream(env)
    old.outbox.put_nowait(hello())
    await old.read("assignments")
    new = AgentStream(env)  # the agent reconnected before the server noticed the old one died
    new.outbox.put_nowait(hello())
    await new.read("assignments")
    old.close()
    while await asyncio.wait_for(old.call.read(), 5.0) is not grpc.aio.EOF:
        pass  # the status comes after every message
    assert await asyncio.wait_for(old.call.code(), 5.0) == grpc.StatusCode.OK
    # The handler logs this in its clean-up, right before recording the node's status.
    await eventually(lambda: env.log.events.count("dispatcher.agent_disconnected") == 1, 5.0,
                     what="the old stream's handler to finish")
    assert node_status(env) == "Ready"
    new.close()
    await eventually(lambda: node_status(env) == "NotReady", 5.0, what="the node to turn NotReady")


def test_apply_report_is_fenced_and_writes_only_changes() -> None:
    state = ClusterState()
    rec = ReplicaRecord(id="web-a", deployment="web", generation=1, node="n1", host_port=20000,
                        phase=int(Phase.ASSIGNED))
    state.apply(Txn(ops=(Put(kind="replicas", name=rec.id, value=rec.to_dict()),)))
    status = agent_pb2.ReplicaStatus(replica_id="web-a", generation=1, state="running", ready=True, handle="c1")
    report = agent_pb2.StatusReport(replicas=[status, agent_pb2.ReplicaStatus(replica_id="unknown", state="running")])

    assert not apply_report(state, "n2", report, NOW), "another node cannot report on n1's replica"
    txn = apply_report(state, "n1", report, NOW)
    assert [op.name for op in txn.ops] == ["web-a"]
    state.apply(txn)
    got = ReplicaRecord.from_dict(state.get("replicas", "web-a") or {})
    assert (got.phase, got.ready, got.handle) == (Phase.RUNNING, True, "c1")
    assert not apply_report(state, "n1", report, NOW), "an unchanged report writes nothing"

    exited = agent_pb2.StatusReport(replicas=[agent_pb2.ReplicaStatus(
        replica_id="web-a", state="exited", ready=True, exit_code=3, restarts=1)])
    state.apply(apply_report(state, "n1", exited, NOW))
    got = ReplicaRecord.from_dict(state.get("replicas", "web-a") or {})
    assert (got.phase, got.ready, got.exit_code, got.restarts) == (Phase.FAILED, False, 3, 1)


# -- nodes ----------------------------------------------------------------------------


async def test_cordon_drain_and_uncordon_a_node(env: Env) -> None:
    await with_node(env)
    resp = await env.call(env.client.cordon, "n1")
    assert resp.node == "n1" and resp.replicas == 0
    node = (await env.call(env.client.get, "nodes", "n1")).nodes[0]
    assert node.cordoned and not node.draining
    await env.call(env.client.cordon, "n1", drain=True)
    node = (await env.call(env.client.get, "nodes", "n1")).nodes[0]
    assert node.cordoned and node.draining
    await env.call(env.client.cordon, "n1", cordon=False)
    node = (await env.call(env.client.get, "nodes", "n1")).nodes[0]
    assert not node.cordoned and not node.draining
    reasons = [e["reason"] for e in env.store.state.events]
    assert reasons[-3:] == ["Cordoned", "Drained", "Uncordoned"]


async def test_cordon_of_an_unknown_node_or_drain_without_cordon_is_refused(env: Env) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await env.control.Cordon(control_pb2.CordonRequest(node="nosuch", cordon=True))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    await with_node(env)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await env.control.Cordon(control_pb2.CordonRequest(node="n1", cordon=False, drain=True))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- plan -----------------------------------------------------------------------------


async def test_plan_shows_placements_and_what_does_not_fit_and_writes_nothing(env: Env) -> None:
    await with_node(env)
    revision = env.store.state.revision
    resp = await env.call(env.client.plan, [("d.yaml", deployment_yaml(replicas=2))])
    assert [(o.kind, o.action) for o in resp.objects] == [("Deployment", "created")]
    assert len(resp.placements) == 2 and {p.node for p in resp.placements} == {"n1"}
    assert not resp.unplaced
    assert env.store.state.revision == revision, "a plan writes nothing"
    assert env.store.state.list("deployments") == []

    huge = deployment_yaml(replicas=3).replace("        image:", "        resources: {requests: {memory: 6Gi}}\n        image:", 1)
    resp = await env.call(env.client.plan, [("d.yaml", huge)])
    assert [p.node for p in resp.placements] == ["n1"]
    (u,) = resp.unplaced
    assert u.placed == 1 and "memory" in u.reason


@pytest.mark.parametrize(("spread_hosts", "hosts"), [(3, 2), (1, 1)])
async def test_plan_places_with_the_servers_scheduler_settings(env: Env, spread_hosts: int, hosts: int) -> None:
    """Two replicas, two roomy nodes: the default keeps them apart, spread_hosts=1 packs
    them; the plan shows what this server's scheduler would do, settings included."""
    await with_node(env, "n1")
    await with_node(env, "n2")
    env.controller._scheduler = Scheduler(SchedulerConfig(spread_hosts=spread_hosts), random.Random(1))
    resp = await env.call(env.client.plan, [("d.yaml", deployment_yaml(replicas=2))])
    assert len(resp.placements) == 2 and len({p.node for p in resp.placements}) == hosts


async def test_a_status_report_records_the_hosts_usage_once_it_changes(env: Env) -> None:
    from shoal.leader.dispatcher import apply_report
    from shoal.v1 import agent_pb2, types_pb2

    await with_node(env)
    usage = types_pb2.Usage(cpu_percent=35.0, memory_used_bytes=3 << 30, disk_used_bytes=10 << 30, disk_total_bytes=100 << 30)
    txn = apply_report(env.store.state, "n1", agent_pb2.StatusReport(usage=usage), NOW)
    await env.store.commit(txn)
    node = (await env.call(env.client.get, "nodes", "n1")).nodes[0]
    assert node.usage == usage
    assert not apply_report(env.store.state, "n1", agent_pb2.StatusReport(usage=usage), NOW), "unchanged: no write"
