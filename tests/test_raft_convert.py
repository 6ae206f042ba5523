"""Every Raft core message survives the trip to the wire and back, and bad wire input is
refused with `WireError`."""

from __future__ import annotations

import hashlib

import pytest

from shoal.leader.raft import (
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
from shoal.leader.raft import messages
from shoal.leader.raft_convert import (
    SnapshotAssembler,
    WireError,
    batch_from_proto,
    batch_to_proto,
    message_to_proto,
    snapshot_chunks,
)
from shoal.v1 import raft_pb2

BIG = 2**63 + 5  # ids, terms and indexes are uint64 on the wire
ENTRIES = (
    Entry(term=3, index=10, data=b"txn"),
    Entry(term=3, index=11),
    Entry(term=BIG, index=BIG, kind=EntryKind.CONF_CHANGE, data=b"\x01\x00" + bytes(8)),
)
H = {"src": 2, "dst": 7, "term": 9}

SAMPLES: list[Message] = [
    MsgProp(**H, entries=ENTRIES),
    MsgApp(**H, log_term=8, index=BIG, entries=ENTRIES, commit=12),
    MsgApp(**H, log_term=0, index=0),
    MsgAppResp(**H, index=14),
    MsgAppResp(**H, index=14, reject=True, reject_hint=11, log_term=6),
    MsgVote(**H, last_index=40, last_term=8),
    MsgVote(**H, last_index=40, last_term=8, transfer=True),
    MsgVoteResp(**H),
    MsgVoteResp(**H, reject=True),
    MsgPreVote(**H, last_index=3, last_term=1),
    MsgPreVoteResp(**H, reject=True),
    MsgHeartbeat(**H, commit=77, context=b"ctx\x00\xff"),
    MsgHeartbeatResp(**H, context=b"ctx"),
    MsgReadIndex(**H, context=b"r1"),
    MsgReadIndexResp(**H, index=90, context=b"r1"),
    MsgTimeoutNow(**H),
    MsgTransferLeader(**H, transferee=3),
]

SNAP = MsgSnap(
    **H,
    snapshot=Snapshot(
        meta=SnapshotMeta(index=500, term=7, conf_state=ConfState(voters=frozenset({1, 2, 7}), learners=frozenset({9}))),
        data=bytes(range(256)) * 40,
    ),
)


def _all_message_types() -> set[type[Message]]:
    # By name in the messages module: `dataclass(slots=True)` replaces each class, and
    # the replaced originals may still show up in __subclasses__().
    return {
        obj
        for obj in vars(messages).values()
        if isinstance(obj, type) and issubclass(obj, Message) and obj is not Message
    }


def test_every_message_type_has_a_sample() -> None:
    covered = {type(m) for m in SAMPLES} | {MsgSnap}
    assert covered == _all_message_types(), "a new Raft message type needs a wire form and a sample here"


@pytest.mark.parametrize("m", SAMPLES, ids=lambda m: type(m).__name__)
def test_message_round_trips_through_a_serialized_batch(m: Message) -> None:
    wire = batch_to_proto("c1", m.src, m.dst, [m, m]).SerializeToString()
    batch = raft_pb2.RaftBatch.FromString(wire)
    assert (batch.cluster_id, batch.from_id, batch.to_id) == ("c1", 2, 7)
    assert batch_from_proto(batch) == [m, m]


@pytest.mark.parametrize("chunk_size", [1, 1000, 1 << 20])
def test_snapshot_round_trips_through_chunks(chunk_size: int) -> None:
    chunks = [
        raft_pb2.RaftSnapshotChunk.FromString(c.SerializeToString())
        for c in snapshot_chunks("c1", SNAP, chunk_size)
    ]
    assert len(chunks) == max(1, -(-len(SNAP.snapshot.data) // chunk_size))
    assert all(c.cluster_id == "c1" and (c.from_id, c.to_id) == (2, 7) for c in chunks)
    asm = SnapshotAssembler()
    for c in chunks:
        asm.add(c)
    assert asm.finish() == SNAP


def test_an_empty_snapshot_is_one_chunk() -> None:
    m = MsgSnap(**H, snapshot=Snapshot(meta=SnapshotMeta(index=1, term=1)))
    chunks = list(snapshot_chunks("c1", m))
    assert len(chunks) == 1
    asm = SnapshotAssembler()
    asm.add(chunks[0])
    assert asm.finish() == m


def test_msgsnap_is_not_a_batch_message() -> None:
    with pytest.raises(TypeError, match="SendSnapshot"):
        message_to_proto(SNAP)


def test_a_message_without_body_is_a_wire_error() -> None:
    batch = raft_pb2.RaftBatch(cluster_id="c1", from_id=1, to_id=2, messages=[raft_pb2.RaftMessage(term=3)])
    with pytest.raises(WireError, match="no body"):
        batch_from_proto(batch)


def test_an_unknown_entry_kind_is_a_wire_error() -> None:
    m = raft_pb2.RaftMessage(term=1, append=raft_pb2.RaftAppend(entries=[raft_pb2.RaftEntry(index=4, kind=7)]))  # type: ignore[arg-type]
    with pytest.raises(WireError, match="unknown kind 7"):
        batch_from_proto(raft_pb2.RaftBatch(from_id=1, to_id=2, messages=[m]))


def _chunks(size: int = 100) -> list[raft_pb2.RaftSnapshotChunk]:
    return list(snapshot_chunks("c1", SNAP, size))


@pytest.mark.parametrize(
    ("mangle", "error"),
    [
        (lambda cs: cs[1:], "does not start with its header"),
        (lambda cs: cs[:-1], "ended after"),
        (lambda cs: cs + [cs[-1]], "more than the"),
        (lambda cs: [cs[0]] + [cs[0]], "second header"),
        (lambda cs: [cs[0], raft_pb2.RaftSnapshotChunk(from_id=3, to_id=7, data=cs[1].data), *cs[2:]], "changed its sender"),
        (lambda cs: [*cs[:-1], raft_pb2.RaftSnapshotChunk(from_id=2, to_id=7, data=bytes(len(cs[-1].data)))], "sha256"),
        (lambda cs: [], "empty snapshot stream"),
    ],
    ids=["no_header", "short", "long", "two_headers", "sender_changed", "checksum", "empty"],
)
def test_a_broken_snapshot_stream_is_a_wire_error(mangle: object, error: str) -> None:
    asm = SnapshotAssembler()
    with pytest.raises(WireError, match=error):
        for c in mangle(_chunks()):  # type: ignore[operator]
            asm.add(c)
        asm.finish()


def test_snapshot_header_carries_the_data_checksum() -> None:
    (first, *_) = _chunks()
    assert first.header.sha256 == hashlib.sha256(SNAP.snapshot.data).digest()
    assert first.header.size == len(SNAP.snapshot.data)
