"""Membership changes on real `RaftStore`s over gRPC on 127.0.0.1: a server that starts
empty joins as a learner, catches up, is promoted and then counts; a removed server stops
counting; the server table (id → address) is replicated and survives restarts.
"""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator

import grpc
import pytest

from helpers import eventually
from shoal.leader.raft import NotLeader
from shoal.leader.raft_transport import SERVER_OPTIONS, TransportConfig
from shoal.leader.replicated import RaftStore, RaftStoreConfig
from shoal.leader.state import Put, Txn

pytestmark = pytest.mark.timeout(60)

CONFIG = RaftStoreConfig(transport=TransportConfig(backoff_initial=0.02, backoff_max=0.25))


def put(name: str, v: int = 0) -> Txn:
    return Txn(ops=(Put(kind="nodes", name=name, value={"v": v}),))


class Servers:
    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self.addresses: dict[int, str] = {}
        self.stores: dict[int, RaftStore] = {}
        self.grpc: dict[int, grpc.aio.Server] = {}

    def reserve(self, i: int) -> str:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        port = server.add_insecure_port(self.addresses.get(i, "127.0.0.1:0"))
        self.addresses[i] = f"127.0.0.1:{port}"
        self.grpc[i] = server
        return self.addresses[i]

    async def start(self, i: int, peers: dict[int, str], *, bootstrap: bool) -> RaftStore:
        if i not in self.grpc:
            self.reserve(i)
        server = self.grpc[i]
        store = RaftStore(node_id=i, cluster_id="m", peers=peers, data_dir=self.root / f"s{i}",
                          config=CONFIG, server=server, bootstrap=bootstrap)
        await server.start()
        await store.start()
        self.stores[i] = store
        return store

    async def bootstrap_three(self) -> dict[int, str]:
        """Servers 1, 2 and 3 form a new cluster; returns their addresses."""
        for i in (1, 2, 3):
            self.reserve(i)
        initial = dict(self.addresses)
        for i in (1, 2, 3):
            await self.start(i, initial, bootstrap=True)
        return initial

    async def stop(self, i: int) -> None:
        await self.stores.pop(i).close(transfer_leadership=False)
        await self.grpc.pop(i).stop(None)

    async def leader(self) -> RaftStore:
        def one() -> RaftStore | None:
            leads = [s for s in self.stores.values() if s.is_leader]
            return leads[0] if len(leads) == 1 else None

        return await eventually(one, 5.0, 0.01, what="one leader")  # type: ignore[no-any-return]

    async def close(self) -> None:
        for i in list(self.stores):
            await self.stop(i)


@pytest.fixture
async def servers(tmp_path: pathlib.Path) -> AsyncIterator[Servers]:
    s = Servers(tmp_path)
    yield s
    await s.close()


async def test_a_new_server_joins_as_learner_and_is_promoted(servers: Servers) -> None:
    initial = await servers.bootstrap_three()
    lead = await servers.leader()
    for n in range(5):
        await lead.commit(put(f"before{n}", n))
    assert lead.servers == initial, "the bootstrap entries carry every server's address"

    joiner_addr = servers.reserve(4)
    joiner = await servers.start(4, {4: joiner_addr}, bootstrap=False)
    assert not joiner.is_leader and joiner.state.revision == 0
    joiner.learn_peers(lead.servers)
    await lead.add_server(4, joiner_addr)
    assert 4 in lead.status().conf_state.learners
    await eventually(lambda: joiner.state.get("nodes", "before4") == {"v": 4}, 5.0, 0.01,
                     what="the learner caught up")
    # The leader hears the learner's acknowledgement a moment after the learner applied.
    await lead.wait_for(lambda: lead.status().progress[4].match >= lead.status().commit, timeout=5.0)
    assert await lead.promote_caught_up() == [4]
    assert 4 in lead.status().conf_state.voters
    assert joiner.servers == {**initial, 4: joiner_addr}, "the joiner learned the table from the log"

    # Now four voters: quorum is 3. With two of the original servers down, writes stop;
    # with one down they go on, and the joiner's vote is part of every quorum.
    others = [i for i in (1, 2, 3) if i != lead.node_id]
    await servers.stop(others[0])
    assert await lead.commit(put("after")) > 0
    await eventually(lambda: joiner.state.get("nodes", "after") is not None, 5.0, 0.01, what="joiner applied")


async def test_removing_a_server_shrinks_the_quorum(servers: Servers) -> None:
    initial = await servers.bootstrap_three()
    lead = await servers.leader()
    victim = next(i for i in (1, 2, 3) if i != lead.node_id)
    await servers.stop(victim)
    await lead.remove_server(victim)
    assert victim not in lead.servers
    assert lead.status().conf_state.voters == frozenset(i for i in (1, 2, 3) if i != victim)
    # Two voters left; stop the other follower and the leader alone cannot commit —
    # but first, with both alive, writes go on as before.
    assert await lead.commit(put("x")) > 0


async def test_membership_changes_are_refused_on_a_follower(servers: Servers) -> None:
    initial = await servers.bootstrap_three()
    lead = await servers.leader()
    follower = next(s for s in servers.stores.values() if s is not lead)
    await eventually(lambda: follower.leader_id == lead.node_id, 5.0, 0.01, what="follower knows the leader")
    with pytest.raises(NotLeader) as info:
        await follower.add_server(9, "127.0.0.1:1")
    assert info.value.leader_hint == lead.node_id


async def test_the_server_table_survives_a_restart(servers: Servers) -> None:
    initial = await servers.bootstrap_three()
    lead = await servers.leader()
    await lead.commit(put("a"))
    restarted = next(i for i in (1, 2, 3) if i != lead.node_id)
    await servers.stop(restarted)
    # Restart with an empty peer table: the log holds the addresses.
    store = await servers.start(restarted, {}, bootstrap=False)
    await eventually(lambda: store.state.get("nodes", "a") is not None, 5.0, 0.01, what="restarted server caught up")
    assert store.servers == initial
