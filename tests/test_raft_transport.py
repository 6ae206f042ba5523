"""`RaftTransport` over real gRPC on loopback: delivery, snapshots, rejection of strangers,
unreachable peers and full queues."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
import pytest

from helpers import eventually, free_port
from shoal.leader.raft import ConfState, Entry, Message, MsgApp, MsgHeartbeat, MsgProp, MsgSnap, Snapshot, SnapshotMeta
from shoal.leader.raft_convert import batch_to_proto
from shoal.leader.raft_transport import SERVER_OPTIONS, RaftTransport, TransportConfig
from shoal.v1 import raft_pb2, raft_pb2_grpc


@dataclass
class Recorder:
    delivered: list[Message] = field(default_factory=list)
    unreachable: list[int] = field(default_factory=list)
    snapshots: list[tuple[int, bool]] = field(default_factory=list)

    def deliver(self, messages: Sequence[Message]) -> None:
        self.delivered.extend(messages)

    def report_unreachable(self, id: int) -> None:
        self.unreachable.append(id)

    def report_snapshot(self, id: int, ok: bool) -> None:
        self.snapshots.append((id, ok))


@dataclass
class Pair:
    t1: RaftTransport
    t2: RaftTransport
    r1: Recorder
    r2: Recorder
    addr1: str
    addr2: str


FAST = TransportConfig(backoff_initial=0.02, backoff_max=0.1)


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    servers = [grpc.aio.server(options=SERVER_OPTIONS) for _ in range(2)]
    addrs = [f"127.0.0.1:{s.add_insecure_port('127.0.0.1:0')}" for s in servers]
    peers = {1: addrs[0], 2: addrs[1], 3: "127.0.0.1:1"}  # 3: nobody listens there
    recs = [Recorder(), Recorder()]
    ts = [
        RaftTransport(cluster_id="c1", node_id=i + 1, peers=peers, handler=recs[i], config=FAST)
        for i in range(2)
    ]
    for t, s in zip(ts, servers):
        t.add_to_server(s)
        await s.start()
        await t.start()
    yield Pair(ts[0], ts[1], recs[0], recs[1], addrs[0], addrs[1])
    for t, s in zip(ts, servers):
        await t.close()
        await s.stop(None)


async def test_messages_arrive_in_order(pair: Pair) -> None:
    msgs = [MsgHeartbeat(src=1, dst=2, term=4, commit=i) for i in range(50)]
    pair.t1.send(msgs[:25])
    pair.t1.send(msgs[25:])
    await eventually(lambda: len(pair.r2.delivered) == 50, 5, 0.01, what="50 messages at node 2")
    assert pair.r2.delivered == msgs
    assert pair.t1.connected(2)


async def test_a_followers_forwarded_proposals_reach_the_leader(pair: Pair) -> None:
    prop = MsgProp(src=1, dst=2, term=3, entries=tuple(Entry(term=0, index=0, data=b"w%d" % i) for i in range(100)))
    pair.t1.send([prop])
    await eventually(lambda: pair.r2.delivered, 5, 0.01, what="the proposal at node 2")
    assert pair.r2.delivered == [prop]


async def test_a_snapshot_is_streamed_and_reported(pair: Pair) -> None:
    snap = Snapshot(
        meta=SnapshotMeta(index=40, term=3, conf_state=ConfState(voters=frozenset({1, 2}))),
        data=b"s" * (3 << 20),  # several chunks
    )
    m = MsgSnap(src=1, dst=2, term=3, snapshot=snap)
    pair.t1.send([m])
    await eventually(lambda: pair.r1.snapshots, 10, 0.01, what="snapshot report")
    assert pair.r1.snapshots == [(2, True)]
    assert pair.r2.delivered == [m]


async def test_an_unreachable_peer_is_reported(pair: Pair) -> None:
    pair.t1.send([MsgHeartbeat(src=1, dst=3, term=1)])
    await eventually(lambda: 3 in pair.r1.unreachable, 5, 0.01, what="peer 3 reported unreachable")
    pair.t1.send([MsgSnap(src=1, dst=3, term=1, snapshot=Snapshot(meta=SnapshotMeta(index=1, term=1)))])
    await eventually(lambda: pair.r1.snapshots, 5, 0.01, what="failed snapshot report")
    assert pair.r1.snapshots == [(3, False)]


async def test_a_full_queue_drops_and_reports_at_once() -> None:
    rec = Recorder()
    t = RaftTransport(
        cluster_id="c1", node_id=1, peers={1: "x", 2: "127.0.0.1:1"}, handler=rec,
        config=TransportConfig(queue_size=2),
    )
    # Not started: nothing drains the queue.
    t.send([MsgHeartbeat(src=1, dst=2, term=1) for _ in range(5)])
    assert rec.unreachable == [2]


@pytest.mark.parametrize(
    ("cluster", "src", "dst", "code", "words"),
    [
        ("c2", 2, 1, grpc.StatusCode.FAILED_PRECONDITION, ["'c1'", "'c2'"]),
        ("c1", 9, 1, grpc.StatusCode.PERMISSION_DENIED, ["server 9 is not a member"]),
        ("c1", 1, 1, grpc.StatusCode.PERMISSION_DENIED, ["server 1 is not a member"]),
        ("c1", 2, 5, grpc.StatusCode.FAILED_PRECONDITION, ["this is server 1, not 5"]),
    ],
    ids=["other_cluster", "unknown_sender", "self_as_sender", "wrong_receiver"],
)
async def test_strangers_are_rejected_with_a_reason(
    pair: Pair, cluster: str, src: int, dst: int, code: grpc.StatusCode, words: list[str]
) -> None:
    # A forged high term from a stranger must never reach the node.
    forged = MsgApp(src=src, dst=dst, term=10**9, log_term=0, index=0)
    async with grpc.aio.insecure_channel(pair.addr1) as ch:
        call = raft_pb2_grpc.RaftStub(ch).Send(iter([batch_to_proto(cluster, src, dst, [forged])]))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
    assert err.value.code() == code
    for w in words:
        assert w in (err.value.details() or "")
    assert pair.r1.delivered == []


async def test_malformed_input_is_invalid_argument(pair: Pair) -> None:
    async with grpc.aio.insecure_channel(pair.addr1) as ch:
        stub = raft_pb2_grpc.RaftStub(ch)
        bad = raft_pb2.RaftBatch(cluster_id="c1", from_id=2, to_id=1, messages=[raft_pb2.RaftMessage(term=1)])
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Send(iter([bad]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        chunk = raft_pb2.RaftSnapshotChunk(cluster_id="c1", from_id=2, to_id=1, data=b"x")  # no header
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SendSnapshot(iter([chunk]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "header" in (err.value.details() or "")
    assert pair.r1.delivered == []


async def test_the_first_message_to_a_restarted_peer_is_not_lost() -> None:
    """An idle stream to a peer that restarted is found broken by the next write; that
    write's batch is sent again on a new stream, not dropped (it is typically the first
    vote request after a leader failure)."""
    addr2 = f"127.0.0.1:{free_port()}"
    peers = {1: "127.0.0.1:1", 2: addr2}
    r1, r2 = Recorder(), Recorder()
    # Slow back-off: a message that waited for it would miss the deadline below.
    t1 = RaftTransport(cluster_id="c1", node_id=1, peers=peers, handler=r1,
                       config=TransportConfig(backoff_initial=5.0, backoff_max=5.0))
    await t1.start()

    async def serve(rec: Recorder) -> tuple[grpc.aio.Server, RaftTransport]:
        s = grpc.aio.server(options=SERVER_OPTIONS)
        s.add_insecure_port(addr2)
        t = RaftTransport(cluster_id="c1", node_id=2, peers=peers, handler=rec, config=FAST)
        t.add_to_server(s)
        await s.start()
        await t.start()
        return s, t

    s2, t2 = await serve(r2)
    try:
        t1.send([MsgHeartbeat(src=1, dst=2, term=1)])
        await eventually(lambda: r2.delivered, 2.0, 0.01, what="delivery before the restart")
        await t2.close()
        await s2.stop(None)
        r2b = Recorder()
        s2, t2 = await serve(r2b)
        t1.send([MsgHeartbeat(src=1, dst=2, term=2)])
        await eventually(lambda: [m.term for m in r2b.delivered] == [2], 2.0, 0.01,
                         what="the first message after the restart delivered")
    finally:
        await t1.close()
        await t2.close()
        await s2.stop(None)
