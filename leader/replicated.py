"""`RaftStore`: the `Store` interface backed by the Raft core, replicated among servers.

What it owns: a `Node` (the pure core), its `SqliteRaftStorage`, a `RaftTransport`, the
replicated state machine (`ReplicatedState`: ClusterState + client sessions), a tick
task and the Ready loop. It is the only place that awaits on the core's behalf.

The Ready loop, in the order `Ready` prescribes:
  0.   hand a leader's appends and heartbeats to the transport at once: the followers
       write the entries while the leader does (`Ready.early_messages`);
  1–3. persist the snapshot, the entries and the hard state in one SQLite transaction
       on the I/O thread (fsync'd when `must_sync`), then publish them to the in-memory
       view the core reads, and restore the state machine from a received snapshot; a
       hard state that only moves the commit index waits for the next transaction;
  4.   hand the other messages to the transport (after persisting: "persist before
       send", for every acknowledgement and vote);
  5.   apply committed entries: membership changes to the core, commands to the state
       machine, resolving the `commit()` calls waiting on them;
  6.   release ReadIndex reads once the state machine has applied their index;
  7.   `advance`, then snapshot and compact when `snapshot_every` entries were applied.
Messages, ticks and proposals arriving while a Ready is being persisted are stepped
into the core at once (the core allows it); their effects come in the next Ready, so
one fsync covers everything that arrived during the previous one (group commit).

Rules:
- `commit(txn)` on the leader proposes a command (client id, seq) and resolves when
  that entry is *applied* here, with the revision it produced; on a follower it raises
  `NotLeader(leader_hint=…)` — unless the caller passes `forward=True`, below.
  A proposal whose index is later applied with another term was lost in a leadership
  change: `ProposalDropped`. No answer within `request_timeout` is `Unavailable`: the
  write may or may not apply; retrying with the same client id and seq applies it at
  most once (`replicated_state`).
- `commit(txn, forward=True)` on a follower forwards the command to the leader (the
  core's `Node.forward`: a `MsgProp` on the Raft stream) and resolves, like on the
  leader, when the entry is applied *here* — so the answer is linearizable and the
  revision is visible in `state` when it comes. Forwarding is batched, one batch in
  flight: after a `MsgProp` leaves, the next waits until the leader has appended
  something since (a `MsgApp` with entries arrives) or a tick passed, and carries every
  write that arrived meanwhile — one gRPC message and one append at the leader for all
  of them (a stream message costs the Python gRPC stack as much CPU as dozens of
  entries do, so fewer, fuller messages is what raises throughput). Nothing answers a
  forward, so the store keeps each forwarded command until it applies here and sends
  it again when a new leader is known, when it became the leader itself (it proposes
  it), when the transport reports messages to the leader lost, and every
  `forward_retry` seconds; the command's client id and seq make every
  copy after the first apply as a duplicate, so a write is applied exactly once
  whatever the leader changes (and a lost copy is never reported as `ProposalDropped`:
  another copy may still commit). Without a known leader, forwarded writes wait (up to
  their deadline) for one. Controllers never forward: a deposed leader's write must
  fail, not travel.
- `read_barrier()` is a linearizable read point (ReadIndex): once it returns, `state`
  reflects every write acknowledged before it was called, on a leader or a follower.
  A deposed leader cannot pass it (the core drops its pending reads; the call times out).
- `close()` on the leader first hands leadership to the most up-to-date voter, so a
  graceful restart costs no election timeout.
- Errors from disk (`StoreError`) stop the node: it stops answering rather than
  diverge, and every later call raises the same error.
- Membership: a new cluster is bootstrapped from `peers` (id → Raft address) with
  `bootstrap_entries`, the same on every initial server; a server with a non-empty log
  ignores it. A server started with `bootstrap=False` starts empty and waits for a
  leader to add it (`add_server`): it joins as a learner, receives the log or a
  snapshot, and the leader promotes it to voter once it has caught up
  (`promote_caught_up`). `remove_server` removes a voter or learner. Every change
  carries the server's address, and the replicated server table (id → address) is
  what the transport dials, so addresses survive restarts and reach later joiners.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import heapq
import itertools
import pathlib
import random
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import grpc
import structlog

from shoal.errors import ConfigError, Conflict, ShoalError, StoreError, Unavailable
from shoal.leader.raft import (
    NONE,
    ConfChange,
    ConfChangeKind,
    ConfChangeRefused,
    Config,
    EntryKind,
    Message,
    MsgApp,
    Node,
    NotLeader,
    ProposalDropped,
    Ready,
    Role,
    Status,
    bootstrap_entries,
)
from shoal.leader.raft.config import election_timeout_seconds
from shoal.leader.raft.confchange import validate as validate_conf_change
from shoal.leader.raft_storage import SqliteRaftStorage
from shoal.leader.raft_transport import SERVER_OPTIONS, RaftTransport, TransportConfig
from shoal.leader.replicated_state import Outcome, ReplicatedState, encode_command
from shoal.leader.state import KINDS, ClusterState, Txn
from shoal.leader.store import Store

__all__ = ["RaftStoreConfig", "RaftStore"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class RaftStoreConfig:
    """Settings of a replicated store. Times in seconds."""

    raft: Config = field(default_factory=lambda: Config(id=1))
    """The core's settings; `id` and `applied` are set by the store."""

    snapshot_every: int = 10_000
    """Applied entries between two snapshots. A snapshot costs one serialization of the
    whole state (a few ms per MB); 10,000 entries bound replay on restart to well under a
    second and the log to tens of MB."""

    snapshot_keep: int = 5_000
    """Entries kept behind a snapshot, so a follower a little behind (a restart, a slow
    disk) catches up from the log instead of receiving the whole state."""

    request_timeout: float = 5.0
    """How long `commit` and `read_barrier` wait for their answer before `Unavailable`:
    several election timeouts, so a leader change during the call is ridden out."""

    forward_retry: float = 4.0
    """Seconds after which a forwarded write not yet applied here is forwarded again.
    The losses that have a signal are re-sent at once — a leader change, and messages
    to the leader dropped by the transport (`report_unreachable`) — so this is the last
    resort for the one without (a leader that dropped proposals during a leadership
    transfer it then abandoned). Above a saturated cluster's commit latency (1,000
    waiting clients on 2 cores see 1–3 s), so a slow write is not sent twice and made
    slower still, and below `request_timeout`, so a lost forward can still commit."""

    transport: TransportConfig = field(default_factory=TransportConfig)

    def validate(self) -> None:
        self.raft.validate()
        self.transport.validate()
        if self.snapshot_every < 1:
            raise ConfigError(f"raft: snapshot_every must be ≥ 1 entries, got {self.snapshot_every}")
        if self.snapshot_keep < 0:
            raise ConfigError(f"raft: snapshot_keep must be ≥ 0 entries, got {self.snapshot_keep}")
        if self.request_timeout <= 0:
            raise ConfigError(f"raft: request_timeout must be > 0 seconds, got {self.request_timeout}")
        if self.forward_retry <= 0:
            raise ConfigError(f"raft: forward_retry must be > 0 seconds, got {self.forward_retry}")


