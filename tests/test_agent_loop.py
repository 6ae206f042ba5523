"""Leader and agent shells together, in one process, over real gRPC: the control loop
(leader/leader.py), the dispatcher and the agent shell (agent/agent.py) driving the
reconciler on the fake runtime. No Docker, no child processes."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from shoal.agent.agent import AgentIdentity, AgentShell
from shoal.agent.proxy import ProxyConfig, ServiceProxy
from shoal.agent.reconciler import BackoffConfig, Reconciler
from shoal.agent.runtime.fake import FakeRuntime
from shoal.leader.api import ControlService
from shoal.leader.controller import Controller
from shoal.leader.dispatcher import AgentService
from shoal.leader.leader import ControlLoop
from shoal.leader.records import Phase, ReplicaRecord
from shoal.leader.scheduler import Scheduler, SchedulerConfig
from shoal.leader.store import MemoryStore
from shoal.model import Driver, Resources
from shoal.v1 import agent_pb2_grpc, control_pb2, control_pb2_grpc

from helpers import eventually

# No container port: the default readiness check passes at once, so the fake runtime
# (which listens on nothing) can turn replicas ready.
DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: worker
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: worker}}
  template:
    metadata:
      labels: {{app: worker}}
    spec:
      containers:
      - name: worker
        image: img:1
"""


@dataclass
class Cluster:
    store: MemoryStore
    runtime: FakeRuntime
    shell: AgentShell
    control: control_pb2_grpc.ControlStub

    def replicas(self) -> list[ReplicaRecord]:
        return [ReplicaRecord.from_dict(r) for r in self.store.state.list("replicas")]

    async def apply(self, replicas: int) -> None:
        await self.control.Apply(control_pb2.ApplyRequest(
            documents=[control_pb2.Document(source="worker.yaml", content=DEPLOYMENT.format(replicas=replicas))]))


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    store = MemoryStore()
    controller = Controller(Scheduler(SchedulerConfig(), random.Random(2)), random.Random(2))
    server = grpc.aio.server()
    control_pb2_grpc.add_ControlServicer_to_server(ControlService(store, controller), server)
    agent_pb2_grpc.add_AgentServicer_to_server(AgentService(store, controller), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    runtime = FakeRuntime("n1")
    reconciler = Reconciler({Driver.DOCKER: runtime}, config=BackoffConfig(base=0.05, cap=1.0, reset=30.0))
    proxy = ServiceProxy(ProxyConfig(bind_host="127.0.0.1"))
    identity = AgentIdentity(node="n1", address="127.0.0.1", role="server",
                             capacity=Resources(cpu_millis=4000, memory_bytes=8 << 30))
    shell = AgentShell(identity, f"127.0.0.1:{port}", reconciler, proxy, report_interval=1.0, resync_interval=0.1)
    tasks = [asyncio.create_task(ControlLoop(store, controller, tick=0.2).run()), asyncio.create_task(shell.run())]
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Cluster(store, runtime, shell, control_pb2_grpc.ControlStub(channel))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await proxy.close()
        await channel.close()
        await server.stop(None)


async def test_apply_scale_crash_and_delete_through_the_whole_loop(cluster: Cluster) -> None:
    await cluster.apply(3)

    def all_ready(n: int) -> bool:
        reps = cluster.replicas()
        return len(reps) == n and all(r.ready and r.phase == Phase.RUNNING and r.handle for r in reps)

    await eventually(lambda: all_ready(3), 10.0, what="3 replicas running and ready")
    assert cluster.runtime.running_ids() == {r.id for r in cluster.replicas()}

    victim = cluster.replicas()[0]
    cluster.runtime.crash(victim.id, exit_code=137)

    def restarted() -> bool:
        rec = ReplicaRecord.from_dict(cluster.store.state.get("replicas", victim.id) or {})
        return rec.restarts == 1 and rec.ready and rec.handle != victim.handle

    await eventually(restarted, 10.0, what="the crashed replica restarted and reported")

    await cluster.apply(1)
    await eventually(lambda: all_ready(1) and len(cluster.runtime.running_ids()) == 1, 10.0, what="scaled to 1")

    await cluster.control.Delete(control_pb2.DeleteRequest(kind="deployment", name="worker"))
    await eventually(lambda: not cluster.runtime.replicas and not cluster.replicas(), 10.0, what="everything stopped")
    node = cluster.store.state.get("nodes", "n1")
    assert node is not None and node["status"] == "Ready"
