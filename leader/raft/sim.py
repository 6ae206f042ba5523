"""A deterministic simulator of a Raft cluster: nodes, a faulty network, crashes, clients.

What it models:
- N nodes, each a `Node` over a `MemoryStorage` (the durable part) and a `KVStore` state
  machine (volatile: rebuilt from the snapshot and the log on restart).
- Time is an integer count of simulated milliseconds; every node ticks every
  `tick_ms`, with its own phase. Events sit in one priority queue ordered by
  (time, sequence number): the same seed replays the same run exactly.
- The shell of each node carries out a Ready in its order. Persisting takes a random
  "fsync" delay during which the node keeps receiving messages; messages leave and
  entries are applied only after it. A crash during that delay persists a random
  prefix of the steps (snapshot, entries, hard state) — a crash between persistence
  steps — and loses everything else: the unstable log, the state machine, the Ready.
- The network delays each message independently (so it reorders), loses, duplicates,
  and drops messages on blocked links (partitions, one-way or not).
- Clients run one operation at a time (get, put, compare-and-set on a few keys) with a
  client id and a sequence number so a retried write applies once. Writes go through
  the log (proposed on the leader, or with `forward_writes` forwarded by a follower,
  which re-forwards what is unanswered on every leader change); reads use ReadIndex
  (on the leader or forwarded by a follower). A request
  to a crashed node is refused at once (a killed process's port is closed); one that
  gets no answer in time (partition, loss) is retried elsewhere, avoiding servers that
  failed it. The operation is recorded once, from first invocation to the answer, and
  stays pending if it never gets one.
- `Invariants` are checked as the run goes, on every persisted entry, every applied
  entry and every event that can make a leader: election safety, log matching, leader
  completeness, state-machine safety, one vote per term. A violation raises
  `SimulationFailure` with the seed that replays it.

`Cluster` is the lockstep twin for scenario tests: no clock and no delays, messages
delivered in FIFO order until the cluster is quiet, faults set by hand.

`run_random(seed)` is the randomized test: a nemesis injects faults for a while, then
everything heals and the run must elect a leader, commit, answer a final read per key,
lose no acknowledged write, and produce a linearizable history.
"""

from __future__ import annotations

import heapq
import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from . import linearizability
from .config import Config
from .errors import ConfChangeRefused, NotLeader, ProposalDropped
from .confchange import bootstrap_entries
from .linearizability import KVInput, OpKind, Operation
from .messages import (
    NONE,
    ConfChange,
    ConfChangeKind,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Message,
    MsgSnap,
)
from .node import Node, Ready
from .readonly import ReadState
from .storage import MemoryStorage

__all__ = [
    "NetworkConfig",
    "FaultConfig",
    "SimConfig",
    "SimulationFailure",
    "KVStore",
    "Invariants",
    "ClientOp",
    "Simulation",
    "RunReport",
    "run_random",
    "Cluster",
]


