"""Three `RaftStore`s in one process over real gRPC on 127.0.0.1: election, replication,
redirects, failover, restart from disk (from the log and from a snapshot), exactly-once
retries. Every wait is a condition with a deadline (`eventually`, `store.wait_for`).
"""

from __future__ import annotations

import asyncio
import pathlib
import time
from dataclasses import replace
from collections.abc import AsyncIterator, Iterable

import grpc
import pytest

from helpers import eventually
from shoal.errors import Unavailable
from shoal.leader.raft import Message, MsgProp, Node, NotLeader
from shoal.leader.raft_transport import SERVER_OPTIONS, TransportConfig
from shoal.leader.replicated import RaftStore, RaftStoreConfig
from shoal.leader.state import Put, Txn

pytestmark = pytest.mark.timeout(60)

IDS = (1, 2, 3)
CONFIG = RaftStoreConfig(transport=TransportConfig(backoff_initial=0.02, backoff_max=0.25))


def put(name: str, v: int = 0) -> Txn:
    return Txn(ops=(Put(kind="nodes", name=name, value={"v": v}),))


class Cluster:
    """Three servers on loopback; a node can be killed, stopped gracefully, restarted."""

    def __init__(self, root: pathlib.Path, config: RaftStoreConfig = CONFIG) -> None:
        self.root = root
        self.config = config
        self.peers: dict[int, str] = {}
        self.stores: dict[int, RaftStore] = {}
        self.servers: dict[int, grpc.aio.Server] = {}

    async def start(self) -> None:
        for i in IDS:
            server = grpc.aio.server(options=SERVER_OPTIONS)
            port = server.add_insecure_port("127.0.0.1:0")
            self.peers[i] = f"127.0.0.1:{port}"
            self.servers[i] = server
        for i in IDS:
            await self.start_node(i)

    async def start_node(self, i: int) -> RaftStore:
        server = self.servers.get(i)
        if server is None:  # a restart: same address, same data directory
            server = grpc.aio.server(options=SERVER_OPTIONS)
            server.add_insecure_port(self.peers[i])
            self.servers[i] = server
        store = RaftStore(
            node_id=i, cluster_id="test", peers=self.peers, data_dir=self.root / f"s{i}",
            config=self.config, server=server,
        )
        await server.start()
        await store.start()
        self.stores[i] = store
        return store

    async def stop_node(self, i: int, *, crash: bool) -> None:
        store = self.stores.pop(i)
        await store.close(transfer_leadership=not crash)
        await self.servers.pop(i).stop(None)

    async def close(self) -> None:
        for i in list(self.stores):
            await self.stop_node(i, crash=True)

    def leaders(self) -> list[RaftStore]:
        return [s for s in self.stores.values() if s.is_leader]

    async def leader(self, timeout: float = 5.0) -> RaftStore:
        async def one_agreed() -> RaftStore | None:
            leads = self.leaders()
            if len(leads) != 1:
                return None
            lead = leads[0]
            # Every live server knows it (so redirects work).
            if all(s.leader_id == lead.node_id for s in self.stores.values()):
                return lead
            return None

        return await eventually(one_agreed, timeout, 0.01, what="one leader known to every server")  # type: ignore[no-any-return]

    async def converged(self, revision: int, timeout: float = 5.0) -> None:
        await eventually(
            lambda: all(s.state.revision >= revision for s in self.stores.values()),
            timeout, 0.01, what=f"every server at revision {revision}",
        )


@pytest.fixture
async def cluster(tmp_path: pathlib.Path) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path)
    await c.start()
    yield c
    await c.close()


async def test_elect_commit_and_replicate(cluster: Cluster) -> None:
    lead = await cluster.leader()
    revs = await asyncio.gather(*(lead.commit(put(f"n{i}", i)) for i in range(20)))
    assert sorted(revs) == list(range(1, 21))
    await cluster.converged(20)
    snapshots = {s.state.to_snapshot() for s in cluster.stores.values()}
    assert len(snapshots) == 1, "every server holds the same state"
    follower = next(s for s in cluster.stores.values() if s is not lead)
    assert await follower.read_barrier() >= 20
    assert follower.state.get("nodes", "n7") == {"v": 7}


