"""The cluster state machine (`shoal.leader.state`) and the stores behind it."""

from __future__ import annotations

import asyncio
import pathlib

import pytest

from shoal.errors import Conflict, StoreError
from shoal.leader.state import EVENTS_KEPT, ClusterState, Delete, NewEvent, Put, Txn
from shoal.leader.store import MemoryStore, SqliteStore


def ev(n: int, reason: str = "Tested") -> NewEvent:
    return NewEvent(time=1000.0 + n, type="Normal", reason=reason, object=f"pod/p{n}", message=f"event {n}")


def sample_txn() -> Txn:
    return Txn(
        ops=(
            Put(kind="deployments", name="web", value={"name": "web", "spec": {"replicas": 3, "labels": {"a": "b"}}}),
            Put(kind="replicas", name="web-abcde", value={"id": "web-abcde", "phase": 100, "ready": False}),
            Delete(kind="services", name="gone"),
        ),
        events=(ev(1), ev(2, "Other")),
    )


def test_txn_json_round_trip() -> None:
    txn = sample_txn()
    again = Txn.from_json(txn.to_json())
    assert again == txn
    # Canonical: the same transaction always serialises to the same bytes.
    assert again.to_json() == txn.to_json()


def test_empty_txn_is_falsy_and_round_trips() -> None:
    assert not Txn()
    assert Txn(events=(ev(1),))
    assert Txn.from_json(Txn().to_json()) == Txn()


def test_txn_from_json_rejects_unknown_op() -> None:
    with pytest.raises(ValueError, match="unknown op"):
        Txn.from_json('{"ops":[{"op":"patch","kind":"nodes","name":"n"}],"events":[]}')


def test_apply_puts_deletes_and_bumps_revision() -> None:
    state = ClusterState()
    assert state.apply(sample_txn()) == 1
    assert state.get("deployments", "web") == {"name": "web", "spec": {"replicas": 3, "labels": {"a": "b"}}}
    assert [r["id"] for r in state.list("replicas")] == ["web-abcde"]
    assert state.apply(Txn(ops=(Delete(kind="replicas", name="web-abcde"),))) == 2
    assert state.list("replicas") == []


def test_apply_copies_values_in_and_out() -> None:
    state = ClusterState()
    value = {"nested": {"x": 1}}
    state.apply(Txn(ops=(Put(kind="nodes", name="n1", value=value),)))
    value["nested"]["x"] = 2  # the caller's dict is not the state's
    got = state.get("nodes", "n1")
    assert got == {"nested": {"x": 1}}
    assert got is not None
    got["nested"]["x"] = 3  # nor is what a reader gets back
    assert state.get("nodes", "n1") == {"nested": {"x": 1}}


def test_apply_rejects_unknown_kind_before_changing_anything() -> None:
    state = ClusterState()
    state.apply(Txn(ops=(Put(kind="nodes", name="n1", value={"v": 1}),)))
    before = state.to_snapshot()
    bad = Txn(
        ops=(
            Put(kind="nodes", name="n1", value={"v": 2}),  # valid, first: must not land
            Delete(kind="nodes", name="n1"),
            Put(kind="widgets", name="w", value={}),
        ),
        events=(ev(1),),
    )
    with pytest.raises(ValueError, match="widgets"):
        state.apply(bad)
    assert state.to_snapshot() == before
    assert state.revision == 1


def test_events_get_increasing_seq_and_only_the_newest_are_kept() -> None:
    state = ClusterState()
    total = EVENTS_KEPT + 37
    # Several events per transaction, so seq is per event, not per transaction.
    for start in range(0, total, 5):
        state.apply(Txn(events=tuple(ev(n) for n in range(start, min(start + 5, total)))))
    events = state.events_since(0)
    assert len(events) == EVENTS_KEPT
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(total - EVENTS_KEPT + 1, total + 1))
    assert state.next_event_seq == total + 1
    assert [e["seq"] for e in state.events_since(total - 3)] == [total - 2, total - 1, total]


