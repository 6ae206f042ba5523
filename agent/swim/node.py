"""The SWIM member: failure detection, dissemination and state sync, with no I/O.

Rules:
- `Swim` never reads a clock, opens a socket or draws from the global random. The shell
  feeds it datagrams and stream messages (`step`), the time (`tick`, and `now` on every
  call), and carries out what `ready()` returns, in the order its docstring states.
- Probing: every `probe_interval` (times the local health multiplier) it probes one
  member, walking a randomized round robin (a fresh random order every round, drawn
  lazily; a new member lands at a random position). A member it hears is suspected by
  someone is probed next: that confirms a real failure within about two intervals and
  carries the suspicion to the suspect (buddy system: the `Suspect` goes in the same
  datagram, before the `Ping`, so the ack carries the refutation). While suspected, a
  lone suspect is probed every interval, several share every other probe.
- A probe is a `Ping`; without an `Ack` within `probe_timeout` it asks `indirect_checks`
  random members to `PingReq` the target; they relay its `Ack` or send a `Nack` after
  their own timeout. Without any ack by the end of the interval, the target becomes
  SUSPECT (`suspicion.py`), and DEAD when the suspicion times out unrefuted.
- Reachability (`reach.py`): when the direct ping times out, the shell is also asked to
  connect to the target's gossip port (`Ready.checks`). A refusal (the agent is gone,
  its host is up) suspects the target at once with `refused_suspicion_timeout`; a
  completed handshake (the host is up, the agent slow or stopped) excuses the missed
  probe — no suspicion, no confirmation — and probes it again like a suspect, until an
  ack (or a ping from it) ends the excuse or `host_up_patience` has passed since the
  first one; no answer changes nothing.
- Claims obey incarnations: a claim about an older incarnation is ignored; ALIVE needs a
  strictly higher incarnation to override anything; SUSPECT or DEAD at the same or a
  higher incarnation override ALIVE. A member refutes claims about itself by raising its
  incarnation above them, and re-announces itself when it hears a stale claim (someone
  missed its refutation). A DEAD claim about a member this agent never heard suspected
  becomes a fully confirmed suspicion (`suspicion_min` to refute) rather than a death: a
  lone accuser with bad links cannot kill a healthy member at once. A leave (dead from
  self) is final. DEAD and LEFT members are kept (tombstones) until reaped.
- Every accepted change is queued for gossip (`broadcast.py`), piggybacked on every
  packet and sent every `gossip_interval` to `gossip_nodes` members while the queue is
  not empty (the first round goes out at once when the member was idle). Targets are
  random; in groups of up to 64 they cycle through a shuffled list so the few transmits
  of a small group reach distinct members.
- Push-pull: every `push_pull_interval` (scaled with N), on join, and to reconnect with a
  random DEAD member every `reconnect_interval`, the full view goes over a stream; the
  responder merges first and answers with its merged view. A remote SUSPECT or DEAD is
  merged as a suspicion, so a live member gets its chance to refute. A joiner syncs
  once more when the gossip in flight during its join has died out, and a member pinged
  by one it does not know (or thinks dead) syncs with it: it missed that one's news.
- Lifeguard: local health awareness (`awareness.py`) stretches probe timeouts and the
  interval; a late timer (the process was stopped) pushes this member's own deadlines
  back instead of blaming others; suspicion timeouts shrink with confirmations.

How it works: `step` and `tick` first advance the clock (detecting a stall), then handle
the message, then run every timer that is due, so a shell may call `tick` only at
`next_deadline()`. Outgoing messages are collected per destination and packed into
datagrams of at most `udp_buffer_size` bytes (as measured by the injected `size_of`),
each topped up with queued broadcasts; `ready()` hands them over and clears them.
"""

from __future__ import annotations

import enum
from random import Random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from shoal.agent.swim.awareness import Awareness
from shoal.agent.swim.broadcast import BroadcastQueue, retransmit_limit
from shoal.agent.swim.config import Config, push_pull_scale
from shoal.agent.swim.member import (
    Address,
    Member,
    Meta,
    State,
    check_transition,
    make_meta,
    meta_size,
)
from shoal.agent.swim.messages import (
    Ack,
    Alive,
    Broadcast,
    Compound,
    Dead,
    MemberState,
    Message,
    Nack,
    Ping,
    PingReq,
    PushPull,
    PushPullRequest,
    PushPullResponse,
    Suspect,
    approx_size,
)
from shoal.agent.swim.reach import VERDICTS, Reach, ReachCheck, Verdict
from shoal.agent.swim.suspicion import Suspicion, expected_confirmations, suspicion_timeout
from shoal.errors import ConfigError

__all__ = [
    "EventKind",
    "MemberEvent",
    "Outbound",
    "Stream",
    "Ready",
    "Logger",
    "NullLogger",
    "Swim",
]

# Bytes a message costs inside a compound datagram beyond its own size (tag + length).
_COMPOUND_OVERHEAD = 2
# Up to this many peers, gossip targets cycle through a shuffled list (see _gossip_targets).
_GOSSIP_CYCLE_MAX = 64