class SimulationFailure(AssertionError):
    """An invariant or an end-of-run check failed; the message names the seed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NetworkConfig:
    """Per-message behaviour of the simulated network (times in simulated ms)."""

    min_delay: int = 1
    max_delay: int = 4
    loss: float = 0.0
    duplicate: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultConfig:
    """The nemesis: one fault every `interval` ms on average, of these kinds."""

    interval: int = 150
    crash: float = 1.0
    crash_leader: float = 1.0
    bounce: float = 1.0
    """Crash and restart within a few message delays: a restart that races messages."""
    crash_mid_write: float = 1.0
    """Crash a node whose Ready is being persisted, so a random prefix of its writes
    (snapshot, entries, hard state) lands: the torn states a real crash leaves."""
    partition: float = 1.0
    isolate_leader: float = 1.0
    one_way: float = 0.5
    loss_burst: float = 0.5
    heal: float = 1.0
    max_down_ms: int = 400
    max_partition_ms: int = 600


@dataclass(frozen=True, slots=True, kw_only=True)
class SimConfig:
    voters: int = 3
    spares: int = 0
    """Extra nodes outside the cluster at start, used by membership changes."""
    tick_ms: int = 10
    election_tick: int = 10
    heartbeat_tick: int = 1
    pre_vote: bool = True
    check_quorum: bool = True
    max_size_per_msg: int = 4096
    max_inflight_msgs: int = 8
    persist_delay: tuple[int, int] = (0, 2)
    net: NetworkConfig = field(default_factory=NetworkConfig)
    clients: int = 3
    keys: tuple[str, ...] = ("x", "y")
    think_ms: tuple[int, int] = (0, 8)
    request_timeout_ms: int = 120
    snapshot_every: int = 0
    """Applied entries between state-machine snapshots; 0 turns compaction off."""
    keep_entries: int = 4
    """Entries kept behind a snapshot, so slightly lagging followers avoid a snapshot."""
    membership_changes: bool = False
    """Add each spare as a learner, promote it, then remove an original voter."""
    forward_writes: bool = False
    """A follower that knows a leader forwards a client's write to it (`Node.forward`)
    instead of redirecting the client, answers once the write is applied locally, and
    forwards its unanswered writes again whenever it learns of a new leader."""

    def raft_config(self, id: int, applied: int = 0) -> Config:
        return Config(
            id=id,
            tick_interval=self.tick_ms / 1000,
            election_tick=self.election_tick,
            heartbeat_tick=self.heartbeat_tick,
            pre_vote=self.pre_vote,
            check_quorum=self.check_quorum,
            max_size_per_msg=self.max_size_per_msg,
            max_inflight_msgs=self.max_inflight_msgs,
            applied=applied,
        )


# --- the replicated state machine ------------------------------------------------------


def encode_command(client: int, seq: int, kind: OpKind, key: str, value: str | None, expected: str | None) -> bytes:
    return json.dumps([client, seq, kind.value, key, value, expected], separators=(",", ":")).encode()


class KVStore:
    """A key-value map with compare-and-set and an exactly-once session per client.

    A write carries (client, seq); a client has one write outstanding at a time and
    retries with the same seq, so a seq at or below the session's last one is a
    duplicate: it is not applied again and answers with the first application's result.
    """

    __slots__ = ("data", "sessions", "applied")

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.sessions: dict[int, tuple[int, bool | None]] = {}
        self.applied = 0

    def apply(self, entry: Entry) -> tuple[int, int, bool | None] | None:
        self.applied = entry.index
        if entry.kind is not EntryKind.NORMAL or not entry.data:
            return None
        client, seq, kind, key, value, expected = json.loads(entry.data)
        last = self.sessions.get(client)
        if last is not None and seq <= last[0]:
            return (client, seq, last[1]) if seq == last[0] else None
        result: bool | None = None
        if kind == OpKind.PUT.value:
            self.data[key] = value
        else:
            result = self.data.get(key) == expected
            if result:
                self.data[key] = value
        self.sessions[client] = (seq, result)
        return client, seq, result

    def snapshot(self) -> bytes:
        sessions = {str(c): list(v) for c, v in self.sessions.items()}
        return json.dumps([self.data, sessions], sort_keys=True).encode()

    def restore(self, data: bytes, index: int) -> None:
        self.data = {}
        self.sessions = {}
        if data:
            kv, sessions = json.loads(data)
            self.data = dict(kv)
            self.sessions = {int(c): (v[0], v[1]) for c, v in sessions.items()}
        self.applied = index


# --- invariants -------------------------------------------------------------------------


class Invariants:
    """Raft's safety properties, checked incrementally as the simulation runs.

    - Election safety: at most one leader per term.
    - Log matching: two persisted entries with the same (index, term) have the same
      content and the same term just before them (which, by induction, makes the
      whole prefixes equal).
    - Leader completeness: a new leader's log holds every entry known committed.
    - State-machine safety: no two nodes apply different entries at one index.
    - One vote per term: a persisted vote never changes within a term; persisted terms
      and commits never go backwards.
    """

    def __init__(self, fail: Callable[[str], None]) -> None:
        self._fail = fail
        self.leaders: dict[int, int] = {}
        self.entries: dict[tuple[int, int], tuple[EntryKind, bytes, int]] = {}
        self.committed: dict[int, Entry] = {}
        self.commit_terms: dict[int, tuple[int, int]] = {}  # index -> (commit term, entry term)
        self._commit_seen = 0
        self._checked_leader: dict[int, int] = {}
        self.hard_states: dict[int, HardState] = {}

    def observe(self, node: Node) -> None:
        """Call after every input to a node: checks a leader once per term it leads."""
        if node.is_leader and self._checked_leader.get(node.id) != node.term:
            self._checked_leader[node.id] = node.term
            self._on_new_leader(node)

    def _on_new_leader(self, node: Node) -> None:
        term = node.term
        other = self.leaders.setdefault(term, node.id)
        if other != node.id:
            self._fail(f"election safety: nodes {other} and {node.id} are both leaders of term {term}")
        log = node.raft.log
        first = log.first_index()
        for index, (commit_term, entry_term) in self.commit_terms.items():
            # Only entries committed in an earlier term must be here: a leader elected
            # late in a lower term may lack what a higher term committed meanwhile.
            if index < first or commit_term >= term:
                continue
            t = log.term_or_none(index)
            if t != entry_term:
                self._fail(
                    f"leader completeness: leader {node.id} of term {term} has term {t} at index "
                    f"{index}, where an entry of term {entry_term} was committed in term {commit_term}"
                )

    def on_leader_commit(self, node: Node, commit: int) -> None:
        """A leader persisted `commit`: record the entries it committed, and in which term."""
        log = node.raft.log
        for index in range(self._commit_seen + 1, commit + 1):
            t = log.term_or_none(index)
            if t is not None:
                self.commit_terms[index] = (node.term, t)
        self._commit_seen = max(self._commit_seen, commit)

    def on_persist(self, node_id: int, storage: MemoryStorage, entries: Iterable[Entry]) -> None:
        first = storage.first_index()
        for e in entries:
            if e.index < first:
                continue
            prev = storage.term(e.index - 1)
            seen = self.entries.get((e.index, e.term))
            if seen is None:
                self.entries[(e.index, e.term)] = (e.kind, e.data, prev)
            elif seen != (e.kind, e.data, prev):
                self._fail(
                    f"log matching: node {node_id} persisted index {e.index} term {e.term} "
                    f"(prev term {prev}) unlike an earlier copy (prev term {seen[2]}, same data: {seen[1] == e.data})"
                )

    def on_hard_state(self, node_id: int, hs: HardState, node: Node | None = None) -> None:
        if node is not None and node.is_leader and node.term == hs.term:
            self.on_leader_commit(node, hs.commit)
        prev = self.hard_states.get(node_id)
        if prev is not None:
            if hs.term < prev.term:
                self._fail(f"node {node_id} persisted term {hs.term} after term {prev.term}")
            if hs.term == prev.term and prev.vote != NONE and hs.vote != prev.vote:
                self._fail(f"node {node_id} voted for {prev.vote} and then {hs.vote} in term {hs.term}")
            if hs.commit < prev.commit:
                self._fail(f"node {node_id} persisted commit {hs.commit} after commit {prev.commit}")
        self.hard_states[node_id] = hs

    def on_apply(self, node_id: int, e: Entry) -> None:
        seen = self.committed.get(e.index)
        if seen is None:
            self.committed[e.index] = e
        elif seen != e:
            self._fail(
                f"state machine safety: node {node_id} applied term {e.term} at index {e.index}, "
                f"another node applied term {seen.term} there"
            )


# --- clients ----------------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class ClientOp:
    """One client operation as recorded: from first invocation to the answer seen."""

    client: int
    seq: int
    kind: OpKind
    key: str
    value: str | None = None
    expected: str | None = None
    call: int = 0
    ret: int | None = None
    output: object = None
    retry: bool = True
    target: int = NONE
    attempt: int = 0
    failed: set[int] = field(default_factory=set)
    """Servers that timed out or refused during this operation (the client avoids them)."""

    @property
    def done(self) -> bool:
        return self.ret is not None

    def to_operation(self) -> Operation:
        return Operation(
            client=self.client,
            input=KVInput(kind=self.kind, key=self.key, value=self.value, expected=self.expected),
            call=self.call,
            ret=self.ret,
            output=self.output,
        )


# --- nodes ------------------------------------------------------------------------------


class _SimNode:
    __slots__ = (
        "id", "storage", "node", "kv", "incarnation", "in_flight", "pending_writes", "pending_reads", "waiting_reads", "conf_state", "down_until",
    )

    def __init__(self, id: int) -> None:
        self.id = id
        self.storage = MemoryStorage()
        self.node: Node | None = None
        self.kv = KVStore()
        self.incarnation = 0
        self.in_flight: Ready | None = None
        self.pending_writes: dict[tuple[int, int], ClientOp] = {}
        self.pending_reads: dict[bytes, ClientOp] = {}
        self.waiting_reads: list[tuple[int, ClientOp]] = []
        self.conf_state = ConfState()
        self.down_until = 0


# Event kinds (ints for cheap heap comparisons).
_TICK, _DELIVER, _READY_DONE, _REQUEST, _REPLY, _TIMEOUT, _CLIENT_NEXT, _CALL = range(8)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunReport:
    seed: int
    ops: int
    completed: int
    elections: int
    max_term: int
    commit: int
    snapshots_sent: int
    events: int


class Simulation:
    """A seeded cluster run. Drive it with `run_for`/`run_until` and the fault methods."""

    def __init__(self, config: SimConfig, seed: int) -> None:
        self.config = config
        self.seed = seed
        self.rng = random.Random(seed)
        self.now = 0
        self._seq = 0
        self._queue: list[tuple[int, int, int, Any]] = []
        self.events = 0
        self.net = config.net
        self.blocked: set[tuple[int, int]] = set()
        self.invariants = Invariants(self._fail)
        self.history: list[ClientOp] = []
        self.acked_writes: list[ClientOp] = []
        self.snapshots_sent = 0
        self._client_seq: dict[int, int] = {}
        self._workload_clients: set[int] = set()
        self.workload_on = False
        voters = list(range(1, config.voters + 1))
        self.nodes: dict[int, _SimNode] = {}
        entries, hs = bootstrap_entries(voters)
        for id in range(1, config.voters + config.spares + 1):
            sn = _SimNode(id)
            if id in voters:
                sn.storage.append(entries)
                sn.storage.set_hard_state(hs)
            self.nodes[id] = sn
            self._start(sn)

    # --- plumbing ----------------------------------------------------------------------

    def _fail(self, message: str) -> None:
        raise SimulationFailure(f"seed {self.seed} at t={self.now}ms: {message}")

    def _at(self, time: int, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (time, self._seq, kind, payload))

    def call_at(self, time: int, fn: Callable[[], None]) -> None:
        """Run `fn` at simulated time `time` (for scripted scenarios)."""
        self._at(time, _CALL, fn)

    def run_for(self, ms: int) -> None:
        self.run_until(lambda: False, ms)

    def run_until(self, done: Callable[[], bool], timeout_ms: int) -> bool:
        """Process events until `done()` holds (checked after each event) or time is up."""
        deadline = self.now + timeout_ms
        queue = self._queue
        while queue and queue[0][0] <= deadline:
            if done():
                return True
            time, _, kind, payload = heapq.heappop(queue)
            self.now = time
            self.events += 1
            self._dispatch(kind, payload)
        self.now = max(self.now, deadline)
        return done()

    def _dispatch(self, kind: int, payload: Any) -> None:
        if kind == _DELIVER:
            self._deliver(payload)
        elif kind == _TICK:
            id, inc = payload
            sn = self.nodes[id]
            if sn.node is not None and sn.incarnation == inc:
                sn.node.tick()
                self._after(sn)
                self._at(self.now + self.config.tick_ms, _TICK, payload)
        elif kind == _READY_DONE:
            id, inc = payload
            sn = self.nodes[id]
            if sn.node is not None and sn.incarnation == inc:
                self._complete_ready(sn)
                self._after(sn)
        elif kind == _REQUEST:
            self._request(*payload)
        elif kind == _REPLY:
            self._reply(*payload)
        elif kind == _TIMEOUT:
            op, attempt = payload
            if not op.done and op.attempt == attempt and op.retry:
                op.failed.add(op.target)
                op.target = self._pick_target(op)
                self._send_request(op)
        elif kind == _CLIENT_NEXT:
            self._workload_next(payload)
        elif kind == _CALL:
            payload()

    # --- node lifecycle ----------------------------------------------------------------

    def _start(self, sn: _SimNode) -> None:
        snap = sn.storage.snapshot()
        sn.incarnation += 1
        sn.kv.restore(snap.data, snap.index)
        sn.conf_state = snap.meta.conf_state
        sn.node = Node(
            self.config.raft_config(sn.id, applied=snap.index),
            sn.storage,
            rng=random.Random(self.rng.getrandbits(64)),
        )
        sn.in_flight = None
        phase = self.rng.randrange(1, self.config.tick_ms + 1)
        self._at(self.now + phase, _TICK, (sn.id, sn.incarnation))
        self._after(sn)

    def crash(self, id: int) -> None:
        """Kill node `id` (kill -9): unpersisted state is lost, a partial Ready may land."""
        sn = self.nodes[id]
        if sn.node is None:
            return
        rd = sn.in_flight
        if rd is not None:
            steps = self.rng.randint(0, 3)
            if steps >= 1 and rd.snapshot is not None:
                sn.storage.apply_snapshot(rd.snapshot)
            if steps >= 2 and rd.entries:
                sn.storage.append(rd.entries)
                self.invariants.on_persist(id, sn.storage, rd.entries)
            if steps >= 3 and rd.hard_state is not None:
                sn.storage.set_hard_state(rd.hard_state)
                self.invariants.on_hard_state(id, rd.hard_state)
        sn.node = None
        sn.in_flight = None
        sn.pending_writes.clear()
        sn.pending_reads.clear()
        sn.waiting_reads.clear()

    def restart(self, id: int) -> None:
        sn = self.nodes[id]
        if sn.node is None:
            self._start(sn)

    def alive(self, id: int) -> bool:
        return self.nodes[id].node is not None

    def node(self, id: int) -> Node:
        n = self.nodes[id].node
        if n is None:
            raise KeyError(f"node {id} is down")
        return n

    def kv(self, id: int) -> KVStore:
        return self.nodes[id].kv

    def leader(self) -> int | None:
        """The live node that believes it leads in the highest term, if any."""
        best: tuple[int, int] | None = None
        for sn in self.nodes.values():
            if sn.node is not None and sn.node.is_leader:
                if best is None or sn.node.term > best[0]:
                    best = (sn.node.term, sn.id)
        return best[1] if best else None

    def stable_leader(self) -> int | None:
        """A leader that has committed an entry of its term (so it can serve)."""
        id = self.leader()
        if id is None:
            return None
        r = self.node(id).raft
        return id if r.log.term_or_none(r.log.committed) == r.term else None

    def members(self) -> ConfState:
        """The membership as applied by the most advanced live node."""
        best = max(
            (sn for sn in self.nodes.values() if sn.node is not None),
            key=lambda sn: sn.kv.applied,
            default=None,
        )
        return best.conf_state if best is not None else ConfState()

    # --- the network -------------------------------------------------------------------

    def partition(self, *groups: Iterable[int]) -> None:
        """Block every link between different groups (nodes in no group are isolated)."""
        group_of: dict[int, int] = {}
        for g, members in enumerate(groups):
            for id in members:
                group_of[id] = g
        self.blocked = {
            (a, b)
            for a in self.nodes
            for b in self.nodes
            if a != b and group_of.get(a, -1 - a) != group_of.get(b, -1 - b)
        }

    def isolate(self, id: int) -> None:
        self.partition([n for n in self.nodes if n != id], [id])

    def block(self, src: int, dst: int) -> None:
        """Drop messages from `src` to `dst` only (one-way)."""
        self.blocked.add((src, dst))

    def heal(self) -> None:
        self.blocked = set()

    def set_network(self, net: NetworkConfig) -> None:
        self.net = net

    def _send(self, m: Message) -> None:
        net = self.net
        rng = self.rng
        if (m.src, m.dst) in self.blocked or m.dst not in self.nodes or (net.loss and rng.random() < net.loss):
            if isinstance(m, MsgSnap):
                self.call_at(self.now + net.max_delay, lambda: self._report_snapshot(m, False))
            return
        self._at(self.now + rng.randint(net.min_delay, net.max_delay), _DELIVER, m)
        if net.duplicate and rng.random() < net.duplicate:
            self._at(self.now + rng.randint(net.min_delay, net.max_delay * 3), _DELIVER, m)

    def _report_snapshot(self, m: MsgSnap, ok: bool) -> None:
        # The transport's report: the snapshot stream to m.dst finished or broke.
        sender = self.nodes[m.src].node
        if sender is not None:
            sender.report_snapshot(m.dst, ok)
            self._after(self.nodes[m.src])

    def _deliver(self, m: Message) -> None:
        sn = self.nodes[m.dst]
        if isinstance(m, MsgSnap):
            self.snapshots_sent += 1
            self._report_snapshot(m, sn.node is not None)
        if sn.node is None:
            return
        sn.node.step(m)
        self._after(sn)

    # --- carrying out Ready ------------------------------------------------------------

    def _after(self, sn: _SimNode) -> None:
        """After any input to a node: check leadership, then take and run its Ready."""
        node = sn.node
        if node is None:
            return
        self.invariants.observe(node)
        while sn.in_flight is None and sn.node is node and node.has_ready():
            rd = node.ready()
            sn.in_flight = rd
            # A leader's appends leave before its own fsync (Ready, step 0).
            for m in rd.early_messages:
                self._send(m)
            lo, hi = self.config.persist_delay
            delay = self.rng.randint(lo, hi) if rd.must_sync else 0
            if delay:
                self._at(self.now + delay, _READY_DONE, (sn.id, sn.incarnation))
                return
            self._complete_ready(sn)
            self.invariants.observe(node)

    def _complete_ready(self, sn: _SimNode) -> None:
        rd = sn.in_flight
        node = sn.node
        assert rd is not None and node is not None
        storage = sn.storage
        if rd.snapshot is not None:
            storage.apply_snapshot(rd.snapshot)
            sn.kv.restore(rd.snapshot.data, rd.snapshot.index)
            sn.conf_state = rd.snapshot.meta.conf_state
        if rd.entries:
            storage.append(rd.entries)
            self.invariants.on_persist(sn.id, storage, rd.entries)
        if rd.hard_state is not None:
            storage.set_hard_state(rd.hard_state)
            self.invariants.on_hard_state(sn.id, rd.hard_state, node)
        for m in rd.messages:
            self._send(m)
        if self.config.forward_writes and rd.soft_state is not None and rd.soft_state.lead != NONE:
            self._reforward(sn, node)
        for e in rd.committed_entries:
            self.invariants.on_apply(sn.id, e)
            if e.kind is EntryKind.CONF_CHANGE:
                sn.conf_state = node.apply_conf_change(ConfChange.decode(e.data))
                sn.kv.applied = e.index
                continue
            applied = sn.kv.apply(e)
            if applied is not None:
                client, seq, result = applied
                op = sn.pending_writes.pop((client, seq), None)
                if op is not None:
                    self._reply_later(op, op.attempt, "ok", result)
        for rs in rd.read_states:
            op = sn.pending_reads.pop(rs.context, None)
            if op is not None:
                sn.waiting_reads.append((rs.index, op))
        if sn.waiting_reads:
            still = []
            for index, op in sn.waiting_reads:
                if sn.kv.applied >= index:
                    self._reply_later(op, op.attempt, "ok", sn.kv.data.get(op.key))
                else:
                    still.append((index, op))
            sn.waiting_reads = still
        cfg = self.config
        if cfg.snapshot_every and sn.kv.applied - storage.snapshot().index >= cfg.snapshot_every:
            snap = storage.create_snapshot(sn.kv.applied, sn.conf_state, sn.kv.snapshot())
            storage.compact(max(snap.index - cfg.keep_entries, 0))
        node.advance(rd)
        sn.in_flight = None

    # --- clients -----------------------------------------------------------------------

    def submit(
        self,
        client: int,
        kind: OpKind,
        key: str,
        value: str | None = None,
        expected: str | None = None,
        *,
        target: int = NONE,
        retry: bool = True,
    ) -> ClientOp:
        """Invoke an operation now; `retry=False` pins it to `target` with no retries."""
        seq = self._client_seq.get(client, 0) + 1
        self._client_seq[client] = seq
        op = ClientOp(
            client=client, seq=seq, kind=kind, key=key, value=value, expected=expected,
            call=self.now, retry=retry, target=target,
        )
        self.history.append(op)
        self._send_request(op)
        return op

    def _send_request(self, op: ClientOp) -> None:
        if op.target == NONE:
            op.target = self.rng.choice(list(self.nodes))
        op.attempt += 1
        self._at(self.now + self.rng.randint(1, 2), _REQUEST, (op, op.attempt, op.target))
        self._at(self.now + self.config.request_timeout_ms, _TIMEOUT, (op, op.attempt))

    def _reply_later(self, op: ClientOp, attempt: int, status: str, value: object) -> None:
        self._at(self.now + self.rng.randint(1, 2), _REPLY, (op, attempt, status, value))

    def _request(self, op: ClientOp, attempt: int, target: int) -> None:
        sn = self.nodes[target]
        node = sn.node
        if node is None:
            # A killed process's port is closed: the client learns at once (RST).
            op.failed.add(target)
            self._reply_later(op, attempt, "redirect", NONE)
            return
        try:
            if op.kind is OpKind.GET:
                ctx = f"{op.client}:{op.seq}:{attempt}".encode()
                node.read_index(ctx)
                sn.pending_reads[ctx] = op
            else:
                session = sn.kv.sessions.get(op.client)
                if session is not None and session[0] == op.seq:
                    self._reply_later(op, attempt, "ok", session[1])  # already applied here
                    return
                data = encode_command(op.client, op.seq, op.kind, op.key, op.value, op.expected)
                if self.config.forward_writes and not node.is_leader:
                    node.forward([data])  # NotLeader(0) without a leader: the client retries
                else:
                    node.propose(data)
                sn.pending_writes[(op.client, op.seq)] = op
        except NotLeader as e:
            self._reply_later(op, attempt, "redirect", e.leader_hint)
        except ProposalDropped:
            self._reply_later(op, attempt, "redirect", NONE)
        self._after(sn)

    def _reforward(self, sn: _SimNode, node: Node) -> None:
        """A new leader is known: send every write still waiting here to it again (or
        propose it, if that leader is us). Some may already be in the log; the
        sessions apply each once."""
        datas = [
            encode_command(op.client, op.seq, op.kind, op.key, op.value, op.expected)
            for op in sn.pending_writes.values()
            if not op.done
        ]
        if not datas:
            return
        try:
            if node.is_leader:
                node.propose_many(datas)
            else:
                node.forward(datas)
        except (NotLeader, ProposalDropped):
            pass  # the clients' own retries cover it

    def _reply(self, op: ClientOp, attempt: int, status: str, value: object) -> None:
        if op.done or op.attempt != attempt:
            return
        if status == "ok":
            op.ret = self.now
            op.output = value
            if op.kind is not OpKind.GET:
                self.acked_writes.append(op)
            if op.client in self._workload_clients:
                lo, hi = self.config.think_ms
                self._at(self.now + self.rng.randint(lo, hi), _CLIENT_NEXT, op.client)
            return
        if not op.retry:
            return
        hint = value if isinstance(value, int) and value in self.nodes else NONE
        # A follower's hint may name a leader that just died: skip servers that
        # failed this operation, unless every server has.
        op.target = hint if hint != NONE and hint not in op.failed else self._pick_target(op)
        # Back off a little so a leaderless cluster is not hammered.
        self.call_at(self.now + self.rng.randint(2, 10), lambda: self._resend(op, attempt))

    def _pick_target(self, op: ClientOp) -> int:
        candidates = [id for id in self.nodes if id not in op.failed]
        if not candidates:
            op.failed.clear()
            candidates = list(self.nodes)
        return self.rng.choice(candidates)

    def _resend(self, op: ClientOp, attempt: int) -> None:
        if not op.done and op.attempt == attempt:
            self._send_request(op)

    def start_workload(self) -> None:
        """Start `config.clients` clients, each looping over random operations."""
        self.workload_on = True
        for c in range(1, self.config.clients + 1):
            self._workload_clients.add(c)
            self._at(self.now + self.rng.randint(0, 5), _CLIENT_NEXT, c)

    def stop_workload(self) -> None:
        self.workload_on = False

    def _workload_next(self, client: int) -> None:
        if not self.workload_on:
            return
        rng = self.rng
        key = rng.choice(self.config.keys)
        r = rng.random()
        seq = self._client_seq.get(client, 0) + 1
        value = f"{client}.{seq}"
        if r < 0.4:
            self.submit(client, OpKind.GET, key)
        elif r < 0.85:
            self.submit(client, OpKind.PUT, key, value)
        else:
            # Compare-and-set against a value this client may have seen.
            seen = [o.output for o in self.history[-8:] if o.key == key and o.kind is OpKind.GET and o.done]
            expected = rng.choice(seen) if seen and rng.random() < 0.8 else None
            self.submit(client, OpKind.CAS, key, value, expected if isinstance(expected, str) else None)

    # --- membership --------------------------------------------------------------------

    def propose_conf_change(self, cc: ConfChange) -> bool:
        """Propose at the current leader; False if there is none or it refused."""
        id = self.stable_leader()
        if id is None:
            return False
        try:
            self.node(id).propose_conf_change(cc)
        except (ConfChangeRefused, NotLeader, ProposalDropped):
            return False
        self._after(self.nodes[id])
        return True

    def caught_up(self, id: int, within: int = 0) -> bool:
        """Does the leader see `id` within `within` entries of its last index?"""
        lid = self.stable_leader()
        if lid is None:
            return False
        st = self.node(lid).status()
        pr = st.progress.get(id)
        return pr is not None and pr.match + within >= st.last_index

    # --- checks ------------------------------------------------------------------------

    def operations(self) -> list[Operation]:
        return [op.to_operation() for op in self.history]

    def check_linearizable(self) -> linearizability.CheckResult:
        result = linearizability.check(self.operations())
        if not result.ok:
            self._fail(f"history is {result.verdict.value}:\n{result.explain()}")
        return result

    def check_no_acked_write_lost(self) -> None:
        """Every live member applied every acknowledged write (sessions cover them)."""
        members = self.members().voters
        for id in sorted(members):
            kv = self.nodes[id].kv
            for op in self.acked_writes:
                session = kv.sessions.get(op.client)
                if session is None or session[0] < op.seq:
                    self._fail(f"acknowledged write lost on node {id}: {op.to_operation()}")

    def converge(self, timeout_ms: int) -> None:
        """Heal everything, restart the dead, and wait for one leader and equal state."""
        self.heal()
        self.set_network(replace(self.net, loss=0.0, duplicate=0.0))
        for id, sn in self.nodes.items():
            if sn.node is None:
                self.restart(id)

        def settled() -> bool:
            lid = self.stable_leader()
            if lid is None:
                return False
            leader = self.nodes[lid]
            commit = leader.node.raft.log.committed if leader.node else 0
            for id in leader.conf_state.voters | leader.conf_state.learners:
                sn = self.nodes[id]
                if sn.node is None or sn.kv.applied < commit:
                    return False
            return True

        if not self.run_until(settled, timeout_ms):
            self._fail(
                f"liveness: no leader with all members caught up {timeout_ms}ms after healing "
                f"(leader={self.leader()}, {self.describe()})"
            )

    def describe(self) -> str:
        parts = []
        for id, sn in self.nodes.items():
            if sn.node is None:
                parts.append(f"{id}:down")
            else:
                r = sn.node.raft
                parts.append(
                    f"{id}:{r.role.value} t{r.term} lead={r.lead} commit={r.log.committed} "
                    f"applied={sn.kv.applied} last={r.log.last_index()} voters={sorted(r.tracker.voters)}"
                )
        return "; ".join(parts)

    def report(self) -> RunReport:
        return RunReport(
            seed=self.seed,
            ops=len(self.history),
            completed=sum(1 for o in self.history if o.done),
            elections=len(self.invariants.leaders),
            max_term=max(self.invariants.leaders, default=0),
            commit=max((sn.node.raft.log.committed for sn in self.nodes.values() if sn.node), default=0),
            snapshots_sent=self.snapshots_sent,
            events=self.events,
        )


# --- the nemesis ------------------------------------------------------------------------


class _Nemesis:
    """Random faults: crashes, partitions, one-way links, loss bursts; and membership."""

    def __init__(self, sim: Simulation, faults: FaultConfig) -> None:
        self.sim = sim
        self.faults = faults
        self.active = True
        self.base_net = sim.net
        self.plan: list[ConfChange] = []
        self.plan_step = 0
        self.pending: ConfChange | None = None
        cfg = sim.config
        if cfg.membership_changes and cfg.spares:
            voters = list(range(1, cfg.voters + 1))
            spares = list(range(cfg.voters + 1, cfg.voters + cfg.spares + 1))
            for s in spares:
                gone = voters.pop(sim.rng.randrange(len(voters)))
                self.plan += [
                    ConfChange(kind=ConfChangeKind.ADD_LEARNER, node_id=s),
                    ConfChange(kind=ConfChangeKind.ADD_VOTER, node_id=s),
                    ConfChange(kind=ConfChangeKind.REMOVE_NODE, node_id=gone),
                ]

    def start(self) -> None:
        self._schedule()
        if self.plan:
            self.sim.call_at(self.sim.now + 50, self._membership)

    def stop(self) -> None:
        self.active = False

    def _schedule(self) -> None:
        rng = self.sim.rng
        self.sim.call_at(self.sim.now + rng.randint(1, 2 * self.faults.interval), self._act)

    def _act(self) -> None:
        if not self.active:
            return
        sim, f, rng = self.sim, self.faults, self.sim.rng
        kinds = [
            "crash", "crash_leader", "bounce", "crash_mid_write",
            "partition", "isolate_leader", "one_way", "loss_burst", "heal",
        ]
        weights = [
            f.crash, f.crash_leader, f.bounce, f.crash_mid_write,
            f.partition, f.isolate_leader, f.one_way, f.loss_burst, f.heal,
        ]
        kind = rng.choices(kinds, weights)[0]
        ids = list(sim.nodes)
        if kind == "crash_mid_write":
            writing = [id for id, sn in sim.nodes.items() if sn.in_flight is not None]
            if not writing:
                # Nothing is being written now: look again very soon.
                sim.call_at(sim.now + 1, self._crash_mid_write)
                self._schedule()
                return
            kind = "crash"
            ids = writing
        if kind in ("crash", "crash_leader", "bounce"):
            target = sim.leader() if kind == "crash_leader" else rng.choice(ids)
            if target is not None and sim.alive(target):
                sim.crash(target)
                down = rng.randint(1, 2 * sim.net.max_delay if kind == "bounce" else f.max_down_ms)
                sim.call_at(sim.now + down, lambda: self._restart(target))
        elif kind in ("partition", "isolate_leader"):
            if kind == "isolate_leader" and sim.leader() is not None:
                lid = sim.leader()
                assert lid is not None
                sim.isolate(lid)
            else:
                shuffled = ids[:]
                rng.shuffle(shuffled)
                cut = rng.randint(1, len(shuffled) - 1)
                sim.partition(shuffled[:cut], shuffled[cut:])
            sim.call_at(sim.now + rng.randint(20, f.max_partition_ms), self._heal)
        elif kind == "one_way":
            a, b = rng.sample(ids, 2)
            sim.block(a, b)
            sim.call_at(sim.now + rng.randint(20, f.max_partition_ms), self._heal)
        elif kind == "loss_burst":
            sim.set_network(replace(self.base_net, loss=rng.uniform(0.1, 0.5)))
            sim.call_at(sim.now + rng.randint(20, f.max_partition_ms), self._restore_net)
        else:
            sim.heal()
        self._schedule()

    def _crash_mid_write(self, tries: int = 20) -> None:
        sim = self.sim
        if not self.active:
            return
        writing = [id for id, sn in sim.nodes.items() if sn.in_flight is not None]
        if not writing:
            if tries > 0:
                sim.call_at(sim.now + 1, lambda: self._crash_mid_write(tries - 1))
            return
        target = sim.rng.choice(writing)
        sim.crash(target)
        sim.call_at(sim.now + sim.rng.randint(1, self.faults.max_down_ms), lambda: self._restart(target))

    def _restart(self, id: int) -> None:
        if self.active:
            self.sim.restart(id)

    def _heal(self) -> None:
        if self.active:
            self.sim.heal()

    def _restore_net(self) -> None:
        if self.active:
            self.sim.set_network(self.base_net)

    def _membership(self) -> None:
        sim = self.sim
        if self.plan_step >= len(self.plan):
            return
        cc = self.plan[self.plan_step]
        members = sim.members()
        done = {
            ConfChangeKind.ADD_LEARNER: cc.node_id in members.learners or cc.node_id in members.voters,
            ConfChangeKind.ADD_VOTER: cc.node_id in members.voters,
            ConfChangeKind.REMOVE_NODE: cc.node_id not in members.members(),
        }[cc.kind]
        if done:
            self.plan_step += 1
        elif cc.kind is not ConfChangeKind.ADD_VOTER or sim.caught_up(cc.node_id, within=5):
            # Promote a learner only once it has caught up.
            sim.propose_conf_change(cc)
        sim.call_at(sim.now + sim.rng.randint(20, 80), self._membership)


def run_random(
    seed: int,
    config: SimConfig | None = None,
    *,
    faults: FaultConfig | None = None,
    fault_ms: int = 1500,
    settle_ms: int = 4000,
) -> RunReport:
    """One randomized run: workload + nemesis for `fault_ms`, then heal and check.

    Raises `SimulationFailure` (naming the seed) when any invariant or check fails.
    """
    cfg = config if config is not None else SimConfig()
    sim = Simulation(cfg, seed)
    nemesis = _Nemesis(sim, faults if faults is not None else FaultConfig())
    sim.start_workload()
    nemesis.start()
    sim.run_for(fault_ms)
    nemesis.stop()
    sim.converge(settle_ms)
    # Liveness: the healed cluster commits new writes within a bound.
    if nemesis.plan and nemesis.plan_step < len(nemesis.plan):
        nemesis.active = True
        nemesis.faults = replace(nemesis.faults, interval=1 << 30)
        if not sim.run_until(lambda: nemesis.plan_step >= len(nemesis.plan), settle_ms):
            sim._fail(f"membership changes did not finish after healing: step {nemesis.plan_step} of {len(nemesis.plan)}")
        nemesis.active = False
    sim.stop_workload()
    # Let open operations finish (or stay pending), then read every key once more.
    sim.run_for(cfg.request_timeout_ms * 3)
    finals = [sim.submit(10_000 + i, OpKind.GET, key) for i, key in enumerate(cfg.keys)]
    if not sim.run_until(lambda: all(op.done for op in finals), settle_ms):
        sim._fail(f"liveness: final reads did not complete ({sim.describe()})")
    sim.converge(settle_ms)
    sim.check_no_acked_write_lost()
    sim.check_linearizable()
    return sim.report()


# --- the lockstep harness ---------------------------------------------------------------


class Cluster:
    """Nodes over MemoryStorage with synchronous, FIFO message delivery.

    `deliver()` runs every node's Ready (persist, send, apply, advance) and steps every
    queued message until nothing is left. Blocked links and `drop` filter messages.
    The application state of each node is the list of data it applied (`applied`),
    its snapshot that list joined with newlines. Invariants are checked throughout.
    """

    def __init__(
        self,
        voters: int = 3,
        *,
        spares: int = 0,
        seed: int = 0,
        pre_vote: bool = True,
        check_quorum: bool = True,
        election_tick: int = 10,
        heartbeat_tick: int = 1,
        max_size_per_msg: int = 1 << 20,
        max_inflight_msgs: int = 256,
    ) -> None:
        self.rng = random.Random(seed)
        self._template = Config(
            id=1,
            election_tick=election_tick,
            heartbeat_tick=heartbeat_tick,
            pre_vote=pre_vote,
            check_quorum=check_quorum,
            max_size_per_msg=max_size_per_msg,
            max_inflight_msgs=max_inflight_msgs,
        )
        self.invariants = Invariants(self._fail)
        self.storages: dict[int, MemoryStorage] = {}
        self.nodes: dict[int, Node | None] = {}
        self.applied: dict[int, list[bytes]] = {}
        self.conf: dict[int, ConfState] = {}
        self.read_states: dict[int, list[ReadState]] = {}
        self.blocked: set[tuple[int, int]] = set()
        self.drop: Callable[[Message], bool] | None = None
        self.queue: list[Message] = []
        self.sent: list[Message] = []
        """Every message handed to the network (delivered or not), for assertions."""
        ids = list(range(1, voters + 1))
        entries, hs = bootstrap_entries(ids)
        for id in range(1, voters + spares + 1):
            storage = MemoryStorage()
            if id in ids:
                storage.append(entries)
                storage.set_hard_state(hs)
            self.storages[id] = storage
            self.nodes[id] = None
            self.restart(id)
        self.deliver()

    def _fail(self, message: str) -> None:
        raise SimulationFailure(message)

    def node(self, id: int) -> Node:
        n = self.nodes[id]
        if n is None:
            raise KeyError(f"node {id} is down")
        return n

    def restart(self, id: int) -> None:
        """(Re)create node `id` from its storage: only persisted state survives."""
        storage = self.storages[id]
        snap = storage.snapshot()
        self.applied[id] = snap.data.split(b"\n") if snap.data else []
        self.conf[id] = snap.meta.conf_state
        self.read_states[id] = []
        config = replace(self._template, id=id, applied=snap.index)
        self.nodes[id] = Node(config, storage, rng=random.Random(self.rng.getrandbits(64)))
        self.deliver()

    def crash(self, id: int) -> None:
        self.nodes[id] = None

    def leader(self) -> int | None:
        best: tuple[int, int] | None = None
        for id, n in self.nodes.items():
            if n is not None and n.is_leader and (best is None or n.term > best[0]):
                best = (n.term, id)
        return best[1] if best else None

    # --- faults ------------------------------------------------------------------------

    def isolate(self, id: int) -> None:
        for other in self.nodes:
            if other != id:
                self.blocked |= {(id, other), (other, id)}

    def cut(self, a: int, b: int) -> None:
        self.blocked |= {(a, b), (b, a)}

    def heal(self) -> None:
        self.blocked = set()
        self.drop = None

    # --- driving -----------------------------------------------------------------------

    def tick(self, id: int, times: int = 1) -> None:
        for _ in range(times):
            self.node(id).tick()
            self.deliver()

    def tick_all(self, times: int = 1) -> None:
        """Tick every live node once per round, delivering after each round."""
        for _ in range(times):
            for n in self.nodes.values():
                if n is not None:
                    n.tick()
            self.deliver()

    def campaign(self, id: int) -> None:
        self.node(id).campaign()
        self.deliver()

    def propose(self, id: int, data: bytes) -> int:
        index = self.node(id).propose(data)
        self.deliver()
        return index

    def read_index(self, id: int, context: bytes) -> None:
        self.node(id).read_index(context)
        self.deliver()

    def compact(self, id: int, keep: int = 0) -> None:
        """Snapshot node `id`'s applied state and drop its log behind it."""
        storage = self.storages[id]
        index = self.node(id).status().applied
        if index > storage.snapshot().index:
            storage.create_snapshot(index, self.conf[id], b"\n".join(self.applied[id]))
        storage.compact(max(storage.snapshot().index - keep, 0))

    def deliver(self, max_steps: int = 1_000_000) -> None:
        """Run Readies and deliver messages until the cluster is quiet."""
        for _ in range(max_steps):
            progressed = False
            for id, n in self.nodes.items():
                if n is not None and n.has_ready():
                    self._handle_ready(id, n)
                    progressed = True
            if self.queue:
                m = self.queue.pop(0)
                target = self.nodes.get(m.dst)
                if target is not None and (m.src, m.dst) not in self.blocked and not (self.drop and self.drop(m)):
                    target.step(m)
                    self.invariants.observe(target)
                progressed = True
            if not progressed:
                return
        raise SimulationFailure(f"cluster did not quiesce within {max_steps} steps")

    def _handle_ready(self, id: int, n: Node) -> None:
        rd = n.ready()
        storage = self.storages[id]
        if rd.snapshot is not None:
            storage.apply_snapshot(rd.snapshot)
            self.applied[id] = rd.snapshot.data.split(b"\n") if rd.snapshot.data else []
            self.conf[id] = rd.snapshot.meta.conf_state
        if rd.entries:
            storage.append(rd.entries)
            self.invariants.on_persist(id, storage, rd.entries)
        if rd.hard_state is not None:
            storage.set_hard_state(rd.hard_state)
            self.invariants.on_hard_state(id, rd.hard_state, n)
        self.queue.extend(rd.early_messages + rd.messages)
        self.sent.extend(rd.early_messages + rd.messages)
        for e in rd.committed_entries:
            self.invariants.on_apply(id, e)
            if e.kind is EntryKind.CONF_CHANGE:
                self.conf[id] = n.apply_conf_change(ConfChange.decode(e.data))
            elif e.data:
                self.applied[id].append(e.data)
        self.read_states[id].extend(rd.read_states)
        n.advance(rd)
        self.invariants.observe(n)