def test_snapshot_round_trip() -> None:
    state = ClusterState()
    state.apply(sample_txn())
    state.apply(Txn(ops=(Put(kind="tables", name="web", value={"service": "web", "version": 2}),), events=(ev(3),)))
    again = ClusterState.from_snapshot(state.to_snapshot())
    assert again.revision == state.revision == 2
    assert again.next_event_seq == state.next_event_seq == 4
    assert again.collections == state.collections
    assert list(again.events) == list(state.events)
    assert again.to_snapshot() == state.to_snapshot()
    # The restored state keeps the event cap.
    assert again.events.maxlen == EVENTS_KEPT


# -- stores -----------------------------------------------------------------------


async def test_memory_store_commit_applies_and_rejects_unknown_kinds() -> None:
    store = MemoryStore()
    assert await store.commit(sample_txn()) == 1
    assert await store.commit(Txn()) == 1  # an empty transaction is not a revision
    with pytest.raises(StoreError, match="widgets"):
        await store.commit(Txn(ops=(Put(kind="nodes", name="n", value={}), Put(kind="widgets", name="w", value={}))))
    assert store.state.revision == 1
    assert store.state.get("nodes", "n") is None


async def test_sqlite_store_survives_close_and_reopen(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "sub" / "state.db"
    store = SqliteStore(path)
    await store.commit(sample_txn())
    await store.commit(Txn(ops=(Put(kind="nodes", name="n1", value={"name": "n1", "labels": {"zone": "a"}}),)))
    await store.commit(Txn(ops=(Delete(kind="deployments", name="web"),), events=(ev(7),)))
    await store.commit(Txn(events=tuple(ev(n) for n in range(10, 15))))
    before = store.state.to_snapshot()
    revision = store.state.revision
    await store.close()

    reopened = SqliteStore(path)
    try:
        assert reopened.state.revision == revision == 4
        assert reopened.state.to_snapshot() == before
        assert [e["seq"] for e in reopened.state.events_since(0)] == list(range(1, 9))
        # And it keeps counting from where it was.
        assert await reopened.commit(Txn(events=(ev(99),))) == 5
        assert reopened.state.events_since(8)[0]["seq"] == 9
    finally:
        await reopened.close()


async def test_sqlite_store_keeps_only_the_newest_events_on_disk(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "state.db"
    store = SqliteStore(path)
    total = EVENTS_KEPT + 10
    batch = 200
    for start in range(0, total, batch):
        await store.commit(Txn(events=tuple(ev(n) for n in range(start, min(start + batch, total)))))
    in_memory = store.state.events_since(0)
    await store.close()
    reopened = SqliteStore(path)
    try:
        assert reopened.state.events_since(0) == in_memory
        assert len(in_memory) == EVENTS_KEPT
        (count,) = reopened._db.execute("SELECT COUNT(*) FROM events").fetchone()
        assert count == EVENTS_KEPT
    finally:
        await reopened.close()


def test_sqlite_store_refuses_a_damaged_file_with_a_sentence(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="move it aside"):
        SqliteStore(path)


async def test_wait_wakes_on_commit() -> None:
    store = MemoryStore()
    waiter = asyncio.create_task(store.wait(0, timeout=5.0))
    await asyncio.sleep(0)  # let the waiter start waiting: this is ordering, not timing
    assert not waiter.done()
    await store.commit(Txn(events=(ev(1),)))
    assert await asyncio.wait_for(waiter, 1.0) == 1


async def test_wait_returns_at_once_when_already_past() -> None:
    store = MemoryStore()
    await store.commit(Txn(events=(ev(1),)))
    assert await asyncio.wait_for(store.wait(0, timeout=5.0), 1.0) == 1


async def test_wait_times_out_without_a_commit() -> None:
    store = MemoryStore()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await store.wait(0, timeout=0.05) == 0
    assert loop.time() - started >= 0.04


async def test_a_cancelled_commit_still_lands_in_memory_and_on_disk(tmp_path: pathlib.Path) -> None:
    """The caller giving up (a gRPC handler cancelled mid-write) must not leave disk and
    memory disagreeing: the write completes and is applied."""
    store = SqliteStore(tmp_path / "state.db")
    task = asyncio.ensure_future(store.commit(Txn(ops=(Put(kind="nodes", name="n1", value={"status": "NotReady"}),))))
    await asyncio.sleep(0)  # let it start: the write is now under way in its thread
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await store.wait(0, timeout=5.0)
    assert store.state.get("nodes", "n1") == {"status": "NotReady"}
    await store.close()
    reopened = SqliteStore(tmp_path / "state.db")
    assert reopened.state.revision == store.state.revision == 1
    await reopened.close()


async def test_concurrent_commits_number_revisions_and_events_consistently(tmp_path: pathlib.Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    txns = [
        Txn(ops=(Put(kind="nodes", name=f"n{i}", value={"i": i}),),
            events=(NewEvent(time=0.0, type="Normal", reason="R", object=f"node/n{i}", message="m"),))
        for i in range(20)
    ]
    revisions = await asyncio.gather(*(store.commit(t) for t in txns))
    assert sorted(revisions) == list(range(1, 21))
    await store.close()
    reopened = SqliteStore(tmp_path / "state.db")
    assert reopened.state.to_snapshot() == store.state.to_snapshot()
    assert [e["seq"] for e in reopened.state.events_since(0)] == list(range(1, 21))
    await reopened.close()


# -- optimistic concurrency ----------------------------------------------------------


def test_a_guarded_txn_is_refused_if_what_it_writes_changed_since_it_was_read() -> None:
    state = ClusterState()
    state.apply(Txn(ops=(Put(kind="deployments", name="web", value={"replicas": 1}),)))
    read = Txn(ops=(Put(kind="deployments", name="web", value={"replicas": 1, "note": "x"}),)).guarded(state)
    assert read.expect == (("deployments", "web", 1),)
    state.apply(Txn(ops=(Put(kind="deployments", name="web", value={"replicas": 5}),)))  # someone else
    with pytest.raises(Conflict, match="deployments/web changed at revision 2"):
        state.apply(read)
    assert state.get("deployments", "web") == {"replicas": 5}, "the other write is not overwritten"
    assert state.revision == 2
    # Expectations travel with the transaction (through the Raft log).
    assert Txn.from_json(read.to_json()) == read
    # An object that did not exist is expected at 0; a delete clears its revision.
    new = Txn(ops=(Put(kind="services", name="s", value={}),)).guarded(state)
    assert new.expect == (("services", "s", 0),)
    state.apply(new)
    state.apply(Txn(ops=(Delete(kind="services", name="s"),)))
    assert state.mod_revision("services", "s") == 0
    assert ClusterState.from_snapshot(state.to_snapshot()).mods == state.mods


class InterferedStore(MemoryStore):
    """Another writer commits between the first transaction's build and its commit."""

    def __init__(self, interference: Txn) -> None:
        super().__init__()
        self.interference: Txn | None = interference

    async def commit(self, txn: Txn) -> int:
        if self.interference is not None and txn.expect:
            other, self.interference = self.interference, None
            await super().commit(other)
        return await super().commit(txn)


async def test_update_rebuilds_from_the_new_state_on_a_conflict() -> None:
    store = InterferedStore(Txn(ops=(Put(kind="nodes", name="n", value={"count": 10}),)))
    await store.commit(Txn(ops=(Put(kind="nodes", name="n", value={"count": 0}),)))
    builds = 0

    def increment(state: ClusterState) -> Txn:
        nonlocal builds
        builds += 1
        value = state.get("nodes", "n") or {}
        return Txn(ops=(Put(kind="nodes", name="n", value={"count": value["count"] + 1}),))

    await store.update(increment)
    assert builds == 2
    assert store.state.get("nodes", "n") == {"count": 11}, "built again from the new state: no lost update"
    assert await store.update(lambda state: Txn()) is None
    with pytest.raises(Conflict):
        await store.commit(Txn(ops=(Put(kind="nodes", name="n", value={}),), expect=(("nodes", "n", 1),)))
