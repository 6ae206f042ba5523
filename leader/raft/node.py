"""`Node`: the Raft core's public face — feed it, then carry out its `Ready`.

The shell's loop (one per server; the simulator's is in sim.py):

    node.tick()                      every config.tick_interval seconds
    node.step(msg)                   for every message the transport receives
    node.propose(data) / forward(datas) / read_index(ctx) / propose_conf_change(cc) / transfer_leadership(id)
    if node.has_ready():
        rd = node.ready()
        ... carry out rd in the order its docstring states ...
        node.advance(rd)

Rules:
- `ready()` hands each effect out exactly once; calling it again before `advance()` is
  an `IllegalTransition`. Messages may be stepped between `ready()` and `advance()`;
  their effects come in the next Ready.
- After a crash, create a new `Node` from the same storage: only what was persisted
  survives, which is exactly what the protocol assumes.
- `propose` returns the index the entry was appended at; if the entry later applied at
  that index has a different term, the proposal was lost (leader change) and the
  client must retry (with the same client id and sequence, so it applies once).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, replace

from .config import Config
from .errors import IllegalTransition
from .logger import Logger
from .messages import (
    ConfChange,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Message,
    MsgApp,
    MsgAppResp,
    MsgHeartbeat,
    MsgProp,
    MsgReadIndexResp,
    MsgSnap,
    MsgTimeoutNow,
    Snapshot,
)
from .progress import ProgressState
from .raft import CampaignKind, Raft, Role
from .readonly import ReadState
from .storage import Storage

__all__ = ["SoftState", "Ready", "ProgressStatus", "Status", "Node", "outbox"]


_EARLY = (MsgApp, MsgHeartbeat, MsgSnap, MsgTimeoutNow, MsgReadIndexResp, MsgProp)
"""Messages that promise nothing about the sender's disk (see `Ready`): a leader's, and
a follower's forwarded proposals."""


def outbox(msgs: list[Message]) -> tuple[tuple[Message, ...], tuple[Message, ...]]:
    """Split `msgs` into (early, after persisting), see `Ready`; merge acknowledgements
    and forwarded proposals.

    A follower's forwarded proposals to one leader become one `MsgProp` (in the place of
    the first, entries in their order): one message, and one append at the leader, for
    everything forwarded between two Readys.

    The accepting `MsgAppResp`s to one leader in one term are merged into one: a
    follower that took several appends between two Readys acknowledges them all after
    one fsync, and the acknowledgement of the highest index says everything the others
    do (the leader's match only grows, and it frees every inflight at or below it). The
    merged ack takes the place of the last one; every other message keeps its order.
    """
    early: list[Message] = []
    late: list[Message | None] = []
    best: dict[tuple[int, int], int] = {}  # (dst, term) -> position in late
    props: dict[int, tuple[int, MsgProp, list[Entry]]] = {}  # dst -> (position in early, first, entries)
    for m in msgs:
        if type(m) is MsgProp:
            seen = props.get(m.dst)
            if seen is not None:
                seen[2].extend(m.entries)
                continue
            props[m.dst] = (len(early), m, list(m.entries))
        if isinstance(m, _EARLY):
            early.append(m)
            continue
        if type(m) is MsgAppResp and not m.reject:
            key = (m.dst, m.term)
            at = best.get(key)
            if at is not None:
                prev = late[at]
                assert isinstance(prev, MsgAppResp)
                late[at] = None
                if prev.index > m.index:
                    m = prev
            best[key] = len(late)
        late.append(m)
    for at, prop, entries in props.values():
        if len(entries) != len(prop.entries):
            early[at] = replace(prop, entries=tuple(entries))
    return tuple(early), tuple(m for m in late if m is not None)


@dataclass(frozen=True, slots=True, kw_only=True)
class SoftState:
    """Volatile state worth reporting (not persisted): who leads, and our role."""

    lead: int
    role: Role