async def test_a_follower_refuses_writes_and_names_the_leader(cluster: Cluster) -> None:
    lead = await cluster.leader()
    follower = next(s for s in cluster.stores.values() if s is not lead)
    with pytest.raises(NotLeader) as err:
        await follower.commit(put("x"))
    assert err.value.leader_hint == lead.node_id
    assert follower.leader_address() == cluster.peers[lead.node_id]
    api = {i: f"api-{i}:7420" for i in IDS}
    assert follower.leader_address(api) == f"api-{lead.node_id}:7420"


async def test_a_retried_write_applies_once(cluster: Cluster) -> None:
    lead = await cluster.leader()
    first, concurrent = await asyncio.gather(
        lead.commit(put("a", 1), client_id="api-client", seq=1),
        lead.commit(put("a", 1), client_id="api-client", seq=1),  # a retry while in flight
    )
    again = await lead.commit(put("a", 1), client_id="api-client", seq=1)  # after it applied
    assert first == concurrent == again == 1
    assert await lead.commit(put("b"), client_id="api-client", seq=2) == 2
    await cluster.converged(2)
    assert {s.state.revision for s in cluster.stores.values()} == {2}


async def test_leader_crash_elects_a_new_leader_and_keeps_acknowledged_writes(cluster: Cluster) -> None:
    old = await cluster.leader()
    acked = [await old.commit(put(f"w{i}", i)) for i in range(10)]
    # A write the client will retry through the new leader after the crash.
    await old.commit(put("retried"), client_id="api-client", seq=7)
    killed_at = time.monotonic()
    await cluster.stop_node(old.node_id, crash=True)
    new = await cluster.leader(timeout=3.0)
    elected_after = time.monotonic() - killed_at
    assert new.node_id != old.node_id
    # The new leader's first write is acknowledged within the deadline too.
    rev = await new.commit(put("after"))
    acknowledged_after = time.monotonic() - killed_at
    print(f"failover: new leader after {elected_after:.3f} s, first write acked after {acknowledged_after:.3f} s")
    assert acknowledged_after < 3.0
    await new.read_barrier()
    for i in range(10):
        assert new.state.get("nodes", f"w{i}") == {"v": i}, "an acknowledged write was lost"
    assert rev == max(acked) + 2
    # The retry through the new leader is recognised: same revision, not applied again.
    assert await new.commit(put("retried"), client_id="api-client", seq=7) == max(acked) + 1
    assert new.state.revision == rev


async def test_graceful_close_hands_leadership_over(cluster: Cluster) -> None:
    old = await cluster.leader()
    await old.commit(put("x"))
    t0 = time.monotonic()
    await cluster.stop_node(old.node_id, crash=False)
    new = await cluster.leader(timeout=2.0)
    handover = time.monotonic() - t0
    print(f"leadership transfer on close: {handover:.3f} s")
    assert new.node_id != old.node_id
    # Faster than any election timeout could have fired (0.4 s minimum).
    assert handover < 0.4 + 0.3
    assert await new.commit(put("y")) == 2


async def test_a_restarted_follower_catches_up_from_its_log(cluster: Cluster) -> None:
    lead = await cluster.leader()
    await lead.commit(put("before"))
    follower = next(i for i in IDS if i != lead.node_id)
    await cluster.converged(1)
    await cluster.stop_node(follower, crash=True)
    for i in range(15):
        await lead.commit(put(f"while-down-{i}"))
    back = await cluster.start_node(follower)
    assert back.state.revision >= 0  # restored from disk, then catching up
    await back.wait_for(lambda: back.state.revision == 16, timeout=5.0)
    assert back.state.get("nodes", "while-down-14") == {"v": 0}
    assert back.snapshot_index == 0, "caught up from the log, no snapshot needed"


