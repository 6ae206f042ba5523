"""The Raft state machine: roles, elections, replication, commitment, reads, transfers.

This is the core behind `Node` (node.py). It does no I/O: it appends the messages it
wants sent to `msgs`, its log tail to `log.unstable`, its read answers to `read_states`,
and `Node.ready()` hands them to the shell.

Rules (the Raft paper, thesis and etcd-io/raft, in this module's own words):
- Terms. Every message is first checked against our term: a higher term makes us a
  follower in it (except a pre-vote, which changes no term, and a vote request
  ignored inside a leader lease); a lower term is ignored — but an append or heartbeat
  from a stale leader is answered, so that leader learns our term and steps down.
- Roles are step functions swapped by `become_*`: follower, pre-candidate, candidate,
  leader. A transition the protocol never makes (follower → leader, leader →
  candidate, …) raises `IllegalTransition`.
- Election. A follower that heard no leader for its randomized timeout
  ([election_tick, 2 × election_tick) ticks) first runs a pre-vote: it asks whether it
  *would* win in term + 1, without changing any term; only with a majority of yeses it
  campaigns for real. A vote is granted to a candidate whose log is at least as up to
  date as ours, once per term. With check-quorum, a leader, and a follower that heard
  from a leader within election_tick − 1 ticks, ignore vote requests (the leader
  lease), unless the request comes from a leadership transfer. A pre-candidate does not
  grant a pre-vote to a competitor with an equal log and a higher id, so colliding
  timeouts do not split the real vote (liveness only: pre-votes persist nothing).
- A new leader appends an empty entry; it commits entries only by counting replicas of
  entries of its own term (Figure 8): older entries commit indirectly with them.
- Replication is per follower (progress.py): probe one MsgApp at a time until the
  follower's log matches, then stream within the inflights window. A rejection carries
  a hint that lets the leader skip a whole term of conflicting entries at once. Entries
  the leader has compacted are replaced by a snapshot.
- Proposals made between two `ready()` calls are broadcast together (batching), and so
  is a commit index that advanced meanwhile: a follower gets one append per Ready with
  the new entries and the new commit, however many acks moved the commit index.
- Check-quorum: a leader that did not hear from a majority within election_tick steps
  down, so an isolated leader stops taking writes and reads.
- Membership: single-server changes, one at a time, effective when applied
  (confchange.py). A leader removed from the membership steps down.
- Leadership transfer: the leader stops taking proposals, brings the transferee's log
  up to date, then sends MsgTimeoutNow; the transferee campaigns at once, skipping
  pre-vote and the lease. The transfer is abandoned after election_tick.
- ReadIndex (readonly.py): reads are confirmed by a heartbeat round after the leader
  has committed an entry of its term; followers forward read requests to the leader.
- Proposal forwarding (`forward`): a follower sends proposals to the leader it knows
  in a `MsgProp`; the leader appends them as its own (a `MsgProp` is not subject to the
  term rules: it carries data, not a claim). A forwarded proposal that reaches a
  non-leader, a leader handing over, or carries a membership change is dropped without
  an answer: the core never promises delivery, the forwarding shell re-sends, and the
  state machine's sessions make a repeated command apply once.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable

from . import confchange
from .config import Config
from .errors import (
    ConfChangeRefused,
    IllegalTransition,
    LogCompacted,
    NotLeader,
    ProposalDropped,
    RaftInvariantError,
    SnapshotTemporarilyUnavailable,
)
from .log import RaftLog
from .logger import Logger, NullLogger
from .messages import (
    NONE,
    ConfChange,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Message,
    MsgApp,
    MsgAppResp,
    MsgHeartbeat,
    MsgHeartbeatResp,
    MsgPreVote,
    MsgPreVoteResp,
    MsgProp,
    MsgReadIndex,
    MsgReadIndexResp,
    MsgSnap,
    MsgTimeoutNow,
    MsgTransferLeader,
    MsgVote,
    MsgVoteResp,
    Snapshot,
    entry_size,
)
from .progress import STALL_HEARTBEATS, Progress, ProgressState, ProgressTracker
from .quorum import VoteResult, has_quorum
from .readonly import ReadIndexStatus, ReadOnly, ReadState
from .storage import Storage

__all__ = ["Role", "CampaignKind", "Raft"]


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


class CampaignKind(enum.Enum):
    PRE_ELECTION = "pre_election"
    ELECTION = "election"
    TRANSFER = "transfer"


_ANSWERED_WHEN_STALE = (MsgApp, MsgHeartbeat)
_FROM_LEADER = (MsgApp, MsgHeartbeat, MsgSnap)


class Raft:
    """One node's Raft state machine. Drive it through `Node`."""

    def __init__(
        self,
        config: Config,
        storage: Storage,
        *,
        rng: random.Random,
        logger: Logger | None = None,
    ) -> None:
        config.validate()
        self.id = config.id
        self.config = config
        self.rng = rng
        self.logger: Logger = logger if logger is not None else NullLogger()
        self.log = RaftLog(storage, config.max_committed_size_per_ready)
        hard_state, conf_state = storage.initial_state()
        self.tracker = ProgressTracker(config.max_inflight_msgs, config.max_inflight_bytes)
        self.tracker.apply_conf(conf_state, self.log.last_index() + 1)

        self.term = 0
        self.vote = NONE
        self.lead = NONE
        self.role = Role.FOLLOWER
        self.msgs: list[Message] = []
        self.read_states: list[ReadState] = []
        self.read_only = ReadOnly()
        # ReadIndex requests that arrived before this leader committed in its term.
        self.pending_read_index: list[tuple[int, bytes]] = []
        self.lead_transferee = NONE
        # Index of the latest membership change (or of the no-op of a new leader) that
        # must be applied before another change may be proposed.
        self.pending_conf_index = 0
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = config.election_tick
        # A follower's lease ends one tick before the earliest election timeout: the
        # followers' tick phases differ by up to a tick, so a candidate that timed out
        # after exactly election_tick ticks would otherwise find the other follower
        # one tick short of it and be refused, costing a whole extra timeout (T4).
        # Safety never rests on the lease; it only keeps healthy leaders in place.
        self._follower_lease_ticks = max(config.election_tick - 1, 1)
        self._broadcast_pending = False
        self._step_role: Callable[[Message], None] = self._step_follower
        self._tick: Callable[[], None] = self._tick_election

        if not hard_state.is_empty():
            self._load_state(hard_state)
        if config.applied > 0:
            if config.applied > self.log.committed:
                raise RaftInvariantError(
                    f"config.applied={config.applied} is past the persisted commit {self.log.committed}"
                )
            self.log.applied_to(config.applied)
        self.become_follower(self.term, NONE)
        self.logger.info(
            "raft.started",
            id=self.id,
            term=self.term,
            commit=self.log.committed,
            applied=self.log.applied,
            last_index=self.log.last_index(),
            voters=sorted(self.tracker.voters),
            learners=sorted(self.tracker.learners),
        )

    def _load_state(self, hs: HardState) -> None:
        if hs.commit > self.log.last_index():
            raise RaftInvariantError(
                f"persisted commit {hs.commit} is past the last index {self.log.last_index()}: "
                "the log was truncated or lost"
            )
        # A commit below the snapshot index means the node crashed after persisting a
        # snapshot from the leader but before its hard state: the snapshot is
        # committed by definition, so log.committed (its index) stands.
        self.log.committed = max(hs.commit, self.log.committed)
        self.term = hs.term
        self.vote = hs.vote

    # --- views -----------------------------------------------------------------------

    def hard_state(self) -> HardState:
        return HardState(term=self.term, vote=self.vote, commit=self.log.committed)

    def promotable(self) -> bool:
        """May this node campaign? Only voters may."""
        return self.id in self.tracker.voters

    def conf_state(self) -> ConfState:
        return self.tracker.conf_state()

    def _committed_entry_in_current_term(self) -> bool:
        return self.log.term_or_none(self.log.committed) == self.term

    # --- transitions -----------------------------------------------------------------

    def _reset(self, term: int) -> None:
        if self.term != term:
            self.term = term
            self.vote = NONE
        self.lead = NONE
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = self.rng.randrange(
            self.config.election_tick, 2 * self.config.election_tick
        )
        self.lead_transferee = NONE
        self.tracker.reset_votes()
        self.tracker.reset_progress(self.log.last_index() + 1)
        own = self.tracker.progress.get(self.id)
        if own is not None:
            own.match = self.log.last_index()
        self.pending_conf_index = 0
        self.read_only.reset()
        self.pending_read_index.clear()
        self._broadcast_pending = False

    def become_follower(self, term: int, lead: int) -> None:
        self._reset(term)
        self.lead = lead
        self.role = Role.FOLLOWER
        self._step_role = self._step_follower
        self._tick = self._tick_election
        self.logger.info("raft.became_follower", id=self.id, term=term, lead=lead)

    def become_pre_candidate(self) -> None:
        if self.role is Role.LEADER:
            raise IllegalTransition("leader -> pre_candidate")
        # A pre-candidate keeps its term and vote: nothing it does is persisted.
        self.tracker.reset_votes()
        self.lead = NONE
        self.role = Role.PRE_CANDIDATE
        self._step_role = self._step_candidate
        self._tick = self._tick_election
        self.logger.info("raft.became_pre_candidate", id=self.id, term=self.term)

    def become_candidate(self) -> None:
        if self.role is Role.LEADER:
            raise IllegalTransition("leader -> candidate")
        self._reset(self.term + 1)
        self.vote = self.id
        self.role = Role.CANDIDATE
        self._step_role = self._step_candidate
        self._tick = self._tick_election
        self.logger.info("raft.became_candidate", id=self.id, term=self.term)

    def become_leader(self) -> None:
        if self.role is not Role.CANDIDATE:
            raise IllegalTransition(f"{self.role.value} -> leader")
        self._reset(self.term)
        self.lead = self.id
        self.role = Role.LEADER
        self._step_role = self._step_leader
        self._tick = self._tick_heartbeat
        own = self.tracker.progress.get(self.id)
        if own is not None:
            own.become_replicate()
            own.recent_active = True
        # The no-op: committing it commits everything before it (Figure 8), tells this
        # leader the cluster's commit index (ReadIndex) and gates membership changes.
        self.pending_conf_index = self._append([(EntryKind.NORMAL, b"")])
        self.logger.info("raft.became_leader", id=self.id, term=self.term, last_index=self.log.last_index())

    # --- ticks -----------------------------------------------------------------------

    def tick(self) -> None:
        self._tick()

    def _tick_election(self) -> None:
        self.election_elapsed += 1
        if self.promotable() and self.election_elapsed >= self.randomized_election_timeout:
            self.election_elapsed = 0
            self.hup()

    def _tick_heartbeat(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self.election_elapsed >= self.config.election_tick:
            self.election_elapsed = 0
            if self.config.check_quorum:
                own = self.tracker.progress.get(self.id)
                if own is not None:
                    own.recent_active = True
                if not self.tracker.quorum_active():
                    self.logger.warning("raft.stepped_down", id=self.id, term=self.term, reason="check_quorum")
                    self.become_follower(self.term, NONE)
                    return
                for id, pr in self.tracker.progress.items():
                    if id != self.id:
                        pr.recent_active = False
            if self.lead_transferee != NONE:
                self.logger.warning("raft.transfer_aborted", id=self.id, transferee=self.lead_transferee)
                self.lead_transferee = NONE
        if self.heartbeat_elapsed >= self.config.heartbeat_tick:
            self.heartbeat_elapsed = 0
            self._bcast_heartbeat()

    # --- elections -------------------------------------------------------------------

    def hup(self, kind: CampaignKind | None = None) -> None:
        """Start an election now (what an election timeout does)."""
        if self.role is Role.LEADER:
            return
        if not self.promotable():
            self.logger.debug("raft.campaign_skipped", id=self.id, reason="not a voter")
            return
        if self._has_unapplied_conf_change():
            # Our membership may be about to change; campaigning on the old one risks
            # a quorum that does not intersect the new one.
            self.logger.info("raft.campaign_skipped", id=self.id, reason="unapplied membership change")
            return
        if kind is None:
            kind = CampaignKind.PRE_ELECTION if self.config.pre_vote else CampaignKind.ELECTION
        self._campaign(kind)

    def _has_unapplied_conf_change(self) -> bool:
        lo = max(self.log.applied, self.log.first_index() - 1) + 1
        if lo > self.log.committed:
            return False
        ents = self.log.slice(lo, self.log.committed + 1, 1 << 62)
        return any(e.kind is EntryKind.CONF_CHANGE for e in ents)

    def _campaign(self, kind: CampaignKind) -> None:
        if kind is CampaignKind.PRE_ELECTION:
            self.become_pre_candidate()
            vote_term = self.term + 1
        else:
            self.become_candidate()
            vote_term = self.term
        self.tracker.record_vote(self.id, True)
        if self.tracker.tally() is VoteResult.WON:
            # A single-voter cluster wins at once.
            if kind is CampaignKind.PRE_ELECTION:
                self._campaign(CampaignKind.ELECTION)
            else:
                self.become_leader()
            return
        last_index = self.log.last_index()
        last_term = self.log.last_term()
        for id in sorted(self.tracker.voters):
            if id == self.id:
                continue
            if kind is CampaignKind.PRE_ELECTION:
                self._send(MsgPreVote(src=self.id, dst=id, term=vote_term, last_index=last_index, last_term=last_term))
            else:
                self._send(
                    MsgVote(
                        src=self.id,
                        dst=id,
                        term=vote_term,
                        last_index=last_index,
                        last_term=last_term,
                        transfer=kind is CampaignKind.TRANSFER,
                    )
                )

    def _handle_vote_request(self, m: MsgVote | MsgPreVote) -> None:
        pre = isinstance(m, MsgPreVote)
        can_vote = (
            self.vote == m.src
            or (self.vote == NONE and self.lead == NONE)
            or (pre and m.term > self.term)
        )
        if can_vote and pre and self.role is Role.PRE_CANDIDATE and m.src > self.id:
            # Two pre-candidates with equal logs would both pass pre-vote and split
            # the real vote, costing another election timeout: the lower id goes first.
            can_vote = (m.last_term, m.last_index) != (self.log.last_term(), self.log.last_index())
        if can_vote and self.log.is_up_to_date(m.last_index, m.last_term):
            if pre:
                self._send(MsgPreVoteResp(src=self.id, dst=m.src, term=m.term))
            else:
                self.election_elapsed = 0
                self.vote = m.src
                self._send(MsgVoteResp(src=self.id, dst=m.src, term=m.term))
            self.logger.debug("raft.vote_granted", id=self.id, to=m.src, term=m.term, pre=pre)
        else:
            if pre:
                self._send(MsgPreVoteResp(src=self.id, dst=m.src, term=self.term, reject=True))
            else:
                self._send(MsgVoteResp(src=self.id, dst=m.src, term=self.term, reject=True))
            self.logger.debug("raft.vote_rejected", id=self.id, to=m.src, term=m.term, pre=pre)

    # --- step ------------------------------------------------------------------------

    def step(self, m: Message) -> None:
        """Feed one message. Raises `NotLeader`/`ProposalDropped` only for a local `MsgProp`."""
        if isinstance(m, MsgProp):
            if m.src in (NONE, self.id):
                self.propose(m.entries)
            else:
                self._step_forwarded(m)
            return
        if m.dst != self.id or m.src == self.id:
            self.logger.warning("raft.misrouted", id=self.id, src=m.src, dst=m.dst)
            return
        if m.term > self.term:
            if isinstance(m, (MsgVote, MsgPreVote)):
                force = isinstance(m, MsgVote) and m.transfer
                in_lease = (
                    self.config.check_quorum
                    and self.lead != NONE
                    and (self.role is Role.LEADER or self.election_elapsed < self._follower_lease_ticks)
                )
                if in_lease and not force:
                    self.logger.debug("raft.vote_ignored_in_lease", id=self.id, src=m.src, term=m.term)
                    return
            if isinstance(m, MsgPreVote):
                pass  # a pre-vote never changes our term
            elif isinstance(m, MsgPreVoteResp) and not m.reject:
                pass  # a granted pre-vote carries the term we are about to campaign in
            else:
                self.become_follower(m.term, m.src if isinstance(m, _FROM_LEADER) else NONE)
        elif m.term < self.term:
            if isinstance(m, _ANSWERED_WHEN_STALE) and (self.config.check_quorum or self.config.pre_vote):
                # A leader from an older term: with pre-vote or check-quorum it would not
                # learn our term otherwise (we never campaign against it), so tell it.
                self._send(MsgAppResp(src=self.id, dst=m.src, term=self.term, index=0))
            elif isinstance(m, MsgPreVote):
                self._send(MsgPreVoteResp(src=self.id, dst=m.src, term=self.term, reject=True))
            return
        if isinstance(m, (MsgVote, MsgPreVote)):
            self._handle_vote_request(m)
        else:
            self._step_role(m)

    def _step_follower(self, m: Message) -> None:
        if isinstance(m, MsgApp):
            self.election_elapsed = 0
            self.lead = m.src
            self._handle_append(m)
        elif isinstance(m, MsgHeartbeat):
            self.election_elapsed = 0
            self.lead = m.src
            self._handle_heartbeat(m)
        elif isinstance(m, MsgSnap):
            self.election_elapsed = 0
            self.lead = m.src
            self._handle_snapshot(m)
        elif isinstance(m, MsgReadIndexResp):
            self.read_states.append(ReadState(index=m.index, context=m.context))
        elif isinstance(m, MsgTimeoutNow):
            if self.promotable():
                self.logger.info("raft.transfer_campaign", id=self.id, term=self.term, from_=m.src)
                # Skips pre-vote and the lease: the leader asked for this election.
                self._campaign(CampaignKind.TRANSFER)
        elif isinstance(m, MsgTransferLeader):
            if self.lead != NONE:
                self._send(MsgTransferLeader(src=m.src, dst=self.lead, term=self.term, transferee=m.transferee))
        # MsgAppResp, MsgVoteResp, MsgHeartbeatResp, MsgReadIndex of this term: stale
        # answers to a role we no longer have; nothing to do.

    def _step_candidate(self, m: Message) -> None:
        if isinstance(m, _FROM_LEADER):
            # A leader exists in our term (or a higher one, already adopted by step()).
            self.become_follower(m.term, m.src)
            self._step_follower(m)
            return
        expected = MsgPreVoteResp if self.role is Role.PRE_CANDIDATE else MsgVoteResp
        if isinstance(m, (MsgVoteResp, MsgPreVoteResp)):
            if not isinstance(m, expected):
                return
            self.tracker.record_vote(m.src, not m.reject)
            result = self.tracker.tally()
            if result is VoteResult.WON:
                if self.role is Role.PRE_CANDIDATE:
                    self._campaign(CampaignKind.ELECTION)
                else:
                    self.become_leader()
                    self._bcast_append()
            elif result is VoteResult.LOST:
                self.become_follower(self.term, NONE)

    def _step_leader(self, m: Message) -> None:
        if isinstance(m, MsgAppResp):
            self._handle_append_response(m)
        elif isinstance(m, MsgHeartbeatResp):
            self._handle_heartbeat_response(m)
        elif isinstance(m, MsgReadIndex):
            if m.src in self.tracker.progress:
                self._leader_read_index(m.src, m.context)
        elif isinstance(m, MsgTransferLeader):
            self._transfer_leader(m.transferee)
        elif isinstance(m, (MsgApp, MsgSnap)):
            # Two leaders in one term: impossible unless a peer is broken or forged.
            self.logger.warning("raft.second_leader_in_term", id=self.id, term=self.term, src=m.src)

    # --- follower side of replication -----------------------------------------------

    def _handle_append(self, m: MsgApp) -> None:
        if m.index < self.log.committed:
            self._send(MsgAppResp(src=self.id, dst=m.src, term=self.term, index=self.log.committed))
            return
        last_new = self.log.maybe_append(m.index, m.log_term, m.commit, m.entries)
        if last_new is not None:
            self._send(MsgAppResp(src=self.id, dst=m.src, term=self.term, index=last_new))
            return
        hint_index, hint_term = self.log.find_conflict_by_term(min(m.index, self.log.last_index()), m.log_term)
        self.logger.debug(
            "raft.append_rejected", id=self.id, index=m.index, log_term=m.log_term, hint=hint_index, hint_term=hint_term
        )
        self._send(
            MsgAppResp(
                src=self.id,
                dst=m.src,
                term=self.term,
                index=m.index,
                reject=True,
                reject_hint=hint_index,
                log_term=hint_term,
            )
        )

    def _handle_heartbeat(self, m: MsgHeartbeat) -> None:
        self.log.commit_to(m.commit)
        self._send(MsgHeartbeatResp(src=self.id, dst=m.src, term=self.term, context=m.context))

    def _handle_snapshot(self, m: MsgSnap) -> None:
        if self._restore(m.snapshot):
            self.logger.info("raft.snapshot_restored", id=self.id, index=m.snapshot.index, term=m.snapshot.term)
            self._send(MsgAppResp(src=self.id, dst=m.src, term=self.term, index=self.log.last_index()))
        else:
            self._send(MsgAppResp(src=self.id, dst=m.src, term=self.term, index=self.log.committed))

    def _restore(self, snap: Snapshot) -> bool:
        if snap.index <= self.log.committed:
            return False
        if self.log.match_term(snap.index, snap.term):
            # We already hold the snapshot's last entry: just learn that it is committed.
            self.log.commit_to(snap.index)
            return False
        self.log.restore(snap)
        self.tracker.apply_conf(snap.meta.conf_state, self.log.last_index() + 1)
        return True

    # --- leader side of replication --------------------------------------------------

    def _send(self, m: Message) -> None:
        self.msgs.append(m)

    def _append(self, items: list[tuple[EntryKind, bytes]]) -> int:
        last = self.log.last_index()
        term = self.term
        entries = [Entry(term=term, index=last + i, kind=kind, data=data) for i, (kind, data) in enumerate(items, 1)]
        last = self.log.append(entries)
        own = self.tracker.progress.get(self.id)
        if own is not None:
            own.maybe_update(last)
        self._maybe_commit()
        self._broadcast_pending = True
        return last

    def flush(self) -> None:
        """Send the appends for proposals made, and the commit index reached, since the
        last flush: one batch, at most one new append per follower."""
        if self._broadcast_pending:
            self._broadcast_pending = False
            if self.role is Role.LEADER:
                committed = self.log.committed
                for id, pr in self.tracker.progress.items():
                    if id != self.id:
                        # No empty append to a follower that was already sent this
                        # commit index (by the pipelining of an ack in this batch).
                        self._send_append(id, send_if_empty=pr.sent_commit < committed)

    def _maybe_commit(self) -> bool:
        index = min(self.tracker.committed(), self.log.last_index())
        if self.log.maybe_commit(index, self.term):
            if self.pending_read_index and self._committed_entry_in_current_term():
                pending, self.pending_read_index = self.pending_read_index, []
                for requester, context in pending:
                    self._accept_read_index(requester, context)
            return True
        return False

    def _bcast_append(self) -> None:
        for id in self.tracker.progress:
            if id != self.id:
                self._send_append(id)

    def _send_append(self, to: int, send_if_empty: bool = True) -> bool:
        pr = self.tracker.progress[to]
        if pr.is_paused():
            return False
        prev_index = pr.next - 1
        if prev_index > self.log.last_index():
            self.logger.warning("raft.progress_past_log", id=self.id, to=to, next=pr.next, last=self.log.last_index())
            pr.become_probe()
            return False
        prev_term = self.log.term_or_none(prev_index)
        entries: list[Entry] | None = None
        if prev_term is not None:
            try:
                entries = self.log.entries_from(pr.next, self.config.max_size_per_msg)
            except LogCompacted:
                entries = None
        if prev_term is None or entries is None:
            return self._send_snapshot(to, pr)
        if not entries and not send_if_empty:
            return False
        self._send(
            MsgApp(
                src=self.id,
                dst=to,
                term=self.term,
                log_term=prev_term,
                index=prev_index,
                entries=tuple(entries),
                commit=self.log.committed,
            )
        )
        pr.sent_commit = self.log.committed
        if entries:
            pr.sent_entries(entries[-1].index, sum(entry_size(e) for e in entries))
        elif pr.state is ProgressState.PROBE:
            pr.probe_sent = True
        return True

    def _send_snapshot(self, to: int, pr: Progress) -> bool:
        if not pr.recent_active:
            # Snapshots are expensive; wait until the follower shows it is alive.
            return False
        try:
            snap = self.log.snapshot()
        except SnapshotTemporarilyUnavailable:
            self.logger.debug("raft.snapshot_unavailable", id=self.id, to=to)
            return False
        if snap.is_empty():
            raise RaftInvariantError("entries are compacted but storage has no snapshot")
        pr.become_snapshot(snap.index)
        self.logger.info("raft.snapshot_sent", id=self.id, to=to, index=snap.index, term=snap.term)
        self._send(MsgSnap(src=self.id, dst=to, term=self.term, snapshot=snap))
        return True

    def _handle_append_response(self, m: MsgAppResp) -> None:
        pr = self.tracker.progress.get(m.src)
        if pr is None:
            return
        pr.recent_active = True
        if m.reject:
            next_probe = m.reject_hint
            if m.log_term > 0:
                # Skip every entry of ours whose term the follower cannot have there.
                next_probe, _ = self.log.find_conflict_by_term(m.reject_hint, m.log_term)
            if pr.maybe_decr_to(m.index, next_probe):
                if pr.state is ProgressState.REPLICATE:
                    pr.become_probe()
                self._send_append(m.src)
            return
        was_paused = pr.is_paused()
        if not pr.maybe_update(m.index):
            return
        if pr.state is ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state is ProgressState.SNAPSHOT:
            if pr.match >= pr.pending_snapshot:
                pr.become_probe()
                pr.become_replicate()
        else:
            pr.inflights.free_le(m.index)
        if self._maybe_commit():
            # Followers hear the new commit index in the next flush, together with the
            # entries proposed meanwhile: one append per follower per Ready, however
            # many acks moved the commit index.
            self._broadcast_pending = True
        elif was_paused:
            self._send_append(m.src)
        # Pipelining: fill the window with whatever else the follower lacks.
        while pr.state is ProgressState.REPLICATE and self._send_append(m.src, send_if_empty=False):
            pass
        if m.src == self.lead_transferee and pr.match == self.log.last_index():
            self._send(MsgTimeoutNow(src=self.id, dst=m.src, term=self.term))
            self.logger.info("raft.transfer_timeout_now", id=self.id, to=m.src)

    def _handle_heartbeat_response(self, m: MsgHeartbeatResp) -> None:
        pr = self.tracker.progress.get(m.src)
        if pr is None:
            return
        pr.recent_active = True
        pr.probe_sent = False
        last = self.log.last_index()
        if pr.state is ProgressState.REPLICATE and pr.match < last and pr.next > pr.match + 1:
            pr.stalled_heartbeats += 1
            if pr.stalled_heartbeats >= STALL_HEARTBEATS:
                self.logger.debug("raft.replication_stalled", id=self.id, to=m.src, match=pr.match, next=pr.next)
                pr.become_probe()
        if pr.match < last:
            self._send_append(m.src, send_if_empty=pr.state is ProgressState.PROBE)
        if m.context:
            acks = self.read_only.recv_ack(m.src, m.context)
            if acks is not None and has_quorum(self.tracker.voters, acks.__contains__):
                for status in self.read_only.advance(m.context):
                    self._answer_read(status)

    def _bcast_heartbeat(self, context: bytes | None = None) -> None:
        if context is None:
            context = self.read_only.last_pending_context()
        committed = self.log.committed
        for id, pr in self.tracker.progress.items():
            if id == self.id:
                continue
            # Never tell a follower to commit past what it is known to hold.
            self._send(
                MsgHeartbeat(src=self.id, dst=id, term=self.term, commit=min(pr.match, committed), context=context)
            )

    # --- local requests --------------------------------------------------------------

    def propose(self, entries: tuple[Entry, ...]) -> int:
        if self.role is not Role.LEADER:
            raise NotLeader(self.lead)
        if self.lead_transferee != NONE:
            raise ProposalDropped(f"leadership is being transferred to node {self.lead_transferee}")
        if self.id not in self.tracker.progress:
            raise ProposalDropped("this node was removed from the cluster")
        items: list[tuple[EntryKind, bytes]] = []
        for e in entries:
            if e.kind is EntryKind.CONF_CHANGE:
                if self.pending_conf_index > self.log.applied:
                    raise ConfChangeRefused(
                        f"the change at index {self.pending_conf_index} is not applied yet "
                        f"(applied {self.log.applied}); one change at a time"
                    )
                confchange.validate(self.tracker.conf_state(), ConfChange.decode(e.data))
                if len(entries) > 1:
                    raise ConfChangeRefused("propose a membership change on its own")
            items.append((e.kind, e.data))
        last = self._append(items)
        if any(kind is EntryKind.CONF_CHANGE for kind, _ in items):
            self.pending_conf_index = last
        return last

    def forward(self, entries: tuple[Entry, ...]) -> int:
        """Follower: send proposals to the leader we know, in one `MsgProp`; returns its id.

        Nothing comes back: the proposer learns the outcome when the entries are applied
        (the state machine's sessions say whose they are), so a proposal lost on the way
        (a leader change, a full queue) is found by the shell and sent again — which is
        safe only because every command carries a client id and sequence number.
        """
        if self.role is Role.LEADER:
            raise IllegalTransition("the leader proposes its writes; only a follower forwards them")
        if self.lead == NONE:
            raise NotLeader(NONE)
        if any(e.kind is not EntryKind.NORMAL for e in entries):
            raise ValueError("only NORMAL entries are forwarded; membership changes are proposed on the leader")
        self._send(MsgProp(src=self.id, dst=self.lead, term=self.term, entries=entries))
        return self.lead

    def _step_forwarded(self, m: MsgProp) -> None:
        """A follower's forwarded proposals: appended if we lead and take proposals, else
        dropped (the follower sends them again to whoever leads next)."""
        if m.dst != self.id:
            self.logger.warning("raft.misrouted", id=self.id, src=m.src, dst=m.dst)
            return
        if self.role is not Role.LEADER or any(e.kind is not EntryKind.NORMAL for e in m.entries):
            self.logger.debug("raft.forwarded_proposal_dropped", id=self.id, src=m.src, n=len(m.entries),
                              role=self.role.value)
            return
        try:
            self.propose(m.entries)
        except (NotLeader, ProposalDropped) as exc:
            self.logger.debug("raft.forwarded_proposal_dropped", id=self.id, src=m.src, n=len(m.entries),
                              reason=str(exc))

    def apply_conf_change(self, cc: ConfChange) -> ConfState:
        """Apply a committed membership change; returns the new membership."""
        conf = confchange.apply(self.tracker.conf_state(), cc)
        self.tracker.apply_conf(conf, self.log.last_index() + 1)
        self.logger.info(
            "raft.conf_changed", id=self.id, kind=cc.kind.name, node=cc.node_id,
            voters=sorted(conf.voters), learners=sorted(conf.learners),
        )
        if self.role is not Role.LEADER:
            return conf
        if self.id not in conf.voters:
            self.logger.info("raft.stepped_down", id=self.id, term=self.term, reason="removed")
            self.become_follower(self.term, NONE)
            return conf
        if self.lead_transferee != NONE and self.lead_transferee not in conf.voters:
            self.lead_transferee = NONE
        own = self.tracker.progress[self.id]
        own.match = max(own.match, self.log.last_index())
        # The quorum changed, so commit may advance; new members start catching up.
        self._maybe_commit()
        self._bcast_append()
        return conf

    def transfer_leader(self, transferee: int) -> None:
        """Hand leadership to `transferee` (forwarded to the leader by a follower)."""
        if self.role is Role.LEADER:
            self._transfer_leader(transferee)
        elif self.lead != NONE:
            self._send(MsgTransferLeader(src=self.id, dst=self.lead, term=self.term, transferee=transferee))
        else:
            raise NotLeader(NONE)

    def _transfer_leader(self, transferee: int) -> None:
        pr = self.tracker.progress.get(transferee)
        if pr is None or pr.is_learner or transferee not in self.tracker.voters:
            self.logger.warning("raft.transfer_refused", id=self.id, transferee=transferee, reason="not a voter")
            return
        if transferee == self.id or self.lead_transferee == transferee:
            return
        self.lead_transferee = transferee
        # The transfer must finish within one election timeout or it is abandoned.
        self.election_elapsed = 0
        self.logger.info("raft.transfer_started", id=self.id, transferee=transferee, match=pr.match)
        if pr.match == self.log.last_index():
            self._send(MsgTimeoutNow(src=self.id, dst=transferee, term=self.term))
        else:
            self._send_append(transferee)

    def read_index(self, context: bytes) -> None:
        """Ask for a linearizable read point; answered by a `ReadState` in a Ready."""
        if not context:
            raise ValueError("read_index needs a non-empty, unique context")
        if self.role is Role.LEADER:
            self._leader_read_index(self.id, context)
        elif self.lead != NONE:
            self._send(MsgReadIndex(src=self.id, dst=self.lead, term=self.term, context=context))
        else:
            raise NotLeader(NONE)

    def _leader_read_index(self, requester: int, context: bytes) -> None:
        if not self._committed_entry_in_current_term():
            self.pending_read_index.append((requester, context))
            return
        self._accept_read_index(requester, context)

    def _accept_read_index(self, requester: int, context: bytes) -> None:
        if not self.read_only.add_request(self.log.committed, requester, context, self.id):
            return
        if has_quorum(self.tracker.voters, {self.id}.__contains__):
            for status in self.read_only.advance(context):
                self._answer_read(status)
            return
        self._bcast_heartbeat(context)

    def _answer_read(self, status: ReadIndexStatus) -> None:
        if status.requester in (NONE, self.id):
            self.read_states.append(ReadState(index=status.index, context=status.context))
        else:
            self._send(
                MsgReadIndexResp(
                    src=self.id, dst=status.requester, term=self.term, index=status.index, context=status.context
                )
            )

    def report_unreachable(self, id: int) -> None:
        """The transport could not reach `id`: stop streaming to it, probe instead."""
        if self.role is not Role.LEADER:
            return
        pr = self.tracker.progress.get(id)
        if pr is not None and pr.state is ProgressState.REPLICATE:
            pr.become_probe()

    def report_snapshot(self, id: int, ok: bool) -> None:
        """The transport finished (or failed) sending a snapshot to `id`."""
        if self.role is not Role.LEADER:
            return
        pr = self.tracker.progress.get(id)
        if pr is None or pr.state is not ProgressState.SNAPSHOT:
            return
        if not ok:
            pr.pending_snapshot = 0
        pr.become_probe()
        # Wait for the follower's answer to the snapshot (or the next heartbeat)
        # before probing, rather than sending an append it would reject.
        pr.probe_sent = True
        self.logger.info("raft.snapshot_reported", id=self.id, to=id, ok=ok)