@dataclass(frozen=True, slots=True, kw_only=True)
class Ready:
    """Everything the core wants done, in the order the shell must do it.

    0. `early_messages`: send them at once, before persisting. They are a leader's
       appends, heartbeats, snapshots, read answers and transfer orders, which promise
       nothing about this node's disk, so the leader writes its log in parallel with
       replicating it (Raft thesis §10.2.1). Every commit index they carry covers only
       entries persisted by earlier Readys: an ack of this Ready's entries can only
       answer these very messages, and it is stepped after this Ready was taken.
    1. `snapshot`: persist it (storage.apply_snapshot) and restore the state machine.
    2. `entries`: append to storage (replacing stored entries from entries[0].index on).
    3. `hard_state`: persist it. Steps 1–3 must be durable (fsync when `must_sync`)
       before step 4: a vote or an acknowledgement must never leave the node before
       what it promises is on disk ("persist before sending").
    4. `messages`: send them (any order; losing some is fine).
    5. `committed_entries`: apply them in order; for `CONF_CHANGE` entries call
       `Node.apply_conf_change`. Skip empty `NORMAL` entries (leader no-ops).
    6. `read_states`: serve each read once the state machine applied `index`.
    7. `Node.advance(ready)`.
    `soft_state` is informational (leader changes) and can be read at any point.
    """

    soft_state: SoftState | None = None
    hard_state: HardState | None = None
    snapshot: Snapshot | None = None
    entries: tuple[Entry, ...] = ()
    committed_entries: tuple[Entry, ...] = ()
    early_messages: tuple[Message, ...] = ()
    messages: tuple[Message, ...] = ()
    read_states: tuple[ReadState, ...] = ()
    must_sync: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ProgressStatus:
    """The leader's view of one member, for status pages and tests."""

    match: int
    next: int
    state: ProgressState
    learner: bool
    recent_active: bool
    paused: bool
    inflight: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Status:
    """A snapshot of the node's state (`shoal get servers` shows this)."""

    id: int
    term: int
    vote: int
    commit: int
    applied: int
    last_index: int
    lead: int
    role: Role
    conf_state: ConfState
    lead_transferee: int
    progress: Mapping[int, ProgressStatus]


