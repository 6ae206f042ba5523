"""The server role of an agent: the replicated store, how servers form a cluster, and the
work only the leader does.

What a server agent runs, on its one gRPC port: `Control` (any server answers; writes are
forwarded to the leader), `Agent` (only the leader serves assignment streams), and `Raft`
(between servers). This module owns the `RaftStore` behind them and decides when it
exists:

- **Identity.** A server's Raft id is random, created with its data directory and kept in
  `server.json` next to the cluster id it belongs to; a wiped data directory is a new
  server.
- **Forming a cluster.** `--dev` bootstraps a cluster of one at once. `--server
  --bootstrap-expect N` waits until gossip shows N servers started with the same N and
  not yet in a cluster; the N lowest ids bootstrap together (each writes the same initial
  membership), the cluster id being a digest of those ids. A server that sees, in gossip,
  a server already in a cluster joins that cluster instead: it starts empty and asks the
  leader to add it (as a learner; the leader promotes caught-up learners to voters). A
  restarted server rejoins the cluster in its `server.json`.
- **Before the cluster exists** the services answer UNAVAILABLE with the reason (waiting
  for N servers), through `StoreHandle`.
- **Leader duties** (the control loop, recording membership changes, promoting learners)
  run only while this server leads, and only after a read barrier, so a new leader never
  acts on state older than its predecessor's last acknowledged write.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import pathlib
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog

from shoal.errors import ConfigError, ShoalError, Unavailable
from shoal.metadata import FORWARDED, LEADER_HINT
from shoal.leader.raft import Role
from shoal.leader.replicated import RaftStore, RaftStoreConfig
from shoal.leader.state import ClusterState, Txn
from shoal.leader.store import Store
from shoal.v1 import control_pb2, control_pb2_grpc, raft_pb2_grpc

__all__ = ["PeerServer", "ServerConfig", "ServerRole", "StoreHandle",
           "cluster_id_for", "load_identity"]



@dataclass(frozen=True, slots=True)
class PeerServer:
    """A server as seen in gossip."""

    name: str
    id: int
    address: str  # gRPC (API and Raft)
    cluster: str  # "" until it belongs to one
    expect: int  # its --bootstrap-expect (0: none)
    live: bool = True  # alive or suspect in gossip (a dead one is still named)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    data_dir: pathlib.Path
    address: str  # this server's advertised gRPC address
    node_name: str
    bootstrap_expect: int = 0  # 1 for --dev; 0: only ever join an existing cluster
    raft: RaftStoreConfig = field(default_factory=RaftStoreConfig)
    discovery_interval: float = 0.2

    def validate(self) -> None:
        if self.bootstrap_expect < 0:
            raise ConfigError(f"--bootstrap-expect must be ≥ 1, got {self.bootstrap_expect}")
        if self.bootstrap_expect in (2, 4):
            # Not an error (Consul allows it), but a cluster of 2 is less available than
            # one of 1, and 4 than 3: say so where the operator looks.
            structlog.get_logger("shoal.server").warning(
                "server.even_bootstrap_expect", expect=self.bootstrap_expect,
                hint="an even number of servers tolerates no more failures than one fewer")


def load_identity(data_dir: pathlib.Path) -> tuple[int, str]:
    """This server's Raft id and cluster id ("" if none yet), created on first use.

    The id comes from the OS's randomness, never from a seeded generator: two servers
    must not share one, even when tests fix every other random choice."""
    path = data_dir / "server.json"
    if path.exists():
        try:
            raw = json.loads(path.read_text())
            return int(raw["id"]), str(raw.get("cluster", ""))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is damaged ({exc}); move the data directory aside to start as a new server") from exc
    node_id = random.SystemRandom().randrange(1, 2**53)
    save_identity(data_dir, node_id, "")
    return node_id, ""


def save_identity(data_dir: pathlib.Path, node_id: int, cluster: str) -> None:
    path = data_dir / "server.json"
    tmp = path.with_suffix(".tmp")
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w") as f:
        json.dump({"id": node_id, "cluster": cluster}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def cluster_id_for(ids: Sequence[int]) -> str:
    """The id of a cluster bootstrapped by these servers: the same on each of them."""
    digest = hashlib.sha256(",".join(str(i) for i in sorted(ids)).encode()).hexdigest()
    return digest[:16]


class StoreHandle(Store):
    """The store the services use: the `RaftStore` once the cluster exists; before that,
    an empty state and writes refused with the reason."""

    def __init__(self) -> None:
        self._empty = ClusterState()
        super().__init__()
        self.target: RaftStore | None = None
        self.waiting = "this server has not joined a cluster yet"
        self._ready = asyncio.Event()

    @property  # type: ignore[override]
    def state(self) -> ClusterState:
        return self.target.state if self.target is not None else self._empty

    @state.setter
    def state(self, value: ClusterState) -> None:
        self._empty = value

    def set(self, store: RaftStore) -> None:
        self.target = store
        self._ready.set()

    async def wait_ready(self) -> None:
        await self._ready.wait()

    def require(self) -> RaftStore:
        if self.target is None:
            raise Unavailable(self.waiting)
        return self.target

    async def _persist(self, txn: Txn, state_after: ClusterState) -> None:  # pragma: no cover - never called
        raise TypeError("StoreHandle commits through its RaftStore")

    async def commit(self, txn: Txn, **kwargs: Any) -> int:  # type: ignore[override]
        return await self.require().commit(txn, **kwargs)

    async def wait(self, revision: int, timeout: float | None = None) -> int:
        if self.target is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), timeout)
            if self.target is None:
                return self.state.revision
        return await self.target.wait(revision, timeout)

    async def close(self) -> None:
        return None


class ServerRole:
    """The replicated store of one server agent, its cluster formation and leader duties."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        peers: Callable[[], Sequence[PeerServer]],
        publish: Callable[[dict[str, str]], None],
        duties: Sequence[Callable[[RaftStore], Awaitable[None]]] = (),
        rng: random.Random | None = None,
        logger: Any = None,
    ) -> None:
        config.validate()
        self.config = config
        self._peers = peers
        self._publish = publish
        self._duties = list(duties)
        self._rng = rng or random.Random()
        self._log = logger or structlog.get_logger("shoal.server")
        self.handle = StoreHandle()
        self.id, self.cluster = load_identity(config.data_dir)
        self._raft_servicer: _RaftDelegate = _RaftDelegate()
        self._tasks: list[asyncio.Task[None]] = []
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._names: dict[int, str] = {}
        if config.bootstrap_expect > 1:
            self.handle.waiting = (f"waiting for {config.bootstrap_expect} servers started with "
                                   f"--bootstrap-expect {config.bootstrap_expect} to find each other")

    # --- wiring -------------------------------------------------------------------------

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register the Raft service (answering once the store exists)."""
        raft_pb2_grpc.add_RaftServicer_to_server(self._raft_servicer, server)

    @property
    def store(self) -> RaftStore | None:
        return self.handle.target

    def meta(self) -> dict[str, str]:
        """What this server announces in gossip."""
        meta = {"raft_id": str(self.id), "expect": str(self.config.bootstrap_expect)}
        if self.cluster:
            meta["cluster"] = self.cluster
        return meta

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        self._publish(self.meta())
        if self.cluster:
            # A restart: the log (or an empty one, if the first start never got further
            # than being told its cluster) says the rest.
            await self._open(bootstrap_peers=None)
            self._spawn(self._ensure_member(), "server-join")
        elif self.config.bootstrap_expect == 1 and not self._others_in_a_cluster():
            self.cluster = cluster_id_for([self.id])
            await self._open(bootstrap_peers={self.id: self.config.address})
        else:
            self._spawn(self._form(), "server-form")
        self._spawn(self._lead_when_leader(), "server-duties")

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._log.error("server.task_failed", task=task.get_name(), error=repr(task.exception()))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.store is not None:
            await self.store.close(transfer_leadership=True)
        for ch in self._channels.values():
            await ch.close()

    async def _open(self, bootstrap_peers: dict[int, str] | None) -> None:
        save_identity(self.config.data_dir, self.id, self.cluster)
        store = RaftStore(
            node_id=self.id,
            cluster_id=self.cluster,
            peers=bootstrap_peers if bootstrap_peers is not None else {self.id: self.config.address},
            data_dir=self.config.data_dir,
            config=self.config.raft,
            logger=self._log,
            rng=random.Random(self._rng.getrandbits(64)),
            bootstrap=bootstrap_peers is not None,
            external_server=True,
        )
        self._raft_servicer.target = store.raft_servicer()
        await store.start()
        await store.campaign_if_alone()
        self.handle.set(store)
        self._publish(self.meta())
        self._log.info("server.started", id=self.id, cluster=self.cluster,
                       bootstrap=sorted(bootstrap_peers) if bootstrap_peers else [])

    def _others_in_a_cluster(self) -> list[PeerServer]:
        return [p for p in self._peers() if p.live and p.cluster and p.id != self.id]

    async def _form(self) -> None:
        """Wait for a cluster to join or for enough servers to bootstrap one."""
        expect = self.config.bootstrap_expect
        while True:
            existing = self._others_in_a_cluster()
            if existing:
                self.cluster = existing[0].cluster
                await self._open(bootstrap_peers=None)
                self._spawn(self._ensure_member(), "server-join")
                return
            if expect >= 1:
                candidates = {p.id: p for p in self._peers() if p.live and not p.cluster and p.expect == expect}
                candidates[self.id] = PeerServer(self.config.node_name, self.id, self.config.address, "", expect)
                self._log.debug("server.forming", seen=sorted(candidates), expect=expect)
                if len(candidates) >= expect:
                    chosen = sorted(candidates)[:expect]
                    if self.id in chosen:
                        self.cluster = cluster_id_for(chosen)
                        await self._open(bootstrap_peers={i: candidates[i].address for i in chosen})
                        return
            await asyncio.sleep(self.config.discovery_interval)

    async def _ensure_member(self) -> None:
        """Until the log says this server is a member, ask the leader to add it (and to
        update its address after a move)."""
        store = self.store
        assert store is not None
        delay = self.config.discovery_interval
        while True:
            # Until the log names them, gossip says who the members are, so their first
            # messages are accepted and answered (when this server was one of the
            # bootstrap set but saw the others' cluster before it saw all of them, the
            # leader's first appends carry the very membership that includes it).
            store.learn_peers({p.id: p.address for p in self._peers() if p.live and p.cluster == self.cluster})
            if store.servers.get(self.id) == self.config.address:
                return
            for peer in [p for p in self._peers() if p.live and p.cluster == self.cluster and p.id != self.id]:
                try:
                    resp = await self._stub(peer.address).AddServer(
                        control_pb2.AddServerRequest(id=self.id, address=self.config.address),
                        timeout=self.config.raft.request_timeout + 1.0)
                    store.learn_peers({s.id: s.address for s in resp.servers})
                    self._log.info("server.added", id=self.id, via=peer.address)
                    break
                except grpc.aio.AioRpcError as exc:
                    self._log.info("server.add_retry", via=peer.address, code=exc.code().name, detail=exc.details())
            with contextlib.suppress(TimeoutError):
                await store.wait_for(lambda: store.servers.get(self.id) == self.config.address, timeout=delay)
            delay = min(delay * 2, 5.0)

    async def _lead_when_leader(self) -> None:
        await self.handle.wait_ready()
        store = self.store
        assert store is not None
        while True:
            await store.wait_for(lambda: store.is_leader)
            try:
                await store.read_barrier()
            except ShoalError as exc:
                self._log.info("server.not_leading_yet", reason=str(exc))
                await asyncio.sleep(0.05)
                continue
            term = store.term
            self._log.info("server.leading", id=self.id, term=term)
            tasks = [asyncio.create_task(duty(store), name=f"duty-{i}") for i, duty in enumerate(self._duties)]
            tasks.append(asyncio.create_task(self._promote_learners(store), name="duty-promote"))
            try:
                await store.wait_for(lambda: not store.is_leader or store.term != term)
            finally:
                for t in tasks:
                    t.cancel()
                for t in tasks:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t
            self._log.info("server.stopped_leading", id=self.id, term=term)

    async def _promote_learners(self, store: RaftStore) -> None:
        while True:
            await store.promote_caught_up()
            await asyncio.sleep(0.5)

    # --- what the API asks ----------------------------------------------------------------

    def is_leader(self) -> bool:
        return self.store is not None and self.store.is_leader

    def leader_address(self) -> str | None:
        store = self.store
        return store.leader_address(store.servers) if store is not None else None

    def refusal(self) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
        """How a follower refuses leader-only work: status, message, trailing metadata."""
        if self.store is None:
            return grpc.StatusCode.UNAVAILABLE, self.handle.waiting, ()
        leader = self.leader_address()
        if leader is None:
            return grpc.StatusCode.UNAVAILABLE, self.no_leader_message(), ()
        return (grpc.StatusCode.UNAVAILABLE, f"this server is not the leader; the leader is at {leader}",
                ((LEADER_HINT, leader),))

    def no_leader_message(self) -> str:
        """Why nothing can be written (or read linearizably) right now, in operator terms."""
        store = self.store
        if store is None:
            return self.handle.waiting
        reachable, voters, majority = self._quorum(store)
        if reachable < majority:
            return (f"the control plane has no quorum: {reachable} of {voters} servers are alive "
                    f"(a majority is {majority}); running workloads keep running and serving, but nothing "
                    "can be changed until enough servers are back")
        return "no Raft leader is known right now (an election is under way); retry in a moment"

    async def _wait_for_leader(self, timeout: float = 3.0) -> None:
        """An election takes about an election timeout: wait that long for a leader."""
        store = self.store
        if store is not None and store.leader_id == 0:
            with contextlib.suppress(TimeoutError):
                await store.wait_for(lambda: store.leader_id != 0, timeout=timeout)

    def _stub(self, address: str) -> control_pb2_grpc.ControlStub:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = grpc.aio.insecure_channel(address)
        return control_pb2_grpc.ControlStub(ch)

    async def forward(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Send a leader-only request to the leader and relay its answer (once: a request
        that was already forwarded is refused, so no two servers bounce it between them)."""
        await self._wait_for_leader()
        if self.is_leader():
            return None  # the caller runs the request here
        code, message, trailers = self.refusal()
        metadata = dict(context.invocation_metadata() or ())
        leader = self.leader_address()
        if leader is None or metadata.get(FORWARDED) or leader == self.config.address:
            context.set_trailing_metadata(trailers)
            await context.abort(code, message)
        remaining = context.time_remaining()
        timeout = min(remaining, 30.0) if remaining is not None else 30.0
        try:
            return await getattr(self._stub(leader), method)(request, timeout=timeout, metadata=((FORWARDED, "1"),))
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")

    async def read_barrier(self) -> None:
        store = self.handle.require()
        await self._wait_for_leader()
        if store.leader_id == 0:
            raise Unavailable(self.no_leader_message())
        try:
            await store.read_barrier(timeout=3.0)
        except Unavailable:
            reachable, _, majority = self._quorum(store)
            if store.leader_id == 0 or reachable < majority:
                raise Unavailable(self.no_leader_message()) from None
            raise

    def _quorum(self, store: RaftStore) -> tuple[int, int, int]:
        """(voters alive in gossip, voters, majority)."""
        voters = store.status().conf_state.voters
        live = {p.id for p in self._peers() if p.live} | {self.id}
        return len(voters & live), len(voters), len(voters) // 2 + 1

    async def add_server(self, request: control_pb2.AddServerRequest) -> control_pb2.AddServerResponse:
        store = self.handle.require()
        node_id = request.id
        if not request.address:
            raise ConfigError("AddServer needs the new server's address")
        if node_id == 0:
            try:
                resp = await self._stub(request.address).Servers(control_pb2.ServersRequest(local=True), timeout=5.0)
            except grpc.aio.AioRpcError as exc:
                raise Unavailable(f"cannot reach the server at {request.address}: {exc.details()}") from None
            if not resp.servers:
                raise Unavailable(f"the agent at {request.address} is not a server")
            mine = resp.servers[0]
            if mine.cluster and mine.cluster != self.cluster:
                raise ConfigError(f"the server at {request.address} belongs to cluster {mine.cluster}, not {self.cluster}")
            node_id = mine.id
        await store.add_server(node_id, request.address)
        return control_pb2.AddServerResponse(
            id=node_id, cluster=self.cluster,
            servers=[control_pb2.Server(id=i, address=a) for i, a in sorted(store.servers.items())])

    def names(self) -> dict[int, str]:
        """Raft id → node name, from gossip."""
        # Remembered: a server that died is still shown by name.
        self._names.update({p.id: p.name for p in self._peers()})
        self._names[self.id] = self.config.node_name
        return dict(self._names)

    async def remove_server(self, request: control_pb2.RemoveServerRequest) -> int:
        store = self.handle.require()
        names = self.names()
        node_id = request.id
        if not node_id:
            wanted = request.name
            matches = [i for i, a in store.servers.items() if a == wanted or names.get(i) == wanted]
            if not matches:
                raise ConfigError(f'no server named "{wanted}"; see shoal get servers')
            node_id = matches[0]
        elif node_id not in store.servers:
            raise ConfigError(f"no server with id {node_id}; see shoal get servers")
        await store.remove_server(node_id)
        return node_id

    def local_status(self, name: str) -> control_pb2.Server:
        store = self.store
        if store is None:
            return control_pb2.Server(id=self.id, name=name, address=self.config.address, role="waiting",
                                      cluster=self.cluster, lag=-1)
        st = store.status()
        conf = st.conf_state
        suffrage = "voter" if self.id in conf.voters else "learner" if self.id in conf.learners else "none"
        return control_pb2.Server(
            id=self.id, name=name, address=self.config.address, suffrage=suffrage,
            role=_role_name(st.role), term=st.term, commit=st.commit, applied=store.applied_index,
            cluster=self.cluster, leader=st.lead, lag=-1)

    async def servers(self) -> list[control_pb2.Server]:
        """Every member's status: asked of each (with a short deadline), lag from the
        leader's view of their logs."""
        store = self.handle.require()
        names = self.names()
        table = store.servers
        conf = store.status().conf_state

        async def ask(id: int, address: str) -> control_pb2.Server:
            if id == self.id:
                return self.local_status(names.get(id, ""))
            try:
                resp = await self._stub(address).Servers(control_pb2.ServersRequest(local=True), timeout=1.0)
                if resp.servers and resp.servers[0].id == id:
                    s = resp.servers[0]
                    s.name = s.name or names.get(id, "")
                    return s
            except grpc.aio.AioRpcError:
                pass
            return control_pb2.Server(id=id, name=names.get(id, ""), address=address, role="unreachable", lag=-1,
                                      suffrage="voter" if id in conf.voters else "learner")

        out = list(await asyncio.gather(*(ask(i, a) for i, a in sorted(table.items()))))
        leader = next((s for s in out if s.role == "leader"), None)
        if leader is not None:
            for s in out:
                if s.role != "unreachable":
                    s.lag = max(0, leader.commit - s.applied)
        if self.is_leader():
            progress = store.status().progress
            for s in out:
                pr = progress.get(s.id)
                if pr is not None:
                    s.match = pr.match
        return out


class _RaftDelegate(raft_pb2_grpc.RaftServicer):
    """The Raft service on the agent's gRPC server, answering once the store exists."""

    def __init__(self) -> None:
        self.target: Any = None

    async def Send(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        if self.target is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this server has not joined a cluster yet")
        return await self.target.Send(request_iterator, context)

    async def SendSnapshot(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        if self.target is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this server has not joined a cluster yet")
        return await self.target.SendSnapshot(request_iterator, context)


def _role_name(role: Role) -> str:
    return role.name.lower().replace("_", "-")

