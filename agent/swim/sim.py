"""A deterministic simulator for SWIM groups: fake clock, seeded network, faults, checkers.

Rules:
- Pure like the core: no clock, no sockets, no threads, no global random. One `seed`
  fixes everything (the network's draws and every member's `rng`, derived from the seed
  and the member's name and life), so one seed replays one run exactly.
- Time advances only through the event queue: member ticks (at each member's
  `next_deadline()`), datagram and stream deliveries, and scheduled actions.
- The network drops each datagram with the link's loss probability, delays it by
  `delay + U(0, jitter)` (plus `reorder_delay` with probability `reorder`, so packets
  overtake each other), and delivers a second copy with probability `duplicate`. Streams
  (TCP) are reliable but take `stream_delay`. Partitions (any sets of members) and
  one-way blocks drop both kinds of traffic; loss and delay apply only to datagrams.
- A paused member neither ticks nor handles anything; what arrives meanwhile waits in its
  backlog (like a socket buffer, up to `backlog_limit`) and is handled on resume, in
  arrival order, before its overdue timers (the core detects the stall itself).
- A crashed member stops for good; a restart is a new life (new `Swim`, incarnation 0)
  with the same name and address, which rejoins through seeds. Joins are retried with
  back-off (1 s, doubling, at most 30 s) until a seed answered, as the shell does.
- Reachability checks (`Ready.checks`, a TCP connect to the target's gossip port) see
  the target's host, not its process: a crashed agent (`crash`, kill -9) or one gone
  after leaving is on a host that is up, which refuses; a running or paused agent's host
  accepts (a stopped process's listening socket still completes handshakes); a host that
  is off (`power_off`), cut off, unknown, or whose SYN or answer is lost (datagram loss,
  drawn once each way) gives no answer, reported when the check's timeout runs out.
- `add_converged` starts members that already know each other, for large groups.
- Observers run after every step that produced events and see those events; the
  `FalseDeadChecker` counts DEAD or LEAVE declarations about members that are running.

How it works: a binary heap of (time, sequence, kind, ...) tuples; a member's pending
tick is invalidated lazily (an entry whose time is no longer the member's `tick_at` is
skipped). After every call into a member the simulator drains `ready()`, routes packets
and streams, runs observers and reschedules the member's tick.
"""

from __future__ import annotations

import enum
import heapq
from random import Random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from shoal.agent.swim.config import Config
from shoal.agent.swim.member import Address, Member, Meta, State, make_meta
from shoal.agent.swim.messages import Compound, Message, PushPull
from shoal.agent.swim.node import EventKind, MemberEvent, Swim
from shoal.agent.swim.reach import Reach, ReachCheck

__all__ = [
    "Network",
    "Status",
    "SimNode",
    "Stats",
    "Observer",
    "FalseDead",
    "FalseDeadChecker",
    "DeathRecorder",
    "Sim",
]

_TICK = 0
_PACKET = 1
_STREAM = 2
_CALL = 3
_CHECK = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class Network:
    """The default link model (seconds, probabilities)."""

    loss: float = 0.0
    delay: float = 0.0002  # one-way latency of a LAN switch hop
    jitter: float = 0.0008  # uniform extra delay: packets sent close together may reorder
    reorder: float = 0.0
    reorder_delay: float = 0.02
    duplicate: float = 0.0
    stream_delay: float = 0.002  # TCP connect + transfer on a LAN
    backlog_limit: int = 100_000  # datagrams a paused member buffers (its socket buffer)


class Status(enum.Enum):
    """What a simulated member really is doing (the ground truth checkers compare with)."""

    RUNNING = "running"
    PAUSED = "paused"
    CRASHED = "crashed"
    LEFT = "left"  # left gracefully; stops after the linger time


class SimNode:
    """One simulated host: its current `Swim` life and what the simulator knows of it."""

    __slots__ = (
        "name", "address", "meta", "swim", "status", "stopped", "tick_at", "backlog",
        "group", "life", "prior_incarnation", "host_up",
    )

    def __init__(self, name: str, address: Address, meta: Meta, swim: Swim) -> None:
        self.name = name
        self.address = address
        self.meta = meta
        self.swim = swim
        self.status = Status.RUNNING
        self.stopped = False  # crashed, or gone after leaving: deliveries are dropped
        self.tick_at = float("inf")
        self.backlog: list[tuple[int, object, Address]] = []
        self.group = 0
        self.life = 0
        self.prior_incarnation = -1  # highest incarnation of any earlier life
        self.host_up = True  # its kernel answers TCP (refuses when the agent is stopped)

    @property
    def running(self) -> bool:
        """Running or paused: a member that should not be declared dead."""
        return self.status is Status.RUNNING or self.status is Status.PAUSED