class Node:
    """A Raft node driven by its shell: no I/O, no clock, no threads."""

    __slots__ = ("raft", "_prev_soft", "_prev_hard", "_in_flight")

    def __init__(
        self,
        config: Config,
        storage: Storage,
        *,
        rng: random.Random,
        logger: Logger | None = None,
    ) -> None:
        self.raft = Raft(config, storage, rng=rng, logger=logger)
        self._prev_soft = self._soft_state()
        self._prev_hard = self.raft.hard_state()
        self._in_flight: Ready | None = None

    # --- views -----------------------------------------------------------------------

    @property
    def id(self) -> int:
        return self.raft.id

    @property
    def term(self) -> int:
        return self.raft.term

    @property
    def lead(self) -> int:
        return self.raft.lead

    @property
    def role(self) -> Role:
        return self.raft.role

    @property
    def is_leader(self) -> bool:
        return self.raft.role is Role.LEADER

    def conf_state(self) -> ConfState:
        """The membership as of the last applied change (what a snapshot records)."""
        return self.raft.conf_state()

    def status(self) -> Status:
        r = self.raft
        progress: dict[int, ProgressStatus] = {}
        if r.role is Role.LEADER:
            for id, pr in r.tracker.progress.items():
                progress[id] = ProgressStatus(
                    match=pr.match,
                    next=pr.next,
                    state=pr.state,
                    learner=pr.is_learner,
                    recent_active=pr.recent_active,
                    paused=pr.is_paused(),
                    inflight=len(pr.inflights),
                )
        return Status(
            id=r.id,
            term=r.term,
            vote=r.vote,
            commit=r.log.committed,
            applied=r.log.applied,
            last_index=r.log.last_index(),
            lead=r.lead,
            role=r.role,
            conf_state=r.conf_state(),
            lead_transferee=r.lead_transferee,
            progress=progress,
        )

    def _soft_state(self) -> SoftState:
        return SoftState(lead=self.raft.lead, role=self.raft.role)

    # --- inputs ----------------------------------------------------------------------

    def tick(self) -> None:
        """One logical tick (the shell calls this every `config.tick_interval`)."""
        self.raft.tick()

    def step(self, message: Message) -> None:
        """Feed one message received from a peer."""
        self.raft.step(message)

    def campaign(self) -> None:
        """Start an election now (tests, or an operator forcing one)."""
        self.raft.hup(CampaignKind.ELECTION)

    def propose(self, data: bytes) -> int:
        """Append `data` to the log; returns its index. Raises `NotLeader`/`ProposalDropped`."""
        return self.raft.propose((Entry(term=0, index=0, data=data),))

    def propose_many(self, datas: list[bytes]) -> int:
        """Append several entries at once; returns the index of the last one."""
        return self.raft.propose(tuple(Entry(term=0, index=0, data=d) for d in datas))

    def forward(self, datas: list[bytes]) -> int:
        """Follower: send entries to the leader in one `MsgProp`; returns the leader's id.

        Raises `NotLeader(0)` when no leader is known and `IllegalTransition` on the
        leader (which proposes). No answer comes back: the shell watches for the
        commands being applied and sends again what was not (see `Raft.forward`).
        """
        return self.raft.forward(tuple(Entry(term=0, index=0, data=d) for d in datas))

    def propose_conf_change(self, cc: ConfChange) -> int:
        """Propose one membership change; raises `ConfChangeRefused` while one is pending."""
        return self.raft.propose((Entry(term=0, index=0, kind=EntryKind.CONF_CHANGE, data=cc.encode()),))

    def apply_conf_change(self, cc: ConfChange) -> ConfState:
        """Apply a committed `CONF_CHANGE` entry (decoded with `ConfChange.decode`)."""
        return self.raft.apply_conf_change(cc)

    def transfer_leadership(self, to: int) -> None:
        """Ask the leader to hand leadership to voter `to`."""
        self.raft.transfer_leader(to)

    def read_index(self, context: bytes) -> None:
        """Request a linearizable read; answered by a `ReadState` with this context."""
        self.raft.read_index(context)

    def report_unreachable(self, id: int) -> None:
        self.raft.report_unreachable(id)

    def report_snapshot(self, id: int, ok: bool) -> None:
        self.raft.report_snapshot(id, ok)

    # --- ready / advance -------------------------------------------------------------

    def has_ready(self) -> bool:
        if self._in_flight is not None:
            return False
        r = self.raft
        r.flush()
        log = r.log
        return bool(
            r.msgs
            or log.unstable.entries
            or log.unstable.snapshot is not None
            or r.read_states
            or log.has_next_committed_entries()
            or self._soft_state() != self._prev_soft
            or r.hard_state() != self._prev_hard
        )

    def ready(self) -> Ready:
        """Take everything to do; see `Ready` for the order. Call `advance` after."""
        if self._in_flight is not None:
            raise IllegalTransition("ready() called again before advance()")
        r = self.raft
        r.flush()
        soft = self._soft_state()
        hard = r.hard_state()
        entries = tuple(r.log.unstable.entries)
        snapshot = r.log.unstable.snapshot
        early, late = outbox(r.msgs)
        rd = Ready(
            soft_state=soft if soft != self._prev_soft else None,
            hard_state=hard if hard != self._prev_hard else None,
            snapshot=snapshot,
            entries=entries,
            committed_entries=tuple(r.log.next_committed_entries()),
            early_messages=early,
            messages=late,
            read_states=tuple(r.read_states),
            must_sync=bool(entries)
            or snapshot is not None
            or hard.term != self._prev_hard.term
            or hard.vote != self._prev_hard.vote,
        )
        r.msgs = []
        r.read_states = []
        self._prev_soft = soft
        self._prev_hard = hard
        self._in_flight = rd
        return rd

    def advance(self, rd: Ready) -> None:
        """Everything in `rd` was done (persisted, sent, applied)."""
        if rd is not self._in_flight:
            raise IllegalTransition("advance() with a Ready that is not the one in flight")
        log = self.raft.log
        if rd.snapshot is not None:
            log.stable_snap_to(rd.snapshot.index)
            log.applied_to(rd.snapshot.index)
        if rd.entries:
            last = rd.entries[-1]
            log.stable_to(last.index, last.term)
        if rd.committed_entries:
            log.applied_to(rd.committed_entries[-1].index)
        self._in_flight = None