async def test_a_follower_behind_the_compacted_log_gets_a_snapshot(tmp_path: pathlib.Path) -> None:
    cfg = RaftStoreConfig(snapshot_every=20, snapshot_keep=5, transport=CONFIG.transport)
    c = Cluster(tmp_path, cfg)
    await c.start()
    try:
        lead = await c.leader()
        await lead.commit(put("first"))
        follower = next(i for i in IDS if i != lead.node_id)
        await c.converged(1)
        await c.stop_node(follower, crash=True)
        assert await lead.commit(put("api"), client_id="api-client", seq=1) == 2
        for i in range(60):
            await lead.commit(put(f"n{i}", i))
        assert lead.snapshot_index >= 40
        back = await c.start_node(follower)
        await back.wait_for(lambda: back.state.revision == 62, timeout=5.0)
        assert back.snapshot_index >= 40, "the follower was brought up to date by a snapshot"
        assert back.state.to_snapshot() == lead.state.to_snapshot()
        # Sessions travel in the snapshot: the follower recognises a retry of a write it
        # only knows from the snapshot, and answers it without a redirect.
        assert await back.commit(put("api"), client_id="api-client", seq=1) == 2
        # And the whole cluster restarts from disk (snapshot + log) with nothing lost.
        for i in list(c.stores):
            await c.stop_node(i, crash=True)
        for i in IDS:
            await c.start_node(i)
        lead = await c.leader()
        await lead.read_barrier()
        assert lead.state.revision == 62
        assert lead.state.get("nodes", "n59") == {"v": 59}
    finally:
        await c.close()


async def test_without_a_quorum_writes_time_out_as_unavailable(cluster: Cluster) -> None:
    lead = await cluster.leader()
    for i in IDS:
        if i != lead.node_id:
            await cluster.stop_node(i, crash=True)
    with pytest.raises((Unavailable, NotLeader)):
        # Check-quorum deposes the isolated leader within an election timeout; a write
        # proposed before that can never commit and times out.
        await lead.commit(put("lonely"), timeout=1.0)
    with pytest.raises((Unavailable, NotLeader)):
        await lead.read_barrier(timeout=1.0)


async def test_a_stale_guarded_write_is_refused_as_a_conflict_everywhere(cluster: Cluster) -> None:
    from shoal.errors import Conflict

    lead = await cluster.leader()
    await lead.commit(put("n", 1))
    stale = Txn(ops=(Put(kind="nodes", name="n", value={"v": 2}),), expect=(("nodes", "n", 0),))
    with pytest.raises(Conflict):
        await lead.commit(stale)
    rev = await lead.commit(put("after", 3))
    await cluster.converged(rev)
    assert all(s.state.get("nodes", "n") == {"v": 1} for s in cluster.stores.values())


# --- forwarding: writes sent to a follower ------------------------------------------------


