"""Start an agent: the process behind `shoal agent`.

A server agent (`--dev` or `--server`) holds a replica of the cluster state (Raft, see
`shoal.leader.server`) and serves the gRPC API (`Control`, `Agent`, `Raft`, health,
reflection) on its gRPC port; the leader among the servers runs the control loop. Every
agent, servers included, runs the agent side: it opens the watch stream to the leader
(over real gRPC, itself included), runs what it is assigned and proxies service ports.

Everything the process holds hangs off one `AgentProcess`, built from one `AgentConfig`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import random
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import grpc
import psutil
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import shoal
from shoal.agent.agent import AgentIdentity, AgentShell
from shoal.agent.client_api import ClientControl
from shoal.table_feed import TableFeed
from shoal.agent.gossip import GossipConfig, GossipShell
from shoal.agent.metrics import DEFAULT_METRICS_PORT, AgentMetrics, ReplicaUsage
from shoal.agent.swim.config import Config as SwimConfig
from shoal.agent.dataplane import KernelDataPlane
from shoal.agent.proxy import ProxyConfig, ServiceProxy
from shoal.agent.reconciler import Reconciler
from shoal.agent.runtime.base import Observed, Runtime
from shoal.agent.runtime.process import ProcessRuntime
from shoal.errors import ConfigError, NotFound, ShoalError, Unavailable
from shoal.metadata import FORWARDED
from shoal.model import Driver, Resources
from shoal.v1 import control_pb2, control_pb2_grpc, types_pb2

if TYPE_CHECKING:
    # Server-only (Raft, the replicated store and SQLite, the controllers, reflection):
    # imported where a server starts, so a client agent never loads them (T9).
    from shoal.leader.records import ReplicaRecord
    from shoal.leader.replicated import RaftStore
    from shoal.leader.server import PeerServer, ServerRole
    from shoal.leader.state import ClusterState, NewEvent, Txn
    from shoal.leader.store import Store

__all__ = ["AgentConfig", "AgentProcess", "default_data_dir", "run"]

DEFAULT_GRPC_PORT = 7420
DEFAULT_GOSSIP_PORT = 7421
STOP_TIMEOUT = 15.0  # seconds a graceful stop may take before the agent exits regardless


def default_data_dir(dev: bool) -> pathlib.Path:
    """Per-user: $XDG_DATA_HOME/shoal (dev: .../shoal/dev), so a dev agent keeps its state."""
    base = pathlib.Path(os.environ.get("XDG_DATA_HOME") or pathlib.Path.home() / ".local" / "share") / "shoal"
    return base / "dev" if dev else base


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    """What `shoal agent` was asked to do. Ports are TCP; addresses are IPs or names."""

    dev: bool = False
    server: bool = False
    bind: str = "127.0.0.1"
    advertise: str = ""  # defaults to bind; required when bind is a wildcard (except --dev)
    grpc_port: int = DEFAULT_GRPC_PORT
    gossip_port: int = DEFAULT_GOSSIP_PORT  # UDP and TCP
    metrics_port: int = DEFAULT_METRICS_PORT  # Prometheus /metrics over HTTP; 0: off
    join: tuple[str, ...] = ()  # gossip seeds: any agent already in the cluster, HOST[:PORT]
    # Servers to wait for before bootstrapping a new cluster (0: --server alone bootstraps
    # a cluster of one without --join, and joins the existing cluster with it).
    bootstrap_expect: int = 0
    data_dir: pathlib.Path | None = None
    node_name: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    # Service ports listen on every address of a real host (like Swarm's routing mesh,
    # so `curl 127.0.0.1:80` works there too) and on loopback only in --dev.
    proxy_bind: str = ""
    drivers: tuple[str, ...] = ("docker", "process")
    # Placement settings of a server's scheduler (see shoal.leader.scheduler.SchedulerConfig).
    scheduler_sample_size: int = 16
    scheduler_sample_threshold: int = 256
    scheduler_spread_hosts: int = 3
    seed: int | None = None  # fixes replica names and tie-breaks (tests)
    # Held back from scheduling so the host, the agent and its runtime keep room.
    reserve: Resources = field(default_factory=lambda: Resources(cpu_millis=100, memory_bytes=256 * 1024 * 1024))

    def validate(self) -> None:
        if not (self.dev or self.server or self.join):
            raise ConfigError("an agent needs --dev, --server, or --join SERVER to find a server")
        if not 0 < self.grpc_port < 65536:
            raise ConfigError(f"--grpc-port must be between 1 and 65535, got {self.grpc_port}")
        for d in self.drivers:
            if d not in ("docker", "process"):
                raise ConfigError(f'unknown driver "{d}"; use docker or process')
        # A wildcard bind says nothing about where other hosts reach this one; falling
        # back to 127.0.0.1 would register the node (and its endpoints) at loopback, and
        # other hosts' proxies would forward to their own loopback instead.
        if not 0 <= self.metrics_port < 65536:
            raise ConfigError(f"--metrics-port must be between 0 (off) and 65535, got {self.metrics_port}")
        if not 0 <= self.gossip_port < 65536:
            raise ConfigError(f"--gossip-port must be between 1 and 65535, got {self.gossip_port}")
        if self.scheduler_sample_size < 1:
            raise ConfigError(f"--scheduler-sample-size must be at least 1, got {self.scheduler_sample_size}")
        if self.scheduler_sample_threshold < 0:
            raise ConfigError(f"--scheduler-sample-threshold must be 0 or more, got {self.scheduler_sample_threshold}")
        if self.scheduler_spread_hosts < 1:
            raise ConfigError(f"--scheduler-spread-hosts must be at least 1, got {self.scheduler_spread_hosts}")
        if self.bootstrap_expect and not self.server:
            raise ConfigError("--bootstrap-expect is for servers: add --server")
        if self.bootstrap_expect < 0 or self.bootstrap_expect > 9:
            raise ConfigError(f"--bootstrap-expect must be between 1 and 9 (servers), got {self.bootstrap_expect}")
        if not self.dev and not self.advertise and self.bind in ("0.0.0.0", "::", ""):
            raise ConfigError(
                f"--bind {self.bind or '0.0.0.0'} listens on every address, but other hosts need one "
                "to reach this one: give --advertise ADDR (this host's IP)"
            )

    @property
    def is_server(self) -> bool:
        return self.dev or self.server

    @property
    def expect(self) -> int:
        """How many servers form the first cluster (0: only join an existing one)."""
        if self.dev:
            return 1
        if self.bootstrap_expect:
            return self.bootstrap_expect
        return 0 if self.join else 1

    @property
    def advertise_address(self) -> str:
        if self.advertise:
            return self.advertise
        return "127.0.0.1" if self.bind in ("0.0.0.0", "") else self.bind

    def resolved_data_dir(self) -> pathlib.Path:
        return self.data_dir or default_data_dir(self.dev)


def host_usage(data_dir: pathlib.Path) -> types_pb2.Usage:
    """This host's resource use now, rounded (CPU to 5 %, memory and disk to 64 MiB) so a
    report changes the cluster state only when the use really moved."""
    step = 64 * 1024 * 1024
    disk = psutil.disk_usage(str(data_dir))
    return types_pb2.Usage(
        cpu_percent=round(psutil.cpu_percent(interval=None) / 5) * 5.0,
        memory_used_bytes=psutil.virtual_memory().used // step * step,
        disk_used_bytes=disk.used // step * step,
        disk_total_bytes=disk.total // step * step,
    )


def _listen(server: grpc.aio.Server, address: str) -> None:
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen on {address} for gRPC: {exc}") from exc
    if port == 0:
        raise ConfigError(f"cannot listen on {address} for gRPC: the address is in use or not local")


def _capacity(reserve: Resources) -> Resources:
    cpu = (psutil.cpu_count() or 1) * 1000
    mem = psutil.virtual_memory().total
    return Resources(
        cpu_millis=max(0, cpu - (reserve.cpu_millis or 0)),
        memory_bytes=max(0, mem - (reserve.memory_bytes or 0)),
    )


class AgentProcess:
    """Everything one agent process runs, started and stopped together."""

    def __init__(self, config: AgentConfig, logger: Any = None) -> None:
        config.validate()
        self.config = config
        self.log = logger or structlog.get_logger("shoal")
        self.data_dir = config.resolved_data_dir()
        self.node_name = config.node_name or socket.gethostname()
        self.rng = random.Random(config.seed)
        self.server: grpc.aio.Server | None = None
        self.role: ServerRole | None = None
        self.metrics = AgentMetrics(self.data_dir)
        self._meta: dict[str, str] = {}
        self._server_turn = -1
        self.shell: AgentShell | None = None
        # The tables the shell receives, served by the Control API (WatchTable), which starts first.
        self.table_feed = TableFeed()
        self.gossip: GossipShell | None = None
        self.runtimes: dict[Driver, Runtime] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self.ready = asyncio.Event()

    @property
    def grpc_target(self) -> str:
        return f"{self.config.advertise_address}:{self.config.grpc_port}"

    async def start(self) -> None:
        cfg = self.config
        self.data_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        await self._start_gossip()
        if cfg.is_server:
            await self._start_server()
        else:
            await self._start_client_api()
        await self._start_agent()
        self.ready.set()
        self.log.info(
            "agent.ready",
            node=self.node_name,
            grpc=f"{cfg.bind}:{cfg.grpc_port}" if cfg.is_server else "",
            server=cfg.is_server,
            data_dir=str(self.data_dir),
            seconds=round(time.monotonic() - started, 3),
        )

    async def _start_gossip(self) -> None:
        cfg = self.config
        meta = {"role": "server" if cfg.is_server else "client", "version": shoal.__version__}
        if cfg.is_server:
            meta["grpc"] = f"{cfg.advertise_address}:{cfg.grpc_port}"
        gcfg = GossipConfig(
            name=self.node_name,
            bind=cfg.bind if cfg.bind not in ("", "::") else "0.0.0.0",
            port=cfg.gossip_port,
            advertise=cfg.advertise_address,
            meta=meta,
            swim=SwimConfig.local() if cfg.dev else SwimConfig.lan(),
        )
        self._meta = dict(meta)
        self.gossip = GossipShell(gcfg, rng=random.Random(self.rng.random()))
        await self.gossip.start()
        if cfg.join:
            # Returns at once; the shell keeps retrying in the background with back-off.
            await self.gossip.join(list(cfg.join), timeout=0.0)

    def _server_address(self) -> str | None:
        """A server's API address from the gossip view (client agents)."""
        if self.gossip is None:
            return None
        servers = sorted(
            (m for m in self.gossip.members() if m.live and m.meta_get("role") == "server" and m.meta_get("grpc")),
            key=lambda m: m.name,
        )
        if not servers:
            return None
        # Round robin over the live servers: one that is dark but not yet declared dead
        # costs one short connection attempt, not every attempt (a follower answers
        # with the leader's address, so any server is a good start).
        self._server_turn += 1
        return servers[self._server_turn % len(servers)].meta_get("grpc")

    def _peer_servers(self) -> list[PeerServer]:
        """Servers in the gossip view that announce a Raft identity."""
        from shoal.leader.server import PeerServer

        if self.gossip is None:
            return []
        out = []
        for m in self.gossip.members():
            if m.meta_get("role") != "server" or m.name == self.node_name:
                continue
            try:
                out.append(PeerServer(name=m.name, id=int(m.meta_get("raft_id") or 0), address=m.meta_get("grpc") or "",
                                      cluster=m.meta_get("cluster") or "", expect=int(m.meta_get("expect") or 0),
                                      live=m.live))
            except ValueError:
                continue
        return [p for p in out if p.id > 0 and p.address]

    def _publish(self, extra: dict[str, str]) -> None:
        self._meta.update(extra)
        if self.gossip is not None:
            self.gossip.update_meta(self._meta)

    async def _record_membership(self, store: Store) -> None:
        """Membership changes become cluster events (and a dead host's node goes Down)."""
        from shoal.leader.state import NewEvent

        assert self.gossip is not None
        queue = self.gossip.subscribe()
        # Members that died before this server started leading (around a leader change)
        # produced their events under the old leader, or under none: mark them now.
        for m in self.gossip.members():
            if m.state.value in ("dead", "left"):
                event = NewEvent(time=time.time(), type="Warning", reason="MemberDead", object=f"node/{m.name}",
                                 message=f"gossip: {m.name} was already {m.state.value} when this server started leading")
                await self._record_member(store, m.name, event, down=True, only_if_down=True)
        reasons = {"join": ("Normal", "MemberJoined"), "dead": ("Warning", "MemberDead"),
                   "leave": ("Normal", "MemberLeft"), "suspect": ("Warning", "MemberSuspect"),
                   "alive": ("Normal", "MemberAlive")}
        while True:
            ev = await queue.get()
            kind = ev.kind.value
            if kind not in reasons:
                continue
            type_, reason = reasons[kind]
            m = ev.member
            event = NewEvent(
                time=time.time(), type=type_, reason=reason, object=f"node/{m.name}",
                message=f"gossip: {m.name} at {m.address[0]}:{m.address[1]} is {m.state.value} (incarnation {m.incarnation})")
            await self._record_member(store, m.name, event, down=kind in ("dead", "leave"))

    async def _record_member(self, store: Store, name: str, event: NewEvent, *, down: bool,
                             only_if_down: bool = False) -> None:
        """Record a membership event; with `down`, the node goes Down (since the event's
        time) unless it already is. `only_if_down`: nothing at all if it already was."""
        from shoal.leader.state import Put, Txn

        def build(state: ClusterState) -> Txn:
            raw = state.get("nodes", name)
            ops: tuple[Put, ...] = ()
            if down and raw is not None and raw.get("status") != "Down":
                ops = (Put(kind="nodes", name=name, value=dict(raw, status="Down", down_since=event.time)),)
            if only_if_down and not ops:
                return Txn()
            return Txn(ops=ops, events=(event,))

        try:
            await store.update(build)
        except ShoalError as exc:
            self.log.warning("agent.membership_not_recorded", member=name, error=str(exc))

    def members(self) -> list[Any]:
        if self.gossip is None:
            return []
        out = []
        for m in sorted(self.gossip.members(), key=lambda m: m.name):
            ago = self.gossip.heard_ago(m.name)
            out.append(control_pb2.Member(
                name=m.name, address=f"{m.address[0]}:{m.address[1]}", role=m.meta_get("role") or "",
                state=m.state.value, incarnation=m.incarnation, heard_ago=-1.0 if ago is None else ago,
                grpc=m.meta_get("grpc") or "", version=m.meta_get("version") or ""))
        return out

    async def _start_server(self) -> None:
        from grpc_reflection.v1alpha import reflection

        from shoal.leader.api import ControlService
        from shoal.leader.controller import Controller
        from shoal.leader.dispatcher import AgentService
        from shoal.leader.leader import ControlLoop
        from shoal.leader.raft_transport import SERVER_OPTIONS
        from shoal.leader.scheduler import Scheduler, SchedulerConfig
        from shoal.leader.server import ServerConfig, ServerRole
        from shoal.v1 import agent_pb2, agent_pb2_grpc, raft_pb2

        cfg = self.config
        placement = SchedulerConfig(
            sample_size=cfg.scheduler_sample_size,
            sample_threshold=cfg.scheduler_sample_threshold,
            # A sample may probe 4 nodes per slot before falling back to a full scan.
            sample_probes=4 * cfg.scheduler_sample_size,
            spread_hosts=cfg.scheduler_spread_hosts,
        )
        placement.validate()
        controller = Controller(Scheduler(placement, random.Random(self.rng.random())), random.Random(self.rng.random()))

        async def control_loop(store: RaftStore) -> None:
            await ControlLoop(store, controller).run()

        self.role = role = ServerRole(
            ServerConfig(data_dir=self.data_dir, address=self.grpc_target, node_name=self.node_name,
                         bootstrap_expect=cfg.expect),
            peers=self._peer_servers,
            publish=self._publish,
            duties=(control_loop, self._record_membership),
            rng=random.Random(self.rng.random()),
        )
        store = role.handle
        # The Raft service's options: large messages, and the peers' and agents' keepalive
        # pings accepted (gRPC's default answers frequent pings with GOAWAY).
        server = grpc.aio.server(options=SERVER_OPTIONS)
        control_pb2_grpc.add_ControlServicer_to_server(
            ControlService(store, controller, log_source=self._logs, members=self.members, cluster=role,
                           tables=self.table_feed), server
        )
        agent_pb2_grpc.add_AgentServicer_to_server(
            AgentService(store, controller, term=lambda: role.store.term if role.store else 0, cluster=role), server)
        role.add_to_server(server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        names = (
            control_pb2.DESCRIPTOR.services_by_name["Control"].full_name,
            agent_pb2.DESCRIPTOR.services_by_name["Agent"].full_name,
            raft_pb2.DESCRIPTOR.services_by_name["Raft"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, server)
        _listen(server, f"{cfg.bind}:{cfg.grpc_port}")
        for name in ("", *names[:3]):  # grpc's health servicer starts "" as SERVING
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self.server = server
        await role.start()

        async def serving() -> None:
            # SERVING once this server holds a replica of the state and a leader is known
            # (a cluster of one, as in --dev: once it leads), so "healthy" means "takes
            # requests".
            await role.handle.wait_ready()
            store = role.store
            assert store is not None
            await store.wait_for(lambda: store.leader_id != 0)
            for name in (*names[:3], ""):  # the whole server last: it is what callers wait on
                await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

        if cfg.expect == 1 and role.store is not None:
            await asyncio.wait_for(serving(), timeout=10.0)
        else:
            self._tasks.append(asyncio.create_task(serving(), name="health"))

    def _make_runtimes(self) -> dict[Driver, Runtime]:
        runtimes: dict[Driver, Runtime] = {}
        if "process" in self.config.drivers:
            runtimes[Driver.PROCESS] = ProcessRuntime(self.node_name, self.data_dir / "processes")
        if "docker" in self.config.drivers:
            try:
                from shoal.agent.runtime.docker import DockerRuntime

                runtimes[Driver.DOCKER] = DockerRuntime(self.node_name)
            except ShoalError as exc:
                self.log.warning("agent.docker_unavailable", error=str(exc))
        return runtimes

    async def _start_agent(self) -> None:
        cfg = self.config
        self.runtimes = self._make_runtimes()
        reconciler = Reconciler(self.runtimes)
        shell_ref: list[AgentShell] = []

        def on_event(type_: str, reason: str, obj: str, message: str) -> None:
            if shell_ref:
                shell_ref[0].record_event(type_, reason, obj, message)

        proxy_bind = cfg.proxy_bind or (cfg.bind if cfg.dev else "0.0.0.0")
        # Started before any table arrives: it removes what a crashed agent left in the kernel.
        dataplane = KernelDataPlane(bind_host=proxy_bind, on_event=on_event)
        await dataplane.start()
        proxy = ServiceProxy(ProxyConfig(bind_host=proxy_bind), rng=random.Random(self.rng.random()), on_event=on_event,
                             metrics=self.metrics, dataplane=dataplane)
        identity = AgentIdentity(
            node=self.node_name,
            address=cfg.advertise_address,
            role="server" if cfg.is_server else "client",
            capacity=_capacity(cfg.reserve),
            labels=cfg.labels,
            version=shoal.__version__,
            metrics_port=cfg.metrics_port,
            grpc_port=cfg.grpc_port,
        )
        leader: Callable[[], str | None] = self._server_address
        if self.role is not None:
            role = self.role
            leader = lambda: role.leader_address() or self._server_address()  # noqa: E731
        data_dir = self.data_dir
        self.shell = AgentShell(identity, leader, reconciler, proxy, usage=lambda: host_usage(data_dir),
                                table_feed=self.table_feed)
        shell_ref.append(self.shell)
        self._tasks.append(asyncio.create_task(self.shell.run(), name="agent-shell"))
        await self._start_metrics()

    async def _start_metrics(self) -> None:
        cfg = self.config
        m = self.metrics
        shell = self.shell
        assert shell is not None

        def replicas() -> list[tuple[tuple[str, ...], float]]:
            counts: dict[str, int] = {}
            for v in shell.reconciler.views({rid: True for rid in shell.ready}):
                state = "ready" if v.ready else v.state
                counts[state] = counts.get(state, 0) + 1
            return [((k,), float(n)) for k, n in sorted(counts.items())]

        m.add_gauges("shoal_replicas", "Replicas this agent runs, by state (ready, running, starting, exited, failed).",
                     ("state",), replicas)

        def replica_usage() -> list[ReplicaUsage]:
            # What the reconciler last observed running (at most one resync old); a
            # replica gone since then has no cgroup or process left to read, so its
            # series go with it.
            running: dict[Driver, list[Observed]] = {}
            for obs in shell.reconciler.observed.values():
                if obs.running:
                    running.setdefault(obs.driver, []).append(obs)
            rows = []
            for driver, observed in running.items():
                runtime = self.runtimes.get(driver)
                usages = runtime.usages(observed) if runtime is not None else {}
                for o in observed:
                    u = usages.get(o.replica_id)
                    if u is not None:
                        rows.append(ReplicaUsage(deployment=o.deployment, replica=o.replica_id,
                                                 cpu_seconds=u.cpu_seconds, memory_bytes=u.memory_bytes))
            return sorted(rows, key=lambda r: r.replica)

        m.add_replica_usage(replica_usage)

        def members() -> list[tuple[tuple[str, ...], float]]:
            counts: dict[str, int] = {}
            for mem in self.gossip.members() if self.gossip is not None else ():
                counts[mem.state.value] = counts.get(mem.state.value, 0) + 1
            return [((k,), float(n)) for k, n in sorted(counts.items())]

        m.add_gauges("shoal_gossip_members", "Members in this agent's gossip view, by state.", ("state",), members)
        if self.role is not None:
            role = self.role

            def raft() -> list[tuple[tuple[str, ...], float]]:
                store = role.store
                if store is None:
                    return []
                st = store.status()
                return [(("term",), float(st.term)), (("commit",), float(st.commit)),
                        (("applied",), float(store.applied_index)), (("leader",), 1.0 if store.is_leader else 0.0)]

            m.add_gauges("shoal_raft", "This server's Raft state: term, commit and applied index, leader (1 or 0).",
                         ("field",), raft)
        if cfg.metrics_port:
            host = cfg.bind if cfg.bind not in ("", "::") else "0.0.0.0"
            await m.serve(host, cfg.metrics_port)

    async def _logs(self, replica: ReplicaRecord, follow: bool, tail: int) -> Any:
        """A pod's output: from this host's runtime, or relayed from the agent that runs it."""
        if replica.node == self.node_name:
            async for chunk in self._local_logs(replica.id, follow, tail):
                yield chunk
            return
        raw = self.role.handle.state.get("nodes", replica.node) if self.role is not None else None
        if raw is None or not raw.get("grpc_port"):
            raise NotFound(f"agent of node {replica.node or '(none)'} for pod", replica.id)
        target = f"{raw['address']}:{raw['grpc_port']}"
        async with grpc.aio.insecure_channel(target) as ch:
            call = control_pb2_grpc.ControlStub(ch).Logs(
                control_pb2.LogsRequest(pod=replica.id, follow=follow, tail=tail), metadata=((FORWARDED, "1"),))
            try:
                async for chunk in call:
                    yield chunk.data
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    raise NotFound("pod", replica.id) from None
                raise Unavailable(f"cannot read the logs of {replica.id} from {replica.node} ({target}): "
                                  f"{exc.details()}") from None

    async def _local_logs(self, pod: str, follow: bool, tail: int) -> Any:
        for runtime in self.runtimes.values():
            if any(o.replica_id == pod for o in await runtime.list()):
                async for chunk in runtime.logs(pod, follow=follow, tail=tail or None):
                    yield chunk
                return
        raise NotFound("pod on this host", pod)

    async def _start_client_api(self) -> None:
        """A client agent's Control API: local answers, the rest relayed to a server."""
        cfg = self.config
        server = grpc.aio.server()
        control_pb2_grpc.add_ControlServicer_to_server(
            ClientControl(self._server_address, self.members, self._local_logs, tables=self.table_feed), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        _listen(server, f"{cfg.bind}:{cfg.grpc_port}")
        await server.start()
        self.server = server

    async def stop(self) -> None:
        """Stop serving. Replicas keep running; a restarted agent adopts them."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.shell is not None:
            await self.shell.proxy.close()
            if self.shell.proxy.dataplane is not None:
                await self.shell.proxy.dataplane.close()
        for runtime in self.runtimes.values():
            with contextlib.suppress(Exception):
                await runtime.close()
        if self.role is not None:
            # A leader hands over first, so the others need no election timeout.
            with contextlib.suppress(Exception):
                await self.role.close()
        if self.gossip is not None:
            with contextlib.suppress(Exception):
                await self.gossip.leave()
            await self.gossip.close()
        await self.metrics.close()
        if self.server is not None:
            await self.server.stop(grace=1.0)
        self.log.info("agent.stopped", node=self.node_name)

    async def wait(self) -> None:
        await asyncio.gather(*self._tasks)


async def run(config: AgentConfig, *, reload: Callable[[], AgentConfig] | None = None) -> None:
    """Run an agent until SIGINT or SIGTERM; on SIGHUP, reload.

    A reload calls `reload`, which reads the settings again (the same flags over the
    config file as it is now), applies what a running agent can change, and returns the
    `AgentConfig` they make. What is reloaded: the log level (the caller moves it).
    What is not: everything in `AgentConfig` — role, addresses and ports, join seeds,
    bootstrap_expect, data dir, node name, labels, drivers — because each shaped a
    listener, the Raft server or the node's registration when the agent started; a
    change to one is logged (`agent.reload_needs_restart`) and takes a restart, which
    is cheap: replicas keep running and the restarted agent adopts them. The log format
    (`log_json`) also takes a restart. A reload that fails (a broken file) is logged and
    changes nothing: the agent keeps running as it was.
    """
    proc = AgentProcess(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def on_hup() -> None:
        if reload is None:
            proc.log.info("agent.reload_skipped", reason="nothing to reload from")
            return
        try:
            fresh = reload()
        except ShoalError as exc:
            proc.log.error("agent.reload_failed", error=str(exc))
            return
        changed = [f.name for f in fields(AgentConfig) if getattr(fresh, f.name) != getattr(proc.config, f.name)]
        if changed:
            proc.log.warning("agent.reload_needs_restart", changed=changed)
        proc.log.info("agent.reloaded")

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    await proc.start()
    waiter = asyncio.create_task(proc.wait())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    failed = waiter.exception() if waiter.done() else None
    try:
        # A graceful stop (leadership handed over, gossip left) is quick; if something
        # hangs, say what and exit anyway: an agent asked to stop must stop.
        await asyncio.wait_for(proc.stop(), STOP_TIMEOUT)
    except TimeoutError:
        pending = sorted(t.get_name() for t in asyncio.all_tasks() if t is not asyncio.current_task())
        proc.log.error("agent.stop_timed_out", seconds=STOP_TIMEOUT, pending=pending)
    if failed is not None:
        raise failed