@dataclass(slots=True)
class Stats:
    """Traffic counters since the start (take two `snapshot()`s for a window)."""

    packets: int = 0
    messages: int = 0
    streams: int = 0
    dropped: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    packets_by_node: dict[str, int] = field(default_factory=dict)
    checks: dict[Reach, int] = field(default_factory=lambda: dict.fromkeys(Reach, 0))

    def per_member_per_period(self, members: int, seconds: float, period: float) -> float:
        """Datagrams each member sent per protocol period, on average."""
        return self.packets / (members * seconds / period)

    def snapshot(self) -> Stats:
        """A copy to subtract from later."""
        return Stats(
            packets=self.packets, messages=self.messages, streams=self.streams,
            dropped=self.dropped, by_kind=dict(self.by_kind),
            packets_by_node=dict(self.packets_by_node), checks=dict(self.checks),
        )

    def since(self, earlier: Stats) -> Stats:
        """Counts between `earlier` and now."""
        return Stats(
            packets=self.packets - earlier.packets,
            messages=self.messages - earlier.messages,
            streams=self.streams - earlier.streams,
            dropped=self.dropped - earlier.dropped,
            by_kind={k: v - earlier.by_kind.get(k, 0) for k, v in self.by_kind.items()},
            packets_by_node={
                k: v - earlier.packets_by_node.get(k, 0) for k, v in self.packets_by_node.items()
            },
            checks={k: v - earlier.checks.get(k, 0) for k, v in self.checks.items()},
        )