async def test_a_follower_forwards_writes_and_answers_once_they_apply_there(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    lead = await cluster.leader()
    follower = next(s for s in cluster.stores.values() if s is not lead)
    batches: list[int] = []
    forward = Node.forward

    def counting(node: Node, datas: list[bytes]) -> int:
        batches.append(len(datas))
        return forward(node, datas)

    monkeypatch.setattr(Node, "forward", counting)
    revs = await asyncio.gather(*(follower.commit(put(f"f{i}", i), forward=True) for i in range(50)))
    assert sorted(revs) == list(range(1, 51)), "each forwarded write applied exactly once"
    # Batched: the 50 writes left in a few MsgProps, not one each.
    assert sum(batches) == 50 and len(batches) <= 5, batches
    # The answer comes after the follower applied the write: it reads its own writes.
    assert all(follower.state.get("nodes", f"f{i}") == {"v": i} for i in range(50))
    await cluster.converged(50)
    assert lead.state.revision == 50
    assert not follower._forwarded and not follower._forward_queue


async def test_a_write_retried_through_every_server_applies_once(cluster: Cluster) -> None:
    lead = await cluster.leader()
    a, b = (s for s in cluster.stores.values() if s is not lead)
    revs = await asyncio.gather(
        a.commit(put("x", 1), client_id="api-client", seq=1, forward=True),
        b.commit(put("x", 1), client_id="api-client", seq=1, forward=True),
        lead.commit(put("x", 1), client_id="api-client", seq=1),
        a.commit(put("x", 1), client_id="api-client", seq=1, forward=True),
    )
    assert set(revs) == {1}
    await cluster.converged(1)
    assert {s.state.revision for s in cluster.stores.values()} == {1}


async def test_forwarded_writes_sent_again_and_again_apply_once(tmp_path: pathlib.Path) -> None:
    # Every tick re-sends every forwarded write not yet applied: the leader appends many
    # copies, and the sessions must apply each write once.
    c = Cluster(tmp_path, config=replace(CONFIG, forward_retry=1e-3))
    await c.start()
    try:
        lead = await c.leader()
        follower = next(s for s in c.stores.values() if s is not lead)
        revs = await asyncio.gather(*(follower.commit(put(f"d{i}", i), forward=True) for i in range(40)))
        assert sorted(revs) == list(range(1, 41))
        await c.converged(40)
        rev = await lead.commit(put("last"))
        assert rev == 41, "a duplicate was applied as a new write"
        assert lead.status().commit > 41 + 3, "the test did not produce duplicate entries"
    finally:
        await c.close()


async def test_forwarded_writes_survive_a_leader_crash_and_apply_once(cluster: Cluster) -> None:
    lead = await cluster.leader()
    follower = next(s for s in cluster.stores.values() if s is not lead)
    writes = [asyncio.ensure_future(follower.commit(put(f"w{i}", i), forward=True)) for i in range(40)]
    # Crash the leader as soon as the writes have left the follower: some are in its
    # log only, some nowhere; the follower must send them again to the next leader.
    await eventually(lambda: len(follower._forwarded) == 40 and not follower._forward_queue, 5.0, 0.001,
                     what="40 writes forwarded")
    await cluster.stop_node(lead.node_id, crash=True)
    revs = await asyncio.gather(*writes)
    assert sorted(revs) == list(range(1, 41)), "every forwarded write applied exactly once"
    new = await cluster.leader()
    await cluster.converged(40)
    assert new.state.revision == 40
    assert all(new.state.get("nodes", f"w{i}") == {"v": i} for i in range(40))


async def test_a_follower_without_forwarding_still_refuses(cluster: Cluster) -> None:
    lead = await cluster.leader()
    follower = next(s for s in cluster.stores.values() if s is not lead)
    with pytest.raises(NotLeader):
        await follower.commit(put("x"))
    assert not follower._forwarded and not follower._pending


async def test_forwarded_writes_lost_by_the_transport_are_sent_again(cluster: Cluster) -> None:
    lead = await cluster.leader()
    follower = next(s for s in cluster.stores.values() if s is not lead)
    # The transport drops every message to the leader for a moment and says so.
    transport = follower._transport
    send = transport.send
    dropping = True

    lost_props: list[MsgProp] = []

    def lossy(messages: Iterable[Message]) -> None:
        if dropping:
            lost_props.extend(m for m in messages if isinstance(m, MsgProp))
            follower.report_unreachable(lead.node_id)
            return
        send(messages)

    transport.send = lossy  # type: ignore[method-assign]
    writes = [asyncio.ensure_future(follower.commit(put(f"l{i}", i), forward=True)) for i in range(10)]
    await eventually(lambda: sum(len(m.entries) for m in lost_props) >= 10, 5.0, 0.001,
                     what="the writes forwarded (into the void)")
    dropping = False
    # Re-sent at the next tick after the report, well before `forward_retry` (4 s).
    t0 = time.monotonic()
    revs = await asyncio.wait_for(asyncio.gather(*writes), 3.0)
    assert sorted(revs) == list(range(1, 11))
    print(f"lost forwards re-sent and applied in {time.monotonic() - t0:.3f} s")
