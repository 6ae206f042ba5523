"""The one adapter between the Raft core's message values and the `shoal.v1.Raft` wire.

Rules:
- Every core message type has exactly one wire form: a field of `RaftMessage.body`,
  except `MsgSnap`, which travels as a `SendSnapshot` stream of `RaftSnapshotChunk`s
  (header first, then the data in slices) so a large snapshot never blocks the append
  stream. `_TO_WIRE`/`_FROM_WIRE` are the tables; tests/test_raft_convert.py checks that
  every subclass of `Message` round-trips through one of the two paths.
- Sender and receiver live once per batch (`RaftBatch.from_id/to_id`), not per message.
- Decoding never trusts the wire: a batch without a body, an unknown entry kind, a
  snapshot stream whose size or sha256 does not match its header raise `WireError`
  (the transport answers INVALID_ARGUMENT). Ids and terms are unsigned on the wire.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from shoal.errors import ShoalError
from shoal.leader.raft.messages import (
    ConfState,
    Entry,
    EntryKind,
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
    SnapshotMeta,
)
from shoal.v1 import raft_pb2 as pb

__all__ = [
    "WireError",
    "SNAPSHOT_CHUNK_SIZE",
    "entry_to_proto",
    "entry_from_proto",
    "message_to_proto",
    "message_from_proto",
    "batch_to_proto",
    "batch_from_proto",
    "snapshot_chunks",
    "SnapshotAssembler",
]

SNAPSHOT_CHUNK_SIZE = 1 << 20
"""Data bytes per snapshot chunk: well under gRPC's 4 MiB default message limit, and
small enough that a chunk in flight does not hold the receiver's event loop for long."""


class WireError(ShoalError):
    """A Raft message or snapshot stream from a peer is malformed."""


_KIND_TO_WIRE = {EntryKind.NORMAL: pb.RAFT_ENTRY_NORMAL, EntryKind.CONF_CHANGE: pb.RAFT_ENTRY_CONF_CHANGE}
_KIND_FROM_WIRE = {v: k for k, v in _KIND_TO_WIRE.items()}


def entry_to_proto(e: Entry) -> pb.RaftEntry:
    return pb.RaftEntry(term=e.term, index=e.index, kind=_KIND_TO_WIRE[e.kind], data=e.data)


def entry_from_proto(e: pb.RaftEntry) -> Entry:
    kind = _KIND_FROM_WIRE.get(e.kind)
    if kind is None:
        raise WireError(f"entry {e.index} has unknown kind {e.kind}")
    return Entry(term=e.term, index=e.index, kind=kind, data=e.data)


def _entries_to(repeated: Any, entries: Sequence[Entry]) -> None:
    # In place: `add` builds each entry inside its parent, where constructing RaftEntry
    # values and handing them over would copy every one of them once more.
    add = repeated.add
    kinds = _KIND_TO_WIRE
    for e in entries:
        add(term=e.term, index=e.index, kind=kinds[e.kind], data=e.data)


def _entries_from(entries: Any) -> tuple[Entry, ...]:
    return tuple([entry_from_proto(e) for e in entries])


def _fill_append(b: Any, m: MsgApp) -> None:
    b.log_term = m.log_term
    b.index = m.index
    b.commit = m.commit
    _entries_to(b.entries, m.entries)


def _fill_append_response(b: Any, m: MsgAppResp) -> None:
    b.index = m.index
    b.reject = m.reject
    b.reject_hint = m.reject_hint
    b.log_term = m.log_term


def _fill_vote(b: Any, m: MsgVote) -> None:
    b.last_index = m.last_index
    b.last_term = m.last_term
    b.transfer = m.transfer


def _fill_pre_vote(b: Any, m: MsgPreVote) -> None:
    b.last_index = m.last_index
    b.last_term = m.last_term


def _fill_read_index_response(b: Any, m: MsgReadIndexResp) -> None:
    b.index = m.index
    b.context = m.context


def _fill_nothing(b: Any, m: Message) -> None:
    pass