class EventKind(enum.Enum):
    """What happened to a member, as the application (failover, placement) sees it."""

    JOIN = "join"  # a new member, or one that came back after DEAD or LEFT
    UPDATE = "update"  # an ALIVE member changed its metadata or address
    SUSPECT = "suspect"
    ALIVE = "alive"  # a suspicion was refuted
    DEAD = "dead"
    LEAVE = "leave"


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberEvent:
    """A change in this agent's view; `member` is the member after the change."""

    kind: EventKind
    member: Member


@dataclass(frozen=True, slots=True, kw_only=True)
class Outbound:
    """One datagram: `messages` packed together (a compound when more than one) to `dest`."""

    dest: Address
    messages: tuple[Message, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Stream:
    """One push-pull message over a stream (TCP).

    A `PushPullRequest` opens a connection to `dest`; a `PushPullResponse` answers on the
    connection whose request was passed to `step` with `src == dest`.
    """

    dest: Address
    message: PushPull


@dataclass(frozen=True, slots=True, kw_only=True)
class Ready:
    """What the shell must do now, in this order.

    1. Nothing to persist: SWIM keeps no durable state (a restarted member rejoins and
       refutes its old incarnation).
    2. Hand every datagram in `packets` to the UDP transport, in order (loss is fine).
    3. Open a stream for every `PushPullRequest` in `streams` and answer on the pending
       connection for every `PushPullResponse`; feed what comes back to `step`.
    4. Start every reachability check in `checks` (a TCP connect to its address, closed
       at once) and report each outcome with `Swim.reachability` when it is known, within
       the check's timeout; a check that cannot be made may go unreported.
    5. Deliver `events` to subscribers, in order, after the packets are handed over, so
       a subscriber that reacts (e.g. reads `members()`) never races the gossip that
       announces the same change.
    """

    packets: tuple[Outbound, ...] = ()
    streams: tuple[Stream, ...] = ()
    checks: tuple[ReachCheck, ...] = ()
    events: tuple[MemberEvent, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.packets or self.streams or self.checks or self.events)


class Logger(Protocol):
    """The structlog-style logger a core accepts: `log.info("swim.event", key=value)`."""

    def debug(self, event: str, **kw: object) -> object: ...

    def info(self, event: str, **kw: object) -> object: ...

    def warning(self, event: str, **kw: object) -> object: ...


class NullLogger:
    """Drops everything; the default."""

    def debug(self, event: str, **kw: object) -> None:
        return None

    def info(self, event: str, **kw: object) -> None:
        return None

    def warning(self, event: str, **kw: object) -> None:
        return None


class _Probe:
    """The probe in flight: one per member at a time."""

    __slots__ = (
        "target", "seq", "start", "timeout_at", "end_at", "indirect", "expected_nacks", "nacks", "host_up",
    )

    def __init__(self, target: str, seq: int, start: float, timeout_at: float, end_at: float) -> None:
        self.target = target
        self.seq = seq
        self.start = start
        self.timeout_at = timeout_at
        self.end_at = end_at
        self.indirect = False
        self.expected_nacks = 0
        self.nacks = 0
        self.host_up = False  # the target's host accepted this probe's reachability check


class _Relay:
    """An indirect probe this member runs for another (`PingReq`)."""

    __slots__ = ("origin", "origin_seq", "nack", "deadline")

    def __init__(self, origin: Address, origin_seq: int, nack: bool, deadline: float) -> None:
        self.origin = origin
        self.origin_seq = origin_seq
        self.nack = nack
        self.deadline = deadline


class Swim:
    """One SWIM + Lifeguard member (sans-I/O). See the module docstring for the rules."""

    def __init__(
        self,
        config: Config,
        name: str,
        address: Address,
        meta: Meta | Mapping[str, str],
        rng: Random,
        now: float,
        logger: Logger | None = None,
        *,
        size_of: Callable[[Message], int] | None = None,
        initial_members: Mapping[str, Member] | None = None,
    ) -> None:
        """A member that knows only itself (incarnation 0, ALIVE) until it joins.

        `size_of` measures an encoded message (default: `approx_size`). `initial_members`
        pre-loads a converged view without events or gossip; it exists for simulations
        of large groups, where joining 10,000 members one by one would dominate the run.
        """
        config.validate()
        self.config = config
        self.name = name
        self.address = address
        self._rng = rng
        self._log: Logger = logger if logger is not None else NullLogger()
        self._size_of: Callable[[Message], int] = size_of if size_of is not None else approx_size
        meta = make_meta(meta)
        self._check_meta(meta)
        me = Member(name=name, address=address, incarnation=0, state=State.ALIVE, meta=meta, state_change=now)

        self._members: dict[str, Member] = dict(initial_members) if initial_members else {}
        self._members[name] = me
        # Round robin over everyone but us; _probe_idx splits probed-this-round from not.
        self._probe_order: list[str] = [n for n in self._members if n != name]
        self._probe_idx = 0
        self._gossip_cycle: list[str] = []  # small groups: gossip targets still due this cycle
        self._urgent: dict[str, None] = {}  # suspicions heard, to probe before anything
        self._reprobe: dict[str, None] = {}  # suspects to probe again, every other probe
        self._last_reprobe = False
        self._live = sum(1 for m in self._members.values() if m.live)
        self._tombstones: dict[str, None] = {n: None for n, m in self._members.items() if not m.live}

        self._seq = 0
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._suspicions: dict[str, Suspicion] = {}
        self._broadcasts = BroadcastQueue(self._size_of)
        self._awareness = Awareness(config.awareness_max_multiplier)
        self._left = False
        self._joining = False  # a join push-pull is out and no answer came yet
        self._synced: dict[str, float] = {}  # stranger -> when we last synced with it
        self._excused: dict[str, float] = {}  # member -> first missed probe excused (host up)

        self._now = now
        # Stagger the first probe and sync so members started together do not beat in step.
        self._next_probe = now + rng.uniform(0.0, config.probe_interval)
        self._next_gossip: float | None = None
        self._last_gossip = -config.gossip_interval + now
        self._next_push_pull = now + rng.uniform(0.0, push_pull_scale(config.push_pull_interval, self._live))
        self._next_reconnect = now + config.reconnect_interval
        self._next_reap = now + self._reap_every()

        self._packets: dict[Address, list[list[Message]]] = {}
        self._packet_room: dict[Address, int] = {}
        self._streams: list[Stream] = []
        self._checks: list[ReachCheck] = []
        self._events: list[MemberEvent] = []
        self._due: float = self.next_deadline()

    # ------------------------------------------------------------------ public API

    def join(self, seeds: Iterable[Address], now: float) -> None:
        """Start a full-state exchange with every seed (the shell retries on failure)."""
        self._clock(now)
        self._broadcast(self.name, self._alive_of(self._members[self.name]))
        for seed in seeds:
            if seed != self.address:
                self._joining = True
                self._streams.append(Stream(dest=seed, message=self._push_pull_request(join=True)))
        self._after(now)

    def leave(self, now: float) -> None:
        """Leave gracefully: announce a dead-from-self (LEFT) and stop probing.

        The announcement goes at once to `gossip_nodes` members and then with the normal
        gossip; the shell should keep ticking until `pending_broadcasts` is 0 (or a
        short timeout) before it stops.
        """
        self._clock(now)
        if self._left:
            return
        me = self._members[self.name]
        self._left = True
        self._probe = None
        self._urgent.clear()
        self._reprobe.clear()
        self._members[self.name] = replace(me, state=State.LEFT, state_change=now)
        self._broadcast(self.name, Dead(name=self.name, incarnation=me.incarnation, accuser=self.name))
        self._log.info("swim.leave", member=self.name, incarnation=me.incarnation)
        self._gossip(now)
        self._after(now)

    def update_meta(self, meta: Meta | Mapping[str, str], now: float) -> None:
        """Announce new metadata under a higher incarnation."""
        self._clock(now)
        meta = make_meta(meta)
        self._check_meta(meta)
        me = self._members[self.name]
        if not self._left and meta != me.meta:
            me = replace(me, incarnation=me.incarnation + 1, meta=meta)
            self._members[self.name] = me
            self._broadcast(self.name, self._alive_of(me))
        self._after(now)

    def step(self, src: Address, message: Message, now: float) -> None:
        """Handle one message that arrived from `src` (a datagram's or stream's peer)."""
        self._clock(now)
        if isinstance(message, Compound):
            for part in message.messages:
                if not isinstance(part, Compound):  # no nesting on the wire
                    self._handle(src, part, now)
        else:
            self._handle(src, message, now)
        self._after(now)

    def tick(self, now: float) -> None:
        """Run every timer due at `now`. Call at `next_deadline()` (or any time)."""
        self._clock(now)
        self._after(now)

    def ready(self) -> Ready:
        """Take what the shell must do now (see `Ready` for the order); clears it."""
        if not (self._packets or self._streams or self._checks or self._events):
            return _EMPTY
        packets = tuple(
            Outbound(dest=dest, messages=tuple(msgs)) for dest, lst in self._packets.items() for msgs in lst
        )
        ready = Ready(
            packets=packets, streams=tuple(self._streams), checks=tuple(self._checks), events=tuple(self._events)
        )
        self._packets = {}
        self._packet_room = {}
        self._streams = []
        self._checks = []
        self._events = []
        return ready

    def has_ready(self) -> bool:
        """True when `ready()` would return something."""
        return bool(self._packets or self._streams or self._checks or self._events)

    def reachability(self, check: ReachCheck, outcome: Reach, now: float) -> None:
        """Take the outcome of a check from `Ready.checks` (see `reach.py`).

        It counts only while the member is live at the incarnation and address the check
        was about: a late refusal about an agent that has since restarted and announced a
        higher incarnation is evidence about its previous life, and changes nothing.
        """
        self._clock(now)
        m = self._members.get(check.name)
        if (
            m is not None and m.live and not self._left
            and m.incarnation == check.incarnation and m.address == check.address
        ):
            verdict = VERDICTS[outcome]
            if verdict is Verdict.AGENT_GONE:
                self._agent_gone(m, now)
            elif verdict is Verdict.HOST_UP:
                p = self._probe
                if p is not None and p.seq == check.seq:
                    p.host_up = True
        self._after(now)

    def next_deadline(self) -> float:
        """The local time at which `tick` must be called next."""
        t = self._next_push_pull
        p = self._probe
        if p is not None:
            t = min(t, p.end_at if p.indirect else p.timeout_at)
        elif not self._left:
            t = min(t, self._next_probe)
        if self._next_gossip is not None:
            t = min(t, self._next_gossip)
        if self._tombstones:
            t = min(t, self._next_reap, self._next_reconnect)
        for relay in self._relays.values():
            t = min(t, relay.deadline)
        for s in self._suspicions.values():
            t = min(t, s.deadline())
        return t

    def members(self) -> tuple[Member, ...]:
        """Every known member, this one included, tombstones (DEAD, LEFT) too."""
        return tuple(self._members.values())

    def member(self, name: str) -> Member | None:
        """One member by name, or None if unknown (or reaped)."""
        return self._members.get(name)

    @property
    def local(self) -> Member:
        """This member as it announces itself."""
        return self._members[self.name]

    @property
    def live_count(self) -> int:
        """ALIVE and SUSPECT members, this one included: the N of every formula."""
        return self._live

    @property
    def health_score(self) -> int:
        """Lifeguard local health: 0 is healthy."""
        return self._awareness.score

    @property
    def pending_broadcasts(self) -> int:
        """Broadcasts still waiting to be gossiped."""
        return len(self._broadcasts)

    # ------------------------------------------------------------------ clock and timers

    def _clock(self, now: float) -> None:
        if now < self._now:
            raise ValueError(f"time went backwards: {now} < {self._now}")
        late = now - self._due
        if late > self.config.stall_threshold:
            # We were not running (stopped, starved): our silence is not their fault.
            self._shift_timers(late)
            self._awareness.apply_delta(1)
            self._log.warning("swim.stalled", member=self.name, seconds=round(late, 3))
        self._now = now

    def _shift_timers(self, delta: float) -> None:
        p = self._probe
        if p is not None:
            p.start += delta
            p.timeout_at += delta
            p.end_at += delta
        self._next_probe += delta
        for relay in self._relays.values():
            relay.deadline += delta
        for s in self._suspicions.values():
            s.shift(delta)
        for name in self._excused:
            self._excused[name] += delta
        if self._next_gossip is not None:
            self._next_gossip += delta
        self._next_push_pull += delta
        self._next_reconnect += delta

    def _after(self, now: float) -> None:
        """Run due timers, then remember when we expect to be called next."""
        if self._suspicions:
            for name in [n for n, s in self._suspicions.items() if now >= s.deadline()]:
                m = self._members[name]
                self._log.info("swim.suspicion_expired", member=name, incarnation=m.incarnation)
                self._on_dead(Dead(name=name, incarnation=m.incarnation, accuser=self.name), now)
        if self._relays:
            for seq in [s for s, r in self._relays.items() if now >= r.deadline]:
                relay = self._relays.pop(seq)
                if relay.nack:
                    self._send(relay.origin, Nack(seq=relay.origin_seq))
        if not self._left:
            self._probe_timers(now)
        if self._next_gossip is not None and now >= self._next_gossip:
            self._gossip(now)
        if now >= self._next_push_pull:
            self._next_push_pull = now + push_pull_scale(self.config.push_pull_interval, self._live)
            target = [] if self._left else self._random_members(1, lambda m: m.state is State.ALIVE)
            if target:
                self._streams.append(Stream(dest=target[0].address, message=self._push_pull_request()))
        if self._tombstones:
            if now >= self._next_reconnect:
                self._next_reconnect = now + self.config.reconnect_interval
                dead = [] if self._left else [n for n in self._tombstones if self._members[n].state is State.DEAD]
                if dead:
                    target_m = self._members[self._rng.choice(dead)]
                    self._streams.append(Stream(dest=target_m.address, message=self._push_pull_request()))
            if now >= self._next_reap:
                self._next_reap = now + self._reap_every()
                self._reap(now)
        else:
            self._next_reconnect = max(self._next_reconnect, now + self.config.reconnect_interval)
            self._next_reap = max(self._next_reap, now)
        self._due = self.next_deadline()

    def _reap_every(self) -> float:
        return max(0.1, min(self.config.dead_reap_time, self.config.left_reap_time) / 4)

    def _reap(self, now: float) -> None:
        for name in list(self._tombstones):
            m = self._members[name]
            keep = self.config.dead_reap_time if m.state is State.DEAD else self.config.left_reap_time
            if now - m.state_change >= keep:
                del self._tombstones[name]
                del self._members[name]
                self._urgent.pop(name, None)
                self._reprobe.pop(name, None)
                self._excused.pop(name, None)
                pos = self._probe_order.index(name)
                del self._probe_order[pos]
                if pos < self._probe_idx:
                    self._probe_idx -= 1
                self._log.debug("swim.reaped", member=name, state=m.state.value)

    # ------------------------------------------------------------------ probing

    def _probe_timers(self, now: float) -> None:
        p = self._probe
        if p is not None:
            if not p.indirect and now >= p.timeout_at:
                self._indirect(p)
            if now >= p.end_at:
                self._probe_failed(p, now)
                p = self._probe = None
        if p is None and now >= self._next_probe:
            self._start_probe(now)

    def _start_probe(self, now: float) -> None:
        self._next_probe = now + self._awareness.scale(self.config.probe_interval)
        target = self._pick_probe_target()
        if target is None:
            return
        self._seq += 1
        self._probe = _Probe(
            target.name,
            self._seq,
            now,
            now + self._awareness.scale(self.config.probe_timeout),
            self._next_probe,
        )
        msgs: list[Message] = [Ping(seq=self._seq, target=target.name, source=self.name)]
        if target.state is State.SUSPECT:
            # Buddy system: the suspect reads its suspicion before the ping, so the ack
            # it sends back already carries its refutation. And it stays first in line
            # for the next probe while the suspicion lasts.
            msgs.insert(0, Suspect(name=target.name, incarnation=target.incarnation, accuser=self.name))
            self._reprobe[target.name] = None
        self._send_new(target.address, msgs)

    def _pick_probe_target(self) -> Member | None:
        # A suspicion heard from others is checked by the very next probe (it confirms a
        # real failure fast and brings the suspect its suspicion). After that, a lone
        # suspect is probed every interval (each probe carries the suspicion to it and
        # its refutation back in the ack); several suspects share every other probe, so
        # a partition that makes many members suspect cannot starve the round robin.
        # Members whose missed probe was excused (host up) are probed again the same way:
        # the first ack ends the excuse, and a wedged agent runs out of patience on time
        # even where the round robin would not come back to it for minutes.
        while self._urgent:
            name = next(iter(self._urgent))
            del self._urgent[name]
            m = self._members.get(name)
            if m is not None and m.state is State.SUSPECT:
                return m
        if self._last_reprobe and len(self._suspicions) + len(self._excused) > 1:
            self._last_reprobe = False
        else:
            while self._reprobe:
                name = next(iter(self._reprobe))
                del self._reprobe[name]
                m = self._members.get(name)
                if m is not None and (m.state is State.SUSPECT or m.live and name in self._excused):
                    self._last_reprobe = True
                    return m
        order = self._probe_order
        n = len(order)
        rng = self._rng
        for _ in range(n):
            if self._probe_idx >= n:
                self._probe_idx = 0
            i = self._probe_idx
            # Lazy Fisher-Yates: a uniformly random order for every round, O(1) a probe.
            j = rng.randrange(i, n)
            order[i], order[j] = order[j], order[i]
            self._probe_idx = i + 1
            m = self._members[order[i]]
            if m.live:
                return m
        return None

    def _indirect(self, p: _Probe) -> None:
        p.indirect = True
        target = self._members.get(p.target)
        if target is None:
            return
        if self.config.reachability_checks:
            # Answered within the rest of the probe, so the verdict is in when it ends.
            self._checks.append(ReachCheck(
                seq=p.seq, name=target.name, incarnation=target.incarnation, address=target.address,
                timeout=max(0.0, p.end_at - self._now),
            ))
        if self.config.indirect_checks == 0:
            return
        helpers = self._random_members(
            self.config.indirect_checks,
            lambda m: m.state is State.ALIVE and m.name != p.target,
        )
        req = PingReq(seq=p.seq, target=target.name, target_address=target.address, nack=True)
        for h in helpers:
            self._send(h.address, req)
        p.expected_nacks = len(helpers)

    def _probe_failed(self, p: _Probe, now: float) -> None:
        # Lifeguard: helpers that did not even nack point at us, not at the target.
        if p.expected_nacks:
            missing = p.expected_nacks - p.nacks
            if missing > 0:
                self._awareness.apply_delta(missing)
        else:
            self._awareness.apply_delta(1)
        m = self._members.get(p.target)
        if m is None or not m.live:
            return
        if p.host_up:
            # Its host is up and its agent's socket open: slow or stopped, not gone.
            first = self._excused.setdefault(m.name, now)
            if now - first < self.config.host_up_patience:
                self._log.debug("swim.probe_excused", member=m.name, since=round(now - first, 3))
                self._reprobe[m.name] = None
                return
            self._log.info("swim.patience_exhausted", member=m.name, seconds=round(now - first, 3))
        self._log.info("swim.probe_failed", member=p.target, incarnation=m.incarnation)
        self._on_suspect(Suspect(name=m.name, incarnation=m.incarnation, accuser=self.name), now)

    def _agent_gone(self, m: Member, now: float) -> None:
        """Its host refused a connection to its gossip port: nothing listens, it is gone."""
        suspect = Suspect(name=m.name, incarnation=m.incarnation, accuser=self.name)
        self._on_suspect(suspect, now)
        # Straight to it as well: lost if it is gone, and if it runs after all (a firewall
        # rejecting TCP on the gossip port), its refutation starts now, not a round later.
        self._send(m.address, suspect)
        suspicion = self._suspicions.get(m.name)
        if suspicion is not None and suspicion.limit(now + self.config.refused_suspicion_timeout):
            self._log.info("swim.agent_gone", member=m.name, incarnation=m.incarnation)

    # ------------------------------------------------------------------ message handling

    def _handle(self, src: Address, msg: Message, now: float) -> None:
        if isinstance(msg, Alive):
            self._on_alive(msg, now)
        elif isinstance(msg, Suspect):
            self._on_suspect(msg, now)
        elif isinstance(msg, Dead):
            self._on_dead(msg, now)
        elif isinstance(msg, Ping):
            if msg.target == self.name:
                self._send(src, Ack(seq=msg.seq))
                self._excused.pop(msg.source, None)  # it runs: a later excuse starts afresh
                if msg.source and msg.source != self.name:
                    self._check_stranger(msg.source, src, now)
            else:
                self._log.debug("swim.ping_for_other", target=msg.target, src=src)
        elif isinstance(msg, Ack):
            self._on_ack(msg.seq)
        elif isinstance(msg, Nack):
            p = self._probe
            if p is not None and p.seq == msg.seq:
                p.nacks += 1
        elif isinstance(msg, PingReq):
            self._seq += 1
            self._relays[self._seq] = _Relay(src, msg.seq, msg.nack, now + self.config.probe_timeout)
            self._send(msg.target_address, Ping(seq=self._seq, target=msg.target, source=self.name))
        elif isinstance(msg, PushPullRequest):
            self._merge(msg.sender, msg.states, now)
            # Answer with the view *after* the merge: it carries our refutations.
            self._streams.append(
                Stream(dest=src, message=PushPullResponse(sender=self.name, states=self._full_state()))
            )
        elif isinstance(msg, PushPullResponse):
            self._merge(msg.sender, msg.states, now)
            if self._joining:
                # Changes that were being gossiped while we joined never came our way
                # (nobody knew us yet): sync once more when that gossip has died out.
                self._joining = False
                window = retransmit_limit(self.config.retransmit_mult, self._live) * self.config.gossip_interval
                self._next_push_pull = min(self._next_push_pull, now + window)
        else:
            self._log.warning("swim.unknown_message", kind=type(msg).__name__, src=src)

    def _check_stranger(self, name: str, src: Address, now: float) -> None:
        """Sync with a member that pings us but that we do not know, or think dead.

        It knows us, so we missed news it has (its join went round while nobody knew us
        yet, or we were cut off from each other). At most once per reconnect_interval
        per member, so a stale view cannot turn into a flood of syncs.
        """
        m = self._members.get(name)
        if (m is not None and m.live) or self._left:
            return
        last = self._synced.get(name)
        if last is not None and now - last < self.config.reconnect_interval:
            return
        if len(self._synced) > 1024:
            horizon = now - self.config.reconnect_interval
            self._synced = {k: t for k, t in self._synced.items() if t >= horizon}
        self._synced[name] = now
        self._log.debug("swim.sync_stranger", member=name, known=m is not None)
        self._streams.append(Stream(dest=src, message=self._push_pull_request()))

    def _on_ack(self, seq: int) -> None:
        p = self._probe
        if p is not None and p.seq == seq:
            self._awareness.apply_delta(-1)
            self._excused.pop(p.target, None)
            self._probe = None
            return
        relay = self._relays.pop(seq, None)
        if relay is not None:
            self._send(relay.origin, Ack(seq=relay.origin_seq))

    def _on_alive(self, a: Alive, now: float) -> None:
        if a.name == self.name:
            me = self._members[self.name]
            if self._left or a.incarnation < me.incarnation:
                return
            if a.incarnation == me.incarnation and a.address == me.address and a.meta == me.meta:
                return
            # Someone holds a later or conflicting version of us (an earlier life of this
            # name, or a stale meta): overrule it.
            self._refute(a.incarnation, now)
            return
        cur = self._members.get(a.name)
        if cur is None:
            m = Member(
                name=a.name, address=a.address, incarnation=a.incarnation,
                state=State.ALIVE, meta=a.meta, state_change=now,
            )
            self._members[a.name] = m
            self._insert_probe_order(a.name)
            self._live += 1
            self._broadcast(a.name, a)
            self._events.append(MemberEvent(kind=EventKind.JOIN, member=m))
            self._log.info("swim.join", member=a.name, incarnation=a.incarnation)
            return
        if a.incarnation <= cur.incarnation:
            return
        self._excused.pop(a.name, None)  # it runs again: a new excuse starts afresh
        check_transition(cur.state, State.ALIVE)
        m = replace(
            cur, address=a.address, incarnation=a.incarnation, state=State.ALIVE, meta=a.meta,
            state_change=now if cur.state is not State.ALIVE else cur.state_change,
        )
        self._members[a.name] = m
        self._broadcast(a.name, a)
        kind: EventKind | None = None
        if cur.state is State.SUSPECT:
            del self._suspicions[a.name]
            kind = EventKind.ALIVE
        elif cur.state is State.ALIVE:
            if cur.meta != a.meta or cur.address != a.address:
                kind = EventKind.UPDATE
        else:
            del self._tombstones[a.name]
            self._live += 1
            kind = EventKind.JOIN
        if kind is not None:
            self._events.append(MemberEvent(kind=kind, member=m))
            self._log.info("swim." + kind.value, member=a.name, incarnation=a.incarnation)

    def _on_suspect(self, s: Suspect, now: float) -> None:
        if s.name == self.name:
            self._about_self(s.incarnation, now)
            return
        cur = self._members.get(s.name)
        if cur is None or s.incarnation < cur.incarnation:
            return
        if cur.state is State.SUSPECT:
            if self._suspicions[s.name].confirm(s.accuser):
                self._broadcast(s.name, s)  # pass the confirmation on
            return
        if cur.state is not State.ALIVE:
            return
        check_transition(cur.state, State.SUSPECT)
        m = replace(cur, incarnation=s.incarnation, state=State.SUSPECT, state_change=now)
        self._members[s.name] = m
        n = self._live
        low = suspicion_timeout(self.config.suspicion_mult, n, self.config.probe_interval)
        self._suspicions[s.name] = Suspicion(
            accuser=s.accuser,
            k=expected_confirmations(self.config.suspicion_confirmations, n),
            min_timeout=low,
            max_timeout=low * self.config.suspicion_max_timeout_mult,
            start=now,
        )
        if self._left:
            pass
        elif s.accuser == self.name:
            self._reprobe[s.name] = None  # we have just probed it ourselves
        else:
            self._urgent[s.name] = None
        self._broadcast(s.name, s)
        self._events.append(MemberEvent(kind=EventKind.SUSPECT, member=m))
        self._log.info("swim.suspect", member=s.name, incarnation=s.incarnation, accuser=s.accuser)

    def _on_dead(self, d: Dead, now: float) -> None:
        if d.name == self.name:
            self._about_self(d.incarnation, now)
            return
        cur = self._members.get(d.name)
        if cur is None or d.incarnation < cur.incarnation or not cur.live:
            return
        if cur.state is State.ALIVE and not d.is_leave and d.accuser != self.name:
            # We never heard this member suspected: the accusation may be a lone one from a
            # member with bad links. Take it as a fully confirmed suspicion, which still
            # kills within suspicion_min but lets a live member refute first.
            self._on_suspect(Suspect(name=d.name, incarnation=d.incarnation, accuser=d.accuser), now)
            suspicion = self._suspicions.get(d.name)
            if suspicion is not None:
                suspicion.confirm_all()
            return
        state = State.LEFT if d.is_leave else State.DEAD
        check_transition(cur.state, state)
        m = replace(cur, incarnation=d.incarnation, state=state, state_change=now)
        self._members[d.name] = m
        self._suspicions.pop(d.name, None)
        self._urgent.pop(d.name, None)
        self._reprobe.pop(d.name, None)
        self._excused.pop(d.name, None)
        self._tombstones[d.name] = None
        self._live -= 1
        if self._probe is not None and self._probe.target == d.name:
            self._probe = None
        self._broadcast(d.name, d)
        kind = EventKind.LEAVE if state is State.LEFT else EventKind.DEAD
        self._events.append(MemberEvent(kind=kind, member=m))
        self._log.info("swim." + kind.value, member=d.name, incarnation=d.incarnation, accuser=d.accuser)

    def _about_self(self, incarnation: int, now: float) -> None:
        """Someone suspects us, or thinks us dead, at `incarnation`."""
        if self._left:
            return
        me = self._members[self.name]
        if incarnation >= me.incarnation:
            self._refute(incarnation, now)
        else:
            # A stale claim still travels, so someone may have missed our refutation
            # (its retransmits are spent): announce the current incarnation again.
            self._broadcast(self.name, self._alive_of(me))

    def _refute(self, incarnation: int, now: float) -> None:
        me = self._members[self.name]
        me = replace(me, incarnation=max(me.incarnation, incarnation) + 1)
        self._members[self.name] = me
        self._awareness.apply_delta(1)  # being suspected hints that we are the slow one
        self._broadcast(self.name, self._alive_of(me))
        self._log.info("swim.refute", member=self.name, incarnation=me.incarnation)

    def _merge(self, sender: str, states: tuple[MemberState, ...], now: float) -> None:
        members = self._members
        for st in states:
            cur = members.get(st.name)
            if cur is not None and st.name != self.name and (
                st.incarnation < cur.incarnation
                or (st.incarnation == cur.incarnation and st.state is State.ALIVE)
            ):
                continue  # nothing new: the common case, skipped without building messages
            if st.state is State.ALIVE:
                self._on_alive(
                    Alive(name=st.name, address=st.address, incarnation=st.incarnation, meta=st.meta), now
                )
            elif st.state is State.LEFT:
                self._on_dead(Dead(name=st.name, incarnation=st.incarnation, accuser=st.name), now)
            else:
                # A remote SUSPECT or DEAD is only a suspicion here: let it refute.
                self._on_suspect(Suspect(name=st.name, incarnation=st.incarnation, accuser=sender), now)

    # ------------------------------------------------------------------ dissemination

    def _broadcast(self, key: str, msg: Broadcast) -> None:
        q = self._broadcasts
        q.queue(key, msg)
        if len(q) > self.config.max_broadcasts:
            q.prune(self.config.max_broadcasts)
        if self._next_gossip is None:
            self._next_gossip = max(self._now, self._last_gossip + self.config.gossip_interval)

    def _gossip(self, now: float) -> None:
        self._last_gossip = now
        dead_window = self.config.gossip_to_the_dead_time
        targets = self._gossip_targets(
            self.config.gossip_nodes,
            lambda m: m.live or (m.state is State.DEAD and now - m.state_change < dead_window),
        )
        limit = retransmit_limit(self.config.retransmit_mult, self._live)
        budget = self.config.udp_buffer_size
        for t in targets:
            msgs = self._broadcasts.get(budget, limit, _COMPOUND_OVERHEAD)
            if not msgs:
                break
            self._packets.setdefault(t.address, []).append(list(msgs))
            self._packet_room[t.address] = 0
        # Alone, nothing can be sent: wait until a member appears (its arrival is queued
        # as a broadcast, which re-arms the timer) instead of waking every round.
        self._next_gossip = now + self.config.gossip_interval if self._broadcasts and targets else None

    def _send(self, dest: Address, msg: Message) -> None:
        """Queue `msg` for `dest`, in the open datagram to `dest` if it still fits."""
        size = self._size_of(msg) + _COMPOUND_OVERHEAD
        room = self._packet_room.get(dest, 0)
        if size <= room:
            self._packets[dest][-1].append(msg)
            self._packet_room[dest] = room - size
        else:
            self._send_new(dest, [msg])

    def _send_new(self, dest: Address, msgs: list[Message]) -> None:
        """Open a datagram to `dest` with `msgs` first, topped up with queued gossip."""
        budget = self.config.udp_buffer_size - sum(self._size_of(m) + _COMPOUND_OVERHEAD for m in msgs)
        if self._broadcasts and budget > 0:
            limit = retransmit_limit(self.config.retransmit_mult, self._live)
            extra = self._broadcasts.get(budget, limit, _COMPOUND_OVERHEAD)
            msgs = [*msgs, *extra]
            budget -= sum(self._size_of(m) + _COMPOUND_OVERHEAD for m in extra)
        self._packets.setdefault(dest, []).append(msgs)
        self._packet_room[dest] = max(0, budget)

    # ------------------------------------------------------------------ helpers

    def _random_members(self, k: int, pred: Callable[[Member], bool]) -> list[Member]:
        """Up to `k` distinct random other members satisfying `pred`."""
        order = self._probe_order
        members = self._members
        n = len(order)
        if n <= 4 * k + 16:
            cands = [m for m in (members[x] for x in order) if pred(m)]
            return self._rng.sample(cands, k) if len(cands) > k else self._rng.sample(cands, len(cands))
        picked: dict[str, Member] = {}
        choice = self._rng.choice
        for _ in range(8 * k + 8):
            m = members[choice(order)]
            if m.name not in picked and pred(m):
                picked[m.name] = m
                if len(picked) == k:
                    break
        return list(picked.values())

    def _gossip_targets(self, k: int, pred: Callable[[Member], bool]) -> list[Member]:
        """`k` members satisfying `pred` to gossip to this round.

        In a small group they come from a shuffled cycle over everyone, so successive
        rounds reach different members: the few transmits a broadcast gets (4 at N=5)
        then go to distinct peers, where independent random picks miss one peer ~1 % of
        the time. In a large group, independent random picks (the epidemic's miss rate,
        about e^-limit per member, is negligible there).
        """
        order = self._probe_order
        if len(order) > _GOSSIP_CYCLE_MAX:
            return self._random_members(k, pred)
        members = self._members
        picked: list[Member] = []
        for _ in range(2 * len(order)):
            if not self._gossip_cycle:
                self._gossip_cycle = list(order)
                self._rng.shuffle(self._gossip_cycle)
                if not self._gossip_cycle:
                    break
            m = members.get(self._gossip_cycle.pop())
            if m is not None and pred(m) and m not in picked:
                picked.append(m)
                if len(picked) == k:
                    break
        return picked

    def _insert_probe_order(self, name: str) -> None:
        """Put a new member at a uniformly random position of the round robin."""
        order = self._probe_order
        order.append(name)
        if self._rng.randrange(len(order)) < self._probe_idx:
            # It landed among those already probed this round: swap it into that part.
            i = self._probe_idx
            order[i], order[-1] = order[-1], order[i]
            self._probe_idx = i + 1

    def _alive_of(self, m: Member) -> Alive:
        return Alive(name=m.name, address=m.address, incarnation=m.incarnation, meta=m.meta)

    def _full_state(self) -> tuple[MemberState, ...]:
        return tuple(
            MemberState(name=m.name, address=m.address, incarnation=m.incarnation, state=m.state, meta=m.meta)
            for m in self._members.values()
        )

    def _push_pull_request(self, join: bool = False) -> PushPullRequest:
        return PushPullRequest(sender=self.name, states=self._full_state(), join=join)

    def _check_meta(self, meta: Meta) -> None:
        if meta_size(meta) > self.config.meta_max_size:
            raise ConfigError(
                f"member metadata is {meta_size(meta)} bytes, more than meta_max_size "
                f"({self.config.meta_max_size}); drop labels or raise the limit"
            )


_EMPTY = Ready()