Observer = Callable[["Sim", SimNode, tuple[MemberEvent, ...]], None]
"""Called after every step of `node` that produced events."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FalseDead:
    """A member that was running was declared dead (or left) by `observer`."""

    time: float
    observer: str
    member: str
    incarnation: int
    kind: EventKind
    paused: bool  # the member was paused at that moment
    cut_off: bool  # the member and the observer were partitioned at that moment


class FalseDeadChecker:
    """Counts DEAD/LEAVE events about members that are running (their current life)."""

    def __init__(self) -> None:
        self.found: list[FalseDead] = []

    def __call__(self, sim: Sim, node: SimNode, events: tuple[MemberEvent, ...]) -> None:
        for e in events:
            if e.kind is not EventKind.DEAD and e.kind is not EventKind.LEAVE:
                continue
            truth = sim.nodes.get(e.member.name)
            if truth is None or not truth.running or e.member.incarnation <= truth.prior_incarnation:
                continue
            self.found.append(
                FalseDead(
                    time=sim.now, observer=node.name, member=e.member.name,
                    incarnation=e.member.incarnation, kind=e.kind,
                    paused=truth.status is Status.PAUSED,
                    cut_off=not sim.connected(node.name, truth.name),
                )
            )

    def count(self, *, loss_only: bool = False) -> int:
        """How many; with `loss_only`, only those about unpaused, connected members."""
        if not loss_only:
            return len(self.found)
        return sum(1 for f in self.found if not f.paused and not f.cut_off)


class DeathRecorder:
    """The first time each observer saw each member DEAD (or LEFT)."""

    def __init__(self) -> None:
        self.first: dict[tuple[str, str], float] = {}

    def __call__(self, sim: Sim, node: SimNode, events: tuple[MemberEvent, ...]) -> None:
        for e in events:
            if e.kind is EventKind.DEAD or e.kind is EventKind.LEAVE:
                self.first.setdefault((node.name, e.member.name), sim.now)

    def seen_by(self, member: str) -> dict[str, float]:
        """Observer name -> time it first saw `member` dead."""
        return {o: t for (o, m), t in self.first.items() if m == member}


class Sim:
    """A group of simulated members on a simulated network."""

    def __init__(
        self,
        *,
        seed: int,
        config: Config | None = None,
        network: Network | None = None,
        size_of: Callable[[Message], int] | None = None,
        count_kinds: bool = True,
    ) -> None:
        self.seed = seed
        self.config = config if config is not None else Config.lan()
        self.network = network if network is not None else Network()
        self.rng = Random(f"shoal-sim:{seed}")
        self.now = 0.0
        self.nodes: dict[str, SimNode] = {}
        self.observers: list[Observer] = []
        self.stats = Stats()
        self._size_of = size_of
        self._count_kinds = count_kinds
        self._by_addr: dict[Address, SimNode] = {}
        self._heap: list[tuple[float, int, int, str, object, Address | None]] = []
        self._seq = 0
        self._link_loss: dict[tuple[str, str], float] = {}
        self._blocked: set[tuple[str, str]] = set()
        self._port = 7421

    # ------------------------------------------------------------------ building

    def add(
        self,
        name: str,
        *,
        join: Sequence[str] = (),
        meta: Meta | Mapping[str, str] = (),
        address: Address | None = None,
    ) -> SimNode:
        """Start a member now and join it through the named seeds."""
        if name in self.nodes:
            raise ValueError(f"member {name!r} already exists; use restart()")
        if address is None:
            address = (f"10.{len(self.nodes) // 250}.{len(self.nodes) % 250}.1", self._port)
        node = SimNode(name, address, make_meta(meta), self._new_swim(name, address, make_meta(meta), 0))
        self.nodes[name] = node
        self._by_addr[address] = node
        if join:
            self._join(node, join, node.life, 1.0)
        self._flush(node)
        return node

    def _join(self, node: SimNode, seeds: Sequence[str], life: int, backoff: float) -> None:
        """Join through `seeds`, retrying with back-off until someone answered (the shell's
        `--join` does the same)."""
        if node.life != life or node.stopped or node.status is Status.LEFT:
            return
        if node.swim.live_count > 1:
            return
        if node.status is Status.RUNNING:
            node.swim.join([self.nodes[s].address for s in seeds], self.now)
            self._flush(node)
        self.at(self.now + backoff, lambda: self._join(node, seeds, life, min(backoff * 2, 30.0)))

    def add_converged(self, names: Sequence[str], *, meta: Meta | Mapping[str, str] = ()) -> None:
        """Start members that already know each other (all ALIVE, incarnation 0).

        Skips the join traffic, which dominates simulations of thousands of members.
        """
        m = make_meta(meta)
        addresses = {
            name: (f"10.{(len(self.nodes) + i) // 250}.{(len(self.nodes) + i) % 250}.1", self._port)
            for i, name in enumerate(names)
        }
        view = {
            name: Member(name=name, address=addr, incarnation=0, state=State.ALIVE, meta=m, state_change=self.now)
            for name, addr in addresses.items()
        }
        for name, addr in addresses.items():
            swim = self._new_swim(name, addr, m, 0, initial=view)
            node = SimNode(name, addr, m, swim)
            self.nodes[name] = node
            self._by_addr[addr] = node
            self._schedule_tick(node)

    def _new_swim(
        self, name: str, address: Address, meta: Meta, life: int, initial: Mapping[str, Member] | None = None
    ) -> Swim:
        return Swim(
            self.config, name, address, meta,
            Random(f"shoal-sim:{self.seed}:{name}:{life}"), self.now,
            size_of=self._size_of, initial_members=initial,
        )

    # ------------------------------------------------------------------ faults

    def crash(self, name: str) -> None:
        """Stop a member's agent for good (kill -9, a crash): its host stays up and
        refuses connections to the gossip port."""
        node = self.nodes[name]
        node.status = Status.CRASHED
        node.stopped = True
        node.backlog.clear()
        node.prior_incarnation = max(node.prior_incarnation, node.swim.local.incarnation)

    def power_off(self, name: str) -> None:
        """Stop a member's whole host (power off, link down): nothing answers at all."""
        self.crash(name)
        self.nodes[name].host_up = False

    def restart(self, name: str, *, join: Sequence[str] = ()) -> None:
        """Start a new life of a crashed or departed member (same name and address)."""
        node = self.nodes[name]
        node.prior_incarnation = max(node.prior_incarnation, node.swim.local.incarnation)
        node.life += 1
        node.swim = self._new_swim(name, node.address, node.meta, node.life)
        node.status = Status.RUNNING
        node.stopped = False
        node.host_up = True
        node.backlog.clear()
        node.tick_at = float("inf")
        if join:
            self._join(node, join, node.life, 1.0)
        self._flush(node)

    def leave(self, name: str, *, linger: float = 1.0) -> None:
        """Leave gracefully: announce it, keep running `linger` seconds, then stop."""
        node = self.nodes[name]
        node.status = Status.LEFT
        node.swim.leave(self.now)
        self._flush(node)
        self.at(self.now + linger, lambda: self._stop(node))

    def _stop(self, node: SimNode) -> None:
        if node.status is Status.LEFT:
            node.stopped = True
            node.prior_incarnation = max(node.prior_incarnation, node.swim.local.incarnation)

    def update_meta(self, name: str, meta: Meta | Mapping[str, str]) -> None:
        """Have a member announce new metadata now."""
        node = self.nodes[name]
        node.meta = make_meta(meta)
        node.swim.update_meta(node.meta, self.now)
        self._flush(node)

    def pause(self, name: str, duration: float) -> None:
        """Stop a member's process for `duration` (SIGSTOP ... SIGCONT)."""
        node = self.nodes[name]
        if node.status is not Status.RUNNING:
            raise ValueError(f"cannot pause {name!r}: it is {node.status.value}")
        node.status = Status.PAUSED
        self.at(self.now + duration, lambda: self._resume(node))

    def _resume(self, node: SimNode) -> None:
        if node.status is not Status.PAUSED:
            return
        node.status = Status.RUNNING
        backlog, node.backlog = node.backlog, []
        for kind, payload, src in backlog:
            self._deliver(node, kind, payload, src)
        node.tick_at = float("inf")
        self._schedule_tick(node)

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut the group into sides: members listed together talk; everyone unlisted is
        one more side. Replaces any earlier partition."""
        for node in self.nodes.values():
            node.group = 0
        for i, g in enumerate(groups, start=1):
            for name in g:
                self.nodes[name].group = i

    def heal(self) -> None:
        """Undo partitions and one-way blocks."""
        for node in self.nodes.values():
            node.group = 0
        self._blocked.clear()

    def block(self, src: str, dst: str) -> None:
        """Drop everything from `src` to `dst` (one way)."""
        self._blocked.add((src, dst))

    def set_loss(self, loss: float, *, src: str | None = None, dst: str | None = None) -> None:
        """Datagram loss on every link (no names), or on one directed link."""
        if src is None and dst is None:
            self.network = _replace_loss(self.network, loss)
            self._link_loss.clear()
        elif src is not None and dst is not None:
            self._link_loss[(src, dst)] = loss
        else:
            others = [n for n in self.nodes if n != (src or dst)]
            for o in others:
                self._link_loss[(src, o) if src is not None else (o, dst)] = loss  # type: ignore[index]

    def connected(self, a: str, b: str) -> bool:
        """Whether `a` can currently send to `b` (ignoring random loss)."""
        na, nb = self.nodes[a], self.nodes[b]
        return na.group == nb.group and (a, b) not in self._blocked

    # ------------------------------------------------------------------ running

    def at(self, time: float, action: Callable[[], object]) -> None:
        """Run `action` at simulated `time`."""
        self._push(max(time, self.now), _CALL, "", action, None)

    def run_until(self, time: float) -> None:
        """Process every event up to and including `time`."""
        heap = self._heap
        nodes = self.nodes
        while heap and heap[0][0] <= time:
            t, _, kind, name, payload, src = heapq.heappop(heap)
            self.now = t
            if kind == _CALL:
                payload()  # type: ignore[operator]
                continue
            node = nodes[name]
            if kind == _TICK:
                if t != node.tick_at or node.status is not Status.RUNNING and node.status is not Status.LEFT:
                    continue
                if node.stopped:
                    continue
                node.tick_at = float("inf")
                node.swim.tick(t)
                self._flush(node)
            else:
                assert src is not None
                self._deliver(node, kind, payload, src)
        self.now = max(self.now, time)

    def run_for(self, duration: float) -> None:
        """Advance the clock by `duration`."""
        self.run_until(self.now + duration)

    def run_until_true(self, predicate: Callable[[], bool], *, timeout: float, step: float = 0.1) -> bool:
        """Advance in `step`s until `predicate()` holds or `timeout` passes."""
        end = self.now + timeout
        while self.now < end:
            if predicate():
                return True
            self.run_until(min(end, self.now + step))
        return predicate()

    # ------------------------------------------------------------------ views and checks

    def running(self) -> list[SimNode]:
        """Members that are running or paused, in creation order."""
        return [n for n in self.nodes.values() if n.running]

    def view(self, name: str) -> dict[str, State]:
        """Member name -> state, in `name`'s view."""
        return {m.name: m.state for m in self.nodes[name].swim.members()}

    def disagreements(self) -> list[str]:
        """How every running member's live view differs from the truth (empty: agreed)."""
        truth = {n.name for n in self.running()}
        problems: list[str] = []
        for node in self.running():
            seen = {m.name for m in node.swim.members() if m.live}
            if seen != truth:
                missing = sorted(truth - seen)
                extra = sorted(seen - truth)
                problems.append(f"{node.name}: missing {missing} extra {extra}")
        return problems

    # ------------------------------------------------------------------ internals

    def _push(self, time: float, kind: int, name: str, payload: object, src: Address | None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (time, self._seq, kind, name, payload, src))

    def _deliver(self, node: SimNode, kind: int, payload: object, src: Address) -> None:
        if node.stopped:
            return
        if node.status is Status.PAUSED:
            if len(node.backlog) < self.network.backlog_limit:
                node.backlog.append((kind, payload, src))
            return
        if kind == _PACKET:
            msgs: tuple[Message, ...] = payload  # type: ignore[assignment]
            node.swim.step(src, msgs[0] if len(msgs) == 1 else Compound(messages=msgs), self.now)
        elif kind == _CHECK:
            check, outcome = payload  # type: ignore[misc]
            node.swim.reachability(check, outcome, self.now)
        else:
            msg: PushPull = payload  # type: ignore[assignment]
            node.swim.step(src, msg, self.now)
        self._flush(node)

    def _flush(self, node: SimNode) -> None:
        swim = node.swim
        if swim.has_ready():
            ready = swim.ready()
            if ready.packets:
                self._route_packets(node, ready.packets)
            for s in ready.streams:
                self.stats.streams += 1
                dst = self._by_addr.get(s.dest)
                if dst is not None and self._passes(node, dst):
                    self._push(self.now + self.network.stream_delay, _STREAM, dst.name, s.message, node.address)
            for c in ready.checks:
                self._route_check(node, c)
            if ready.events:
                for obs in self.observers:
                    obs(self, node, ready.events)
        self._schedule_tick(node)

    def _route_check(self, node: SimNode, check: ReachCheck) -> None:
        """Answer a TCP connect as the target's host would (see the module rules)."""
        net = self.network
        dst = self._by_addr.get(check.address)
        outcome = Reach.NO_ANSWER
        rtt = 0.0
        if dst is not None and dst.host_up and self._passes(node, dst) and self._passes(dst, node):
            there = self._link_loss.get((node.name, dst.name), net.loss)
            back = self._link_loss.get((dst.name, node.name), net.loss)
            lost = (there and self.rng.random() < there) or (back and self.rng.random() < back)
            if not lost:
                outcome = Reach.REFUSED if dst.stopped else Reach.ACCEPTED
                rtt = 2 * net.delay + self.rng.random() * net.jitter
        self.stats.checks[outcome] += 1
        at = self.now + (check.timeout if outcome is Reach.NO_ANSWER else rtt)
        self._push(at, _CHECK, node.name, (check, outcome), dst.address if dst is not None else check.address)

    def _schedule_tick(self, node: SimNode) -> None:
        nd = node.swim.next_deadline()
        if nd != node.tick_at:
            node.tick_at = nd
            self._push(max(nd, self.now), _TICK, node.name, None, None)
            if nd < self.now:
                node.tick_at = self.now

    def _passes(self, src: SimNode, dst: SimNode) -> bool:
        return src.group == dst.group and (not self._blocked or (src.name, dst.name) not in self._blocked)

    def _route_packets(self, node: SimNode, packets: Sequence[object]) -> None:
        net = self.network
        rng = self.rng.random
        stats = self.stats
        by_addr = self._by_addr
        link_loss = self._link_loss
        count = self._count_kinds
        by_kind = stats.by_kind
        for out in packets:
            msgs = out.messages  # type: ignore[attr-defined]
            stats.packets += 1
            stats.messages += len(msgs)
            stats.packets_by_node[node.name] = stats.packets_by_node.get(node.name, 0) + 1
            if count:
                for m in msgs:
                    k = type(m).__name__
                    by_kind[k] = by_kind.get(k, 0) + 1
            dst = by_addr.get(out.dest)  # type: ignore[attr-defined]
            if dst is None or not self._passes(node, dst):
                stats.dropped += 1
                continue
            loss = link_loss.get((node.name, dst.name), net.loss) if link_loss else net.loss
            if loss and rng() < loss:
                stats.dropped += 1
                continue
            copies = 2 if net.duplicate and rng() < net.duplicate else 1
            for _ in range(copies):
                delay = net.delay + rng() * net.jitter
                if net.reorder and rng() < net.reorder:
                    delay += net.reorder_delay
                self._push(self.now + delay, _PACKET, dst.name, msgs, node.address)


def _replace_loss(net: Network, loss: float) -> Network:
    return replace(net, loss=loss)