class RaftStore(Store):
    """A `Store` whose writes are committed by a Raft quorum before they are applied."""

    def __init__(
        self,
        *,
        node_id: int,
        cluster_id: str,
        peers: Mapping[int, str],
        data_dir: pathlib.Path | str,
        config: RaftStoreConfig | None = None,
        server: grpc.aio.Server | None = None,
        logger: Any = None,
        rng: random.Random | None = None,
        bootstrap: bool = True,
        external_server: bool = False,
    ) -> None:
        if bootstrap and node_id not in peers:
            raise ConfigError(f"raft: server {node_id} is not in its own member table {sorted(peers)}")
        self._sm = ReplicatedState()
        super().__init__()
        cfg = config or RaftStoreConfig()
        cfg = replace(cfg, raft=replace(cfg.raft, id=node_id))
        cfg.validate()
        self.config = cfg
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.data_dir = pathlib.Path(data_dir)
        self._log = (logger if logger is not None else structlog.get_logger("shoal.raft")).bind(node=node_id)
        self._rng = rng or random.Random()
        self._peers = dict(peers)
        self._bootstrap = bootstrap
        self._transport = RaftTransport(
            cluster_id=cluster_id,
            node_id=node_id,
            peers=peers,
            handler=self,
            config=cfg.transport,
            logger=self._log,
            rng=random.Random(self._rng.getrandbits(64)),
        )
        self._own_server = server is None and not external_server
        self._server = server
        if server is not None:
            self._transport.add_to_server(server)
        self._io = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"raft-io-{node_id}")
        self._storage: SqliteRaftStorage | None = None
        self._node: Node | None = None
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._closed = False
        self._failed: ShoalError | None = None
        # Our own session: one client id per process lifetime, seqs from 1.
        self._client_id = f"server-{node_id}-{uuid.uuid4().hex[:12]}"
        self._seq = itertools.count(1)
        self._outstanding: set[int] = set()
        self._unacked: collections.deque[int] = collections.deque()  # own seqs, oldest first
        # (deadline, n, key, waiter) of every commit call; the ticker expires them.
        self._deadlines: list[tuple[float, int, tuple[str, int], asyncio.Future[Outcome]]] = []
        self._deadline_ids = itertools.count()
        self._pending: dict[tuple[str, int], asyncio.Future[Outcome]] = {}
        self._proposals: dict[int, tuple[int, tuple[str, int]]] = {}  # index -> (term, key)
        # Forwarded writes not yet applied here: key -> [command, loop time last sent];
        # and the keys to send with the next Ready (ordered, no repeats).
        self._forwarded: dict[tuple[str, int], list[Any]] = {}
        self._forward_queue: dict[tuple[str, int], None] = {}
        # A MsgProp left and the leader has not appended since (nor a tick passed).
        self._forward_in_flight = False
        self._reads: dict[bytes, asyncio.Future[int]] = {}
        self._read_ids = itertools.count(1)
        self._lead = NONE

    # --- Store ---------------------------------------------------------------------------

    @property
    def state(self) -> ClusterState:
        return self._sm.state

    @state.setter
    def state(self, value: ClusterState) -> None:
        self._sm.state = value

    async def _persist(self, txn: Txn, state_after: ClusterState) -> None:
        raise TypeError("RaftStore commits through the Raft log; _persist is never called")

    async def commit(
        self,
        txn: Txn,
        *,
        client_id: str | None = None,
        seq: int | None = None,
        timeout: float | None = None,
        forward: bool = False,
    ) -> int:
        """Commit `txn` through the log; returns the revision it produced once applied here.

        `client_id`/`seq` make a retry safe: the same pair applies at most once, and a
        retry of an applied write returns its original revision. Without them the
        store's own session numbers the write. Raises `NotLeader` on a follower (unless
        `forward`: then the leader is asked to commit it, see the module docstring),
        `ProposalDropped` if leadership moved under the write, `Unavailable` on timeout.
        """
        if not txn:
            return self.state.revision
        self._check_usable()
        unknown = sorted({op.kind for op in txn.ops if op.kind not in KINDS})
        if unknown:
            raise StoreError(f"unknown kinds in transaction: {', '.join(unknown)}")
        own = client_id is None
        if own:
            client_id, seq = self._client_id, next(self._seq)
            self._outstanding.add(seq)
            self._unacked.append(seq)
        elif seq is None or seq < 1:
            raise ValueError("commit with a client_id needs seq ≥ 1")
        assert client_id is not None and seq is not None
        try:
            known = self._sm.sessions.lookup(client_id, seq)
            if known is not None:
                return self._result(known)
            key = (client_id, seq)
            fut = self._pending.get(key)
            if fut is None:
                node = self._require_node()
                if not node.is_leader and not forward:
                    raise NotLeader(node.lead)
                first_unacked = self._first_unacked() if own else seq
                command = encode_command(client_id, seq, first_unacked, txn)
                fut = waiter = _future()
                self._pending[key] = fut
                if node.is_leader:
                    self._propose_at(node, node.propose(command), key)
                    self._wake.set()
                else:
                    self._forwarded[key] = [command, -1.0]
                    self._forward_queue[key] = None
                    if not self._forward_in_flight:
                        # (Otherwise what opens the window — an append, a tick — wakes
                        # the loop, which sends this write with the others.)
                        self._wake.set()
            else:
                # A retry of a write still in flight: the same outcome, its own deadline.
                waiter = _future()
                fut.add_done_callback(functools.partial(_pass_on, waiter))
            # The wait is a bare future: its deadline sits in a heap the ticker sweeps,
            # rather than a wait_for/shield pair per call (a timer and three extra
            # futures, and as many event-loop turns before the caller resumes).
            deadline = asyncio.get_running_loop().time() + (
                timeout if timeout is not None else self.config.request_timeout
            )
            heapq.heappush(self._deadlines, (deadline, next(self._deadline_ids), key, waiter))
            try:
                outcome = await waiter
            except asyncio.CancelledError:
                # Our caller went away (which cancels the future it awaited): a retry
                # must not find that future, but propose again (and apply at most once).
                if self._pending.get(key) is waiter:
                    del self._pending[key]
                    self._forwarded.pop(key, None)
                raise
            except TimeoutError:
                raise Unavailable(
                    f"write {client_id}/{seq} was not confirmed in time (no quorum?); it may or may "
                    "not apply: retry with the same client id and seq"
                ) from None
            return self._result(outcome)
        finally:
            if own:
                self._outstanding.discard(seq)

    def _propose_at(self, node: Node, index: int, key: tuple[str, int]) -> None:
        """Remember that `key` was proposed at `index` in this term."""
        replaced = self._proposals.get(index)
        if replaced is not None:
            # An earlier proposal of ours at this index was truncated away by a
            # leader of another term (we are leading again): it is lost.
            self._drop(replaced[1])
        self._proposals[index] = (node.term, key)

    def _flush_forwards(self, node: Node) -> None:
        """Send the queued forwarded writes: to the leader in one `MsgProp`, or, if we
        lead now, propose them here. Without a known leader they stay queued."""
        queue = self._forward_queue
        forwarded = self._forwarded
        keys = [k for k in queue if k in forwarded]
        if not keys:
            queue.clear()
            return
        if not node.is_leader and (node.lead == NONE or self._forward_in_flight):
            return
        queue.clear()
        now = asyncio.get_running_loop().time()
        commands = []
        for k in keys:
            item = forwarded[k]
            item[1] = now
            commands.append(item[0])
        try:
            if node.is_leader:
                last = node.propose_many(commands)
                for index, k in enumerate(keys, last - len(keys) + 1):
                    self._propose_at(node, index, k)
            else:
                node.forward(commands)
                self._forward_in_flight = True
        except (NotLeader, ProposalDropped) as exc:
            # A transfer under way, or we were removed: try again with the next leader
            # (or at `forward_retry`); the writes' deadlines still run.
            self._log.debug("raft.forward_deferred", n=len(keys), error=str(exc))

    def _refresh_forwards(self, now: float) -> None:
        """Queue again every forwarded write last sent `forward_retry` ago or earlier."""
        cutoff = now - self.config.forward_retry
        for key, item in self._forwarded.items():
            if item[1] <= cutoff:
                self._forward_queue[key] = None
        if self._forward_queue:
            self._wake.set()

    def _first_unacked(self) -> int:
        """The lowest of our own seqs still awaiting its answer (amortized O(1): own seqs
        are issued in order, so answered ones leave from the front)."""
        unacked = self._unacked
        while unacked[0] not in self._outstanding:
            unacked.popleft()
        return unacked[0]

    def _expire_overdue(self, now: float) -> None:
        """Answer every commit call whose deadline passed with a timeout."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, _, key, waiter = heapq.heappop(deadlines)
            if not waiter.done():
                if self._pending.get(key) is waiter:
                    # A later retry of this write proposes it again; until then nobody
                    # waits for it, so it is not forwarded again either.
                    del self._pending[key]
                    self._forwarded.pop(key, None)
                waiter.set_exception(TimeoutError())

    def _result(self, outcome: Outcome) -> int:
        if outcome.error is not None:
            if outcome.error.startswith("conflict:"):
                raise Conflict(outcome.error)
            raise StoreError(outcome.error)
        return outcome.revision

    async def read_barrier(self, timeout: float | None = None) -> int:
        """Wait until `state` is at least as new as any write acknowledged before this call.

        Works on followers too (the leader confirms its commit index by a heartbeat
        round). Returns the revision then visible. Raises `NotLeader(0)` when no leader
        is known, `Unavailable` when none confirms in time.
        """
        self._check_usable()
        node = self._require_node()
        ctx = f"{self._client_id}:{next(self._read_ids)}".encode()
        fut: asyncio.Future[int] = _future()
        self._reads[ctx] = fut
        try:
            node.read_index(ctx)
            self._wake.set()
            index = await asyncio.wait_for(
                asyncio.shield(fut), timeout if timeout is not None else self.config.request_timeout
            )
        except TimeoutError:
            raise Unavailable("no leader confirmed a read point in time; retry") from None
        finally:
            self._reads.pop(ctx, None)
        try:
            await self.wait_for(lambda: self._sm.applied >= index, timeout=self.config.request_timeout)
        except TimeoutError:
            raise Unavailable(f"this server did not apply up to the read point {index} in time; retry") from None
        return self.state.revision

    # --- views ---------------------------------------------------------------------------

    @property
    def leader_id(self) -> int:
        """The leader this server knows of, or 0."""
        return self._node.lead if self._node is not None else NONE

    @property
    def is_leader(self) -> bool:
        return self._node is not None and self._node.is_leader and not self._closed

    @property
    def applied_index(self) -> int:
        return self._sm.applied

    @property
    def snapshot_index(self) -> int:
        """Index of the latest snapshot this server holds (0: none yet)."""
        return self._storage.snapshot().index if self._storage is not None else 0

    @property
    def members(self) -> Mapping[int, str]:
        """Member id → Raft address, as configured."""
        return dict(self._peers)

    def leader_address(self, members: Mapping[int, str] | None = None) -> str | None:
        """The leader's address in `members` (default: the Raft member table), or None.

        The API layer forwards a write that raised `NotLeader` to this address; when the
        Raft and API services share one gRPC server the default table is the answer.
        """
        lead = self.leader_id
        if lead == NONE:
            return None
        return (members if members is not None else self._peers).get(lead)

    def status(self) -> Status:
        return self._require_node().status()

    @property
    def term(self) -> int:
        return self._node.term if self._node is not None else 0

    @property
    def servers(self) -> Mapping[int, str]:
        """The replicated server table: id → address of every voter and learner."""
        return dict(self._sm.servers)

    async def campaign_if_alone(self) -> bool:
        """Start an election now if this server is the only voter (a cluster of one has
        nobody to wait for: no election timeout on start). Returns whether it did."""
        node = self._require_node()
        try:
            await self.wait_for(lambda: self._sm.applied >= node.status().commit, timeout=self.config.request_timeout)
        except TimeoutError:
            return False
        if node.conf_state().voters != frozenset({self.node_id}) or node.is_leader:
            return False
        node.campaign()
        self._wake.set()
        return True

    def raft_servicer(self) -> Any:
        """The Raft service's handlers, for a caller that built the store with
        `external_server=True` and serves them on a gRPC server of its own."""
        return self._transport.servicer()

    def learn_peers(self, peers: Mapping[int, str]) -> None:
        """Tell a joining server where the current members are, before it learns the
        table from the log, so it accepts and answers their first messages."""
        for id, address in peers.items():
            if id not in self._peers:
                self._peers[id] = address
                self._transport.set_peer(id, address)

    async def add_server(self, node_id: int, address: str, *, timeout: float | None = None) -> None:
        """Add a server as a learner (leader only); it becomes a voter once caught up.

        Returns when the learner is in the applied configuration. Adding a member again
        with a new address updates the address. Raises `NotLeader` on a follower.
        """
        self._check_usable()
        node = self._require_node()
        conf = node.conf_state()
        if node_id in conf.voters or node_id in conf.learners:
            if self._sm.servers.get(node_id) == address:
                return
            kind = ConfChangeKind.ADD_VOTER if node_id in conf.voters else ConfChangeKind.ADD_LEARNER
        else:
            kind = ConfChangeKind.ADD_LEARNER
        await self._change(ConfChange(kind=kind, node_id=node_id, context=address.encode()),
                           lambda: self._sm.servers.get(node_id) == address, timeout)

    async def remove_server(self, node_id: int, *, timeout: float | None = None) -> None:
        """Remove a voter or learner (leader only). A leader removing itself steps down
        once the change commits. Raises `NotLeader` on a follower."""
        self._check_usable()
        node = self._require_node()
        conf = node.conf_state()
        if node_id not in conf.voters and node_id not in conf.learners:
            return
        await self._change(ConfChange(kind=ConfChangeKind.REMOVE_NODE, node_id=node_id),
                           lambda: node_id not in self._require_node().conf_state().voters | self._require_node().conf_state().learners,
                           timeout)

    async def promote_caught_up(self, *, max_lag: int = 0) -> list[int]:
        """Leader: promote every learner whose log is within `max_lag` entries of the
        commit index and that answered recently; returns the ids promoted."""
        node = self._node
        if node is None or not self.is_leader:
            return []
        st = node.status()
        promoted = []
        for id in sorted(st.conf_state.learners):
            pr = st.progress.get(id)
            if pr is None or not pr.recent_active or pr.match + max_lag < st.commit:
                continue
            address = self._sm.servers.get(id, "")
            try:
                await self._change(ConfChange(kind=ConfChangeKind.ADD_VOTER, node_id=id, context=address.encode()),
                                   lambda: id in self._require_node().conf_state().voters, None)
            except ShoalError as exc:
                self._log.info("raft.promotion_deferred", id=id, error=str(exc))
                break
            self._log.info("raft.learner_promoted", id=id)
            promoted.append(id)
        return promoted

    async def _change(self, cc: ConfChange, done: Callable[[], bool], timeout: float | None) -> None:
        node = self._require_node()
        if not node.is_leader:
            raise NotLeader(node.lead)
        validate_conf_change(node.conf_state(), cc)  # a change that can never be made
        budget = timeout if timeout is not None else self.config.request_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget

        async def _propose_then_wait() -> None:
            while True:
                if not node.is_leader:
                    raise NotLeader(node.lead)
                try:
                    node.propose_conf_change(cc)
                    break
                except ConfChangeRefused:
                    # Another change (or a new leader's own no-op) is not applied yet:
                    # one change at a time, so wait for the next apply and try again.
                    await self._progress.wait()
            self._wake.set()
            while not (done() or self._closed or self._failed is not None):
                await self._progress.wait()

        try:
            await asyncio.wait_for(_propose_then_wait(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            raise Unavailable(f"membership change for server {cc.node_id} was not confirmed in time; "
                              "check the servers' status and retry") from None
        self._check_usable()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float | None = None) -> None:
        """Wait until `predicate()` holds, re-checked after every Ready; `TimeoutError` if not."""

        async def _wait() -> None:
            while not predicate():
                await self._progress.wait()

        await asyncio.wait_for(_wait(), timeout)

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Open (or bootstrap) the log, start serving, start ticking."""
        loop = asyncio.get_running_loop()
        raft_dir = self.data_dir / "raft"
        storage = await loop.run_in_executor(
            self._io,
            functools.partial(SqliteRaftStorage, raft_dir, cluster_id=self.cluster_id, node_id=self.node_id,
                              logger=self._log),
        )
        self._storage = storage
        fresh = storage.last_index() == 0 and storage.hard_state.is_empty() and storage.snapshot().is_empty()
        if fresh and self._bootstrap:
            entries, hs = bootstrap_entries(self._peers)
            await self._on_io(functools.partial(storage.write, entries=entries, hard_state=hs))
            storage.publish(entries=entries, hard_state=hs)
            self._log.info("raft.bootstrapped", voters=sorted(self._peers), cluster=self.cluster_id)
        elif fresh:
            self._log.info("raft.waiting_to_be_added", cluster=self.cluster_id)
        snap = storage.snapshot()
        self._sm.restore(snap.data, snap.index)
        self._sync_peers()
        self._node = Node(
            replace(self.config.raft, applied=snap.index),
            storage,
            rng=random.Random(self._rng.getrandbits(64)),
            logger=self._log,
        )
        if self._own_server:
            server = grpc.aio.server(options=SERVER_OPTIONS)
            self._transport.add_to_server(server)
            address = self._peers[self.node_id]
            if server.add_insecure_port(address) == 0:
                raise ConfigError(f"raft: cannot listen on {address}")
            await server.start()
            self._server = server
        await self._transport.start()
        self._tasks = [
            asyncio.create_task(self._ready_loop(), name=f"raft-ready-{self.node_id}"),
            asyncio.create_task(self._ticker(), name=f"raft-tick-{self.node_id}"),
        ]
        self._wake.set()

    async def close(self, *, transfer_leadership: bool = True) -> None:
        """Stop this server; a leader first hands over (unless `transfer_leadership=False`,
        which is what a crash looks like to the others)."""
        if self._closed:
            return
        node = self._node
        if transfer_leadership and node is not None and node.is_leader and self._failed is None:
            await self._hand_over(node)
        self._closed = True
        self._stopping = True
        self._wake.set()
        for task in self._tasks:
            if task.get_name().startswith("raft-tick"):
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._own_server and self._server is not None:
            await self._server.stop(grace=None)
        await self._transport.close()
        self._fail_all(Unavailable(f"Raft server {self.node_id} is shutting down; retry on another server"))
        if self._storage is not None:
            await self._on_io(self._storage.close)
        self._io.shutdown(wait=True)
        self._log.info("raft.stopped")

    async def _hand_over(self, node: Node) -> None:
        progress = node.status().progress
        voters = node.conf_state().voters
        candidates = sorted(
            (pr.match, id) for id, pr in progress.items() if id != self.node_id and id in voters and pr.recent_active
        )
        if not candidates:
            return
        target = candidates[-1][1]
        self._log.info("raft.transferring_leadership", to=target)
        node.transfer_leadership(target)
        self._wake.set()
        _, high = election_timeout_seconds(self.config.raft)
        try:
            await self.wait_for(lambda: not node.is_leader, timeout=high)
        except TimeoutError:
            self._log.warning("raft.transfer_timed_out", to=target)

    # --- transport callbacks (RaftHandler) ---------------------------------------------------

    def deliver(self, messages: Sequence[Message]) -> None:
        node = self._node
        if node is None or self._closed or self._failed is not None:
            return
        for m in messages:
            try:
                node.step(m)
            except ShoalError as exc:
                self._log.debug("raft.step_refused", src=m.src, error=str(exc))
            if type(m) is MsgApp and m.entries:
                # The leader appended since our last forward: send the next batch.
                self._forward_in_flight = False
        self._wake.set()

    def report_unreachable(self, id: int) -> None:
        if self._node is not None and not self._closed:
            self._node.report_unreachable(id)
            if self._forwarded and id == self._node.lead:
                # Messages to the leader were lost (a full queue, a broken stream): the
                # writes we forwarded may be among them, so the next tick sends them all
                # again. Not at once: the transport reports a full queue from inside
                # `send`, and an immediate re-send would find it full again, in a loop
                # that never yields to the pump that drains it.
                for item in self._forwarded.values():
                    item[1] = -1.0
            self._wake.set()

    def report_snapshot(self, id: int, ok: bool) -> None:
        if self._node is not None and not self._closed:
            self._node.report_snapshot(id, ok)
            self._wake.set()

    # --- the loops -----------------------------------------------------------------------

    async def _ticker(self) -> None:
        node = self._require_node()
        loop = asyncio.get_running_loop()
        interval = self.config.raft.tick_interval
        next_at = loop.time() + interval
        while not self._closed:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            node.tick()
            self._forward_in_flight = False
            self._wake.set()
            self._expire_overdue(loop.time())
            if self._forwarded:
                self._refresh_forwards(loop.time())
            next_at += interval
            if loop.time() > next_at:
                # The loop stalled: skip the missed ticks rather than firing them in a
                # burst, which would start an election the moment the stall ends.
                next_at = loop.time() + interval

    async def _ready_loop(self) -> None:
        node = self._require_node()
        try:
            while not self._stopping:
                await self._wake.wait()
                self._wake.clear()
                if self._forward_queue:
                    self._flush_forwards(node)
                while not self._stopping and node.has_ready():
                    rd = node.ready()
                    await self._handle_ready(node, rd)
                    node.advance(rd)
                    await self._maybe_snapshot(node)
                    self._signal_progress()
                self._signal_progress()
        except ShoalError as exc:
            self._failed = exc
            self._log.error("raft.stopped_on_error", error=str(exc))
            self._fail_all(exc)
            self._signal_progress()
        except Exception as exc:
            self._failed = StoreError(f"Raft server {self.node_id} stopped on an internal error: {exc!r}")
            self._log.exception("raft.stopped_on_error")
            self._fail_all(self._failed)
            self._signal_progress()

    def _signal_progress(self) -> None:
        ev = self._progress
        self._progress = asyncio.Event()
        ev.set()

    async def _handle_ready(self, node: Node, rd: Ready) -> None:
        storage = self._storage
        assert storage is not None
        if rd.soft_state is not None:
            self._on_soft_state(node, rd)
        # 0: a leader's appends go out before its own fsync, which runs meanwhile.
        if rd.early_messages:
            self._transport.send(rd.early_messages)
        # 1–3: persist, fsync'd when must_sync, before anything else leaves this node.
        if rd.snapshot is None and not rd.entries and not rd.must_sync:
            if rd.hard_state is not None:
                # Only the commit index moved: it rides along with the next write rather
                # than costing a transaction (and a trip to the I/O thread) before apply.
                storage.defer_hard_state(rd.hard_state)
                storage.publish(hard_state=rd.hard_state)
        else:
            await self._on_io(
                functools.partial(
                    storage.write,
                    snapshot=rd.snapshot,
                    entries=rd.entries,
                    hard_state=rd.hard_state,
                    sync=rd.must_sync,
                )
            )
            storage.publish(snapshot=rd.snapshot, entries=rd.entries, hard_state=rd.hard_state)
        if rd.snapshot is not None:
            await self._restore(rd.snapshot.data, rd.snapshot.index)
        # 4: send.
        if rd.messages:
            self._transport.send(rd.messages)
        # 5: apply.
        revision = self._sm.state.revision
        for e in rd.committed_entries:
            if e.kind is EntryKind.CONF_CHANGE:
                cc = ConfChange.decode(e.data)
                node.apply_conf_change(cc)
                self._on_conf_change(cc)
                self._sm.apply_noop(e.index)
                outcome = None
            elif not e.data:
                self._sm.apply_noop(e.index)
                outcome = None
            else:
                outcome = self._sm.apply(e.index, e.data)
            self._settle(e.index, e.term, outcome)
        if self._sm.state.revision != revision:
            async with self._changed:
                self._changed.notify_all()
        # 6: reads.
        for rs in rd.read_states:
            fut = self._reads.get(rs.context)
            if fut is not None and not fut.done():
                fut.set_result(rs.index)

    def _on_soft_state(self, node: Node, rd: Ready) -> None:
        ss = rd.soft_state
        assert ss is not None
        if ss.lead != self._lead:
            self._lead = ss.lead
            self._log.info("raft.leader_changed", lead=ss.lead, term=node.term, role=ss.role.name.lower())
            self._forward_in_flight = False
            if ss.lead != NONE and self._forwarded:
                # The old leader may have lost what we forwarded: send it all to the new
                # one (what did arrive applies once, as a duplicate's answer).
                for key in self._forwarded:
                    self._forward_queue[key] = None
                self._wake.set()
        if ss.role is not Role.LEADER:
            # Proposals in flight may still commit under the new leader; they settle
            # when their index is applied (or time out). Nothing to fail here.
            pass

    def _on_conf_change(self, cc: ConfChange) -> None:
        if cc.kind is ConfChangeKind.REMOVE_NODE:
            self._sm.servers.pop(cc.node_id, None)
            self._peers.pop(cc.node_id, None)
            if cc.node_id != self.node_id:
                self._transport.remove_peer(cc.node_id)
            self._log.info("raft.server_removed", id=cc.node_id)
        elif cc.context:
            address = cc.context.decode()
            self._sm.servers[cc.node_id] = address
            self._peers[cc.node_id] = address
            self._transport.set_peer(cc.node_id, address)
            self._log.info("raft.server_added", id=cc.node_id, address=address,
                           suffrage="learner" if cc.kind is ConfChangeKind.ADD_LEARNER else "voter")

    def _sync_peers(self) -> None:
        """Dial what the replicated server table says (after a restore)."""
        for id, address in self._sm.servers.items():
            self._peers[id] = address
            self._transport.set_peer(id, address)

    def _settle(self, index: int, term: int, outcome: Outcome | None) -> None:
        if outcome is not None and outcome.client_id:
            key = (outcome.client_id, outcome.seq)
            fut = self._pending.pop(key, None)
            if fut is not None:
                if self._forwarded:
                    self._forwarded.pop(key, None)
                if not fut.done():
                    fut.set_result(outcome)
        proposal = self._proposals.pop(index, None)
        if proposal is not None and proposal[0] != term:
            # Our proposal at this index was overwritten by another leader's entry.
            self._drop(proposal[1])

    def _drop(self, key: tuple[str, int]) -> None:
        if key in self._forwarded:
            # This copy is lost, but another (forwarded earlier) may still commit: only
            # sending it again is safe, never telling the caller it was dropped.
            self._forward_queue[key] = None
            self._wake.set()
            return
        fut = self._pending.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_exception(ProposalDropped("leadership changed before the write committed; retry"))

    async def _restore(self, data: bytes, index: int) -> None:
        self._sm.restore(data, index)
        self._sync_peers()
        self._log.info("raft.state_restored", index=index, revision=self._sm.state.revision)
        # Proposals covered by the snapshot: the sessions say which of them applied.
        for i in [i for i in self._proposals if i <= index]:
            _, key = self._proposals.pop(i)
            known = self._sm.sessions.lookup(*key)
            fut = self._pending.get(key)
            if known is None:
                self._drop(key)
            elif fut is not None:
                del self._pending[key]
                self._forwarded.pop(key, None)
                if not fut.done():
                    fut.set_result(known)
        # Forwarded writes the snapshot covers are answered by their sessions.
        for key in [k for k in self._forwarded if self._sm.sessions.lookup(*k) is not None]:
            del self._forwarded[key]
            fut = self._pending.pop(key, None)
            if fut is not None and not fut.done():
                fut.set_result(self._sm.sessions.lookup(*key))
        async with self._changed:
            self._changed.notify_all()

    async def _maybe_snapshot(self, node: Node) -> None:
        storage = self._storage
        assert storage is not None
        applied = self._sm.applied
        if applied - storage.snapshot().index < self.config.snapshot_every:
            return
        data = self._sm.snapshot()
        snap = await self._on_io(functools.partial(storage.write_snapshot, applied, node.conf_state(), data))
        storage.publish_snapshot(snap)
        compact_to = applied - self.config.snapshot_keep
        if compact_to > 0 and await self._on_io(functools.partial(storage.write_compaction, compact_to)):
            storage.publish_compaction(compact_to)
        self._log.info("raft.snapshot_created", index=applied, bytes=len(data), compacted_to=max(compact_to, 0))

    # --- helpers -------------------------------------------------------------------------

    async def _on_io(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn)

    def _require_node(self) -> Node:
        if self._node is None:
            raise Unavailable(f"Raft server {self.node_id} is not started")
        return self._node

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise self._failed
        if self._closed:
            raise Unavailable(f"Raft server {self.node_id} is shut down; retry on another server")

    def _fail_all(self, exc: ShoalError) -> None:
        """Fail every waiting call (the store stopped)."""
        for fut in list(self._pending.values()) + list(self._reads.values()):
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()
        self._proposals.clear()
        self._forwarded.clear()
        self._forward_queue.clear()


def _pass_on(waiter: asyncio.Future[Any], fut: asyncio.Future[Any]) -> None:
    """Copy what `fut` came to (a result or an exception) to `waiter`, unless it is done."""
    if waiter.done():
        return
    if fut.cancelled():
        waiter.cancel()
    elif fut.exception() is not None:
        waiter.set_exception(fut.exception())  # type: ignore[arg-type]
    else:
        waiter.set_result(fut.result())


def _future() -> asyncio.Future[Any]:
    """A future whose exception counts as retrieved: its caller may have timed out."""
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())
    return fut