# type -> (oneof field, fill the wire body in place from the core value)
_TO_WIRE: dict[type[Message], tuple[str, Callable[[Any, Any], None]]] = {
    MsgProp: ("propose", lambda b, m: _entries_to(b.entries, m.entries)),
    MsgApp: ("append", _fill_append),
    MsgAppResp: ("append_response", _fill_append_response),
    MsgVote: ("vote", _fill_vote),
    MsgVoteResp: ("vote_response", lambda b, m: setattr(b, "reject", m.reject)),
    MsgPreVote: ("pre_vote", _fill_pre_vote),
    MsgPreVoteResp: ("pre_vote_response", lambda b, m: setattr(b, "reject", m.reject)),
    MsgHeartbeat: ("heartbeat", lambda b, m: (setattr(b, "commit", m.commit), setattr(b, "context", m.context))),
    MsgHeartbeatResp: ("heartbeat_response", lambda b, m: setattr(b, "context", m.context)),
    MsgReadIndex: ("read_index", lambda b, m: setattr(b, "context", m.context)),
    MsgReadIndexResp: ("read_index_response", _fill_read_index_response),
    MsgTimeoutNow: ("timeout_now", _fill_nothing),
    MsgTransferLeader: ("transfer_leader", lambda b, m: setattr(b, "transferee", m.transferee)),
}

# oneof field -> (wire body, src, dst, term) -> core value
_FROM_WIRE: dict[str, Callable[[Any, int, int, int], Message]] = {
    "propose": lambda b, s, d, t: MsgProp(src=s, dst=d, term=t, entries=_entries_from(b.entries)),
    "append": lambda b, s, d, t: MsgApp(
        src=s, dst=d, term=t, log_term=b.log_term, index=b.index, entries=_entries_from(b.entries), commit=b.commit
    ),
    "append_response": lambda b, s, d, t: MsgAppResp(
        src=s, dst=d, term=t, index=b.index, reject=b.reject, reject_hint=b.reject_hint, log_term=b.log_term
    ),
    "vote": lambda b, s, d, t: MsgVote(
        src=s, dst=d, term=t, last_index=b.last_index, last_term=b.last_term, transfer=b.transfer
    ),
    "vote_response": lambda b, s, d, t: MsgVoteResp(src=s, dst=d, term=t, reject=b.reject),
    "pre_vote": lambda b, s, d, t: MsgPreVote(src=s, dst=d, term=t, last_index=b.last_index, last_term=b.last_term),
    "pre_vote_response": lambda b, s, d, t: MsgPreVoteResp(src=s, dst=d, term=t, reject=b.reject),
    "heartbeat": lambda b, s, d, t: MsgHeartbeat(src=s, dst=d, term=t, commit=b.commit, context=b.context),
    "heartbeat_response": lambda b, s, d, t: MsgHeartbeatResp(src=s, dst=d, term=t, context=b.context),
    "read_index": lambda b, s, d, t: MsgReadIndex(src=s, dst=d, term=t, context=b.context),
    "read_index_response": lambda b, s, d, t: MsgReadIndexResp(
        src=s, dst=d, term=t, index=b.index, context=b.context
    ),
    "timeout_now": lambda b, s, d, t: MsgTimeoutNow(src=s, dst=d, term=t),
    "transfer_leader": lambda b, s, d, t: MsgTransferLeader(src=s, dst=d, term=t, transferee=b.transferee),
}


def _fill_message(msg: pb.RaftMessage, m: Message) -> None:
    conv = _TO_WIRE.get(type(m))
    if conv is None:
        if isinstance(m, MsgSnap):
            raise TypeError("MsgSnap travels as a SendSnapshot stream: use snapshot_chunks()")
        raise TypeError(f"no wire form for {type(m).__name__}")
    field, fill = conv
    body = getattr(msg, field)
    body.SetInParent()  # selects the oneof even when the body has only default values
    fill(body, m)


def message_to_proto(m: Message) -> pb.RaftMessage:
    """The wire form of `m` (without sender and receiver, which the batch carries)."""
    msg = pb.RaftMessage(term=m.term)
    _fill_message(msg, m)
    return msg


def message_from_proto(msg: pb.RaftMessage, *, src: int, dst: int) -> Message:
    field = msg.WhichOneof("body")
    if field is None:
        raise WireError(f"a Raft message from {src} has no body")
    return _FROM_WIRE[field](getattr(msg, field), src, dst, msg.term)


def batch_to_proto(cluster_id: str, src: int, dst: int, messages: Sequence[Message]) -> pb.RaftBatch:
    """One `RaftBatch` from messages that all go from `src` to `dst` (built in place)."""
    batch = pb.RaftBatch(cluster_id=cluster_id, from_id=src, to_id=dst)
    add = batch.messages.add
    for m in messages:
        _fill_message(add(term=m.term), m)
    return batch


def batch_from_proto(batch: pb.RaftBatch) -> list[Message]:
    """The messages of a batch (the caller has checked cluster id and both ends)."""
    return [message_from_proto(m, src=batch.from_id, dst=batch.to_id) for m in batch.messages]


# --- snapshots ------------------------------------------------------------------------


def snapshot_chunks(
    cluster_id: str, m: MsgSnap, chunk_size: int = SNAPSHOT_CHUNK_SIZE
) -> Iterator[pb.RaftSnapshotChunk]:
    """The `SendSnapshot` stream for `m`: a header chunk, then the data in slices."""
    snap = m.snapshot
    data = snap.data
    header = pb.RaftSnapshotHeader(
        term=m.term,
        index=snap.index,
        snapshot_term=snap.term,
        voters=sorted(snap.meta.conf_state.voters),
        learners=sorted(snap.meta.conf_state.learners),
        size=len(data),
        sha256=hashlib.sha256(data).digest(),
    )
    first = min(chunk_size, len(data))
    yield pb.RaftSnapshotChunk(cluster_id=cluster_id, from_id=m.src, to_id=m.dst, header=header, data=data[:first])
    for off in range(first, len(data), chunk_size):
        yield pb.RaftSnapshotChunk(cluster_id=cluster_id, from_id=m.src, to_id=m.dst, data=data[off : off + chunk_size])


class SnapshotAssembler:
    """Collects one `SendSnapshot` stream and returns the `MsgSnap` it carries."""

    __slots__ = ("_header", "_src", "_dst", "_parts", "_size")

    def __init__(self) -> None:
        self._header: pb.RaftSnapshotHeader | None = None
        self._src = 0
        self._dst = 0
        self._parts: list[bytes] = []
        self._size = 0

    def add(self, chunk: pb.RaftSnapshotChunk) -> None:
        if self._header is None:
            if not chunk.HasField("header"):
                raise WireError(f"a snapshot stream from {chunk.from_id} does not start with its header")
            self._header = chunk.header
            self._src, self._dst = chunk.from_id, chunk.to_id
        elif chunk.HasField("header"):
            raise WireError(f"a snapshot stream from {chunk.from_id} has a second header")
        elif (chunk.from_id, chunk.to_id) != (self._src, self._dst):
            raise WireError("a snapshot stream changed its sender or receiver midway")
        self._size += len(chunk.data)
        if self._size > self._header.size:
            raise WireError(f"a snapshot stream from {self._src} carries more than the {self._header.size} bytes announced")
        self._parts.append(chunk.data)

    def finish(self) -> MsgSnap:
        h = self._header
        if h is None:
            raise WireError("an empty snapshot stream")
        data = b"".join(self._parts)
        if len(data) != h.size:
            raise WireError(f"a snapshot stream from {self._src} ended after {len(data)} of {h.size} bytes")
        if hashlib.sha256(data).digest() != h.sha256:
            raise WireError(f"a snapshot from {self._src} fails its sha256 checksum")
        conf = ConfState(voters=frozenset(h.voters), learners=frozenset(h.learners))
        snap = Snapshot(meta=SnapshotMeta(index=h.index, term=h.snapshot_term, conf_state=conf), data=data)
        return MsgSnap(src=self._src, dst=self._dst, term=h.term, snapshot=snap)
