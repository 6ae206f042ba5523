"""The deployment controller (`shoal.leader.controller`): replica counts, rollover,
placement, tables, and settling (a pass over its own committed result does nothing)."""

from __future__ import annotations

import dataclasses
import pathlib
import random
from typing import Any

import pytest
import yaml

from shoal.leader.controller import Controller
from shoal.leader.records import DeploymentRecord, NodeRecord, Phase, ReplicaRecord, ServiceRecord, TableRecord
from shoal.leader.scheduler import Scheduler, SchedulerConfig
from shoal.leader.state import Delete, Put, Txn
from shoal.leader.store import MemoryStore, SqliteStore, Store
from shoal.manifest import parse_text

GI = 1 << 30
NOW = 1_700_000_000.0
PORTS = SchedulerConfig().port_range


def deployment_raw(name: str = "web", replicas: int = 3, image: str = "img:1", memory: str | None = None,
                   app: str | None = None) -> dict[str, Any]:
    container: dict[str, Any] = {"name": name, "image": image, "ports": [{"containerPort": 8080}]}
    if memory is not None:
        container["resources"] = {"requests": {"memory": memory}}
    doc = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": app or name}},
            "template": {"metadata": {"labels": {"app": app or name}}, "spec": {"containers": [container]}},
        },
    }
    (parsed,) = parse_text(yaml.safe_dump(doc), f"{name}.yaml")
    return parsed.raw


def service_raw(name: str = "web", app: str | None = None) -> dict[str, Any]:
    doc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"selector": {"app": app or name}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    (parsed,) = parse_text(yaml.safe_dump(doc), f"{name}-svc.yaml")
    return parsed.raw


def controller(seed: int = 7) -> Controller:
    return Controller(Scheduler(SchedulerConfig(), random.Random(seed)), random.Random(seed))


async def with_node(store: Store, name: str = "n1", address: str = "10.0.0.1") -> None:
    node = NodeRecord(name=name, address=address, cpu_millis=4000, memory_bytes=8 * GI)
    await store.commit(Txn(ops=(Put(kind="nodes", name=name, value=node.to_dict()),)))


async def put_deployment(store: Store, raw: dict[str, Any], *, generation: int = 1, template_generation: int = 1) -> None:
    rec = DeploymentRecord(name=raw["metadata"]["name"], manifest=raw, generation=generation,
                           template_generation=template_generation, created_at=NOW)
    await store.commit(Txn(ops=(Put(kind="deployments", name=rec.name, value=rec.to_dict()),)))


async def put_service(store: Store, raw: dict[str, Any]) -> None:
    rec = ServiceRecord(name=raw["metadata"]["name"], manifest=raw, created_at=NOW)
    await store.commit(Txn(ops=(Put(kind="services", name=rec.name, value=rec.to_dict()),)))


async def settle(ctl: Controller, store: Store, now: float = NOW, max_passes: int = 10) -> list[Txn]:
    """Reconcile and commit until a pass returns nothing; the passes that did something."""
    done: list[Txn] = []
    for _ in range(max_passes):
        txn = ctl.reconcile(store.state, now)
        if not txn:
            return done
        await store.commit(txn)
        done.append(txn)
    raise AssertionError(f"the controller did not settle in {max_passes} passes: last {done[-1]}")


def replicas(store: Store, deployment: str | None = None) -> list[ReplicaRecord]:
    return [ReplicaRecord.from_dict(r) for r in store.state.list("replicas")
            if deployment is None or r["deployment"] == deployment]


async def update_replica(store: Store, rid: str, **changes: Any) -> None:
    rec = dataclasses.replace(ReplicaRecord.from_dict(store.state.get("replicas", rid) or {}), **changes)
    await store.commit(Txn(ops=(Put(kind="replicas", name=rid, value=rec.to_dict()),)))


async def make_ready(store: Store, rid: str, ready: bool = True) -> None:
    await update_replica(store, rid, phase=int(Phase.RUNNING), ready=ready)


def deployment(store: Store, name: str = "web") -> DeploymentRecord:
    return DeploymentRecord.from_dict(store.state.get("deployments", name) or {})


def table(store: Store, name: str = "web") -> TableRecord:
    return TableRecord.from_dict(store.state.get("tables", name) or {})


# -- replica counts and placement -------------------------------------------------


async def test_new_deployment_gets_pending_replicas_then_placements_on_distinct_ports() -> None:
    store, ctl = MemoryStore(), controller()
    await with_node(store)
    await put_deployment(store, deployment_raw(replicas=3))

    txn = ctl.reconcile(store.state, NOW)
    puts = [op for op in txn.ops if isinstance(op, Put) and op.kind == "replicas"]
    created, placed = puts[:3], puts[3:]
    assert [ReplicaRecord.from_dict(p.value).phase for p in created] == [Phase.PENDING] * 3
    assert all(ReplicaRecord.from_dict(p.value).created_at == NOW for p in created)
    assert len(placed) == 3
    assert {p.name for p in placed} == {p.name for p in created}
    assert [e.reason for e in txn.events].count("Scheduled") == 3

    await store.commit(txn)
    reps = replicas(store, "web")
    assert len(reps) == 3
    assert all(r.phase == Phase.ASSIGNED and r.node == "n1" and r.generation == 1 for r in reps)
    assert all(r.id.startswith("web-") for r in reps)
    ports = [r.host_port for r in reps]
    assert len(set(ports)) == 3
    assert all(PORTS[0] <= p <= PORTS[1] for p in ports)
    assert not ctl.reconcile(store.state, NOW + 1)


async def test_replica_ids_are_deterministic_for_a_seed() -> None:
    async def ids(seed: int) -> list[str]:
        store, ctl = MemoryStore(), controller(seed)
        await with_node(store)
        await put_deployment(store, deployment_raw(replicas=4))
        await settle(ctl, store)
        return sorted(r.id for r in replicas(store))

    assert await ids(3) == await ids(3)


async def test_scale_down_removes_not_ready_first_then_failed_before_running() -> None:
    store, ctl = MemoryStore(), controller()
    await with_node(store)
    await put_deployment(store, deployment_raw(replicas=4))
    await settle(ctl, store)
    a, b, c, d = sorted(r.id for r in replicas(store))
    await make_ready(store, a)
    await make_ready(store, b)
    await make_ready(store, c, ready=False)  # running, not ready yet (starting up)
    await update_replica(store, d, phase=int(Phase.FAILED), ready=False)  # crash-looping

    await put_deployment(store, deployment_raw(replicas=3), generation=2)
    await settle(ctl, store)
    assert sorted(r.id for r in replicas(store)) == [a, b, c], "the failed replica goes first"

    await put_deployment(store, deployment_raw(replicas=2), generation=3)
    txn = ctl.reconcile(store.state, NOW)
    assert [op for op in txn.ops if isinstance(op, Delete)] == [Delete(kind="replicas", name=c)]
    assert [(e.reason, e.object) for e in txn.events] == [("Killing", f"pod/{c}")]
    await store.commit(txn)
    assert sorted(r.id for r in replicas(store)) == [a, b]
    assert not ctl.reconcile(store.state, NOW)

    await put_deployment(store, deployment_raw(replicas=0), generation=4)
    await settle(ctl, store)
    assert replicas(store) == []


async def test_scale_down_among_equals_removes_the_newest() -> None:
    store, ctl = MemoryStore(), controller()
    await with_node(store)
    await put_deployment(store, deployment_raw(replicas=2))
    await settle(ctl, store)
    old, new = sorted(replicas(store), key=lambda r: r.id)
    await update_replica(store, old.id, created_at=NOW - 100)
    await update_replica(store, new.id, created_at=NOW - 10)
    await put_deployment(store, deployment_raw(replicas=1), generation=2)
    await settle(ctl, store)
    assert [r.id for r in replicas(store)] == [old.id]


async def test_template_change_rolls_over_as_new_replicas_turn_ready() -> None:
    store, ctl = MemoryStore(), controller()
    await with_node(store)
    await put_service(store, service_raw())
    await put_deployment(store, deployment_raw(replicas=3, image="img:1"))
    await settle(ctl, store)
    old_ids = sorted(r.id for r in replicas(store))
    for rid in old_ids:
        await make_ready(store, rid)
    await settle(ctl, store)
    assert [e["pod"] for e in table(store).endpoints] == old_ids

    await put_deployment(store, deployment_raw(replicas=3, image="img:2"), generation=2, template_generation=2)
    await settle(ctl, store)
    # Default strategy: maxSurge 25% of 3 rounds up to 1, maxUnavailable 25% down to 0.
    new = [r for r in replicas(store) if r.generation == 2]
    assert len(new) == 1, "one surge replica at a time"
    # Nothing old goes while nothing new is ready.
    assert sorted(r.id for r in replicas(store) if r.generation == 1) == old_ids

    for step in range(1, 4):
        for r in replicas(store):
            if r.generation == 2 and not r.ready:
                await make_ready(store, r.id)
        await settle(ctl, store)
        reps = replicas(store)
        assert len(reps) <= 4, "never more than replicas + maxSurge"
        assert sum(1 for r in reps if r.ready) >= 3, "the ready count never drops during the roll"
        assert len([r for r in reps if r.generation == 1]) == 3 - step
        assert sorted(e["pod"] for e in table(store).endpoints) == sorted(r.id for r in reps if r.ready)
    assert all(r.generation == 2 for r in replicas(store)) and len(replicas(store)) == 3


async def test_recreate_replaces_every_replica_at_once() -> None:
    store, ctl = MemoryStore(), controller()
    await with_node(store)
    raw = deployment_raw(replicas=3, image="img:1")
    raw["spec"]["strategy"] = {"type": "Recreate"}
    await put_deployment(store, raw)
    await settle(ctl, store)
    for r in replicas(store):
        await make_ready(store, r.id)
    raw2 = deployment_raw(replicas=3, image="img:2")
    raw2["spec"]["strategy"] = {"type": "Recreate"}
    await put_deployment(store, raw2, generation=2, template_generation=2)
    await settle(ctl, store)
    reps = replicas(store)
    assert len(reps) == 3 and all(r.generation == 2 for r in reps)


@pytest.mark.parametrize(
    ("surge", "unavailable", "want", "expected"),
    [("25%", "25%", 3, (1, 0)), ("25%", "25%", 4, (1, 1)), (0, 0, 3, (0, 1)), (2, 1, 3, (2, 1)),
     ("50%", "50%", 5, (3, 2)), ("100%", 0, 3, (3, 0)), ("25%", "25%", 0, (0, 1))],
)
def test_rolling_bounds(surge: int | str, unavailable: int | str, want: int, expected: tuple[int, int]) -> None:
    from shoal.leader.controller import rolling_bounds
    from shoal.model import RollingUpdate

    assert rolling_bounds(RollingUpdate(max_surge=surge, max_unavailable=unavailable), want) == expected


async def test_orphans_are_removed_when_the_deployment_is_gone() -> None:
    store, ctl = MemoryStore(), controller()
    await with_node(store)
    await put_deployment(store, deployment_raw(name="web", replicas=2))
    await put_deployment(store, deployment_raw(name="api", replicas=1))
    await settle(ctl, store)
    await store.commit(Txn(ops=(Delete(kind="deployments", name="web"),)))
    txn = ctl.reconcile(store.state, NOW)
    assert sorted(op.name for op in txn.ops if isinstance(op, Delete)) == sorted(r.id for r in replicas(store, "web"))
    await store.commit(txn)
    assert [r.deployment for r in replicas(store)] == ["api"]
    assert not ctl.reconcile(store.state, NOW)


async def test_recreated_deployment_with_the_same_name_uses_its_new_manifest() -> None:
    """Delete and re-create gives generation 1 again: the spec must not come from a cache."""
    store, ctl = MemoryStore(), controller()
    await with_node(store)
    await put_deployment(store, deployment_raw(replicas=2, image="img:1"))
    await settle(ctl, store)
    assert ctl.deployment_spec(deployment(store)).container.image == "img:1"  # type: ignore[union-attr]
    await store.commit(Txn(ops=(Delete(kind="deployments", name="web"),
                                *(Delete(kind="replicas", name=r.id) for r in replicas(store)))))
    await put_deployment(store, deployment_raw(replicas=4, image="img:2"))
    await settle(ctl, store)
    assert ctl.deployment_spec(deployment(store)).container.image == "img:2"  # type: ignore[union-attr]
    assert len(replicas(store, "web")) == 4


# -- scheduling failures ------------------------------------------------------------


async def test_unschedulable_sets_the_reason_and_one_event() -> None:
    store, ctl = MemoryStore(), controller()
    await with_node(store)
    await put_deployment(store, deployment_raw(replicas=2, memory="1000Gi"))
    passes = await settle(ctl, store)
    reason = deployment(store).unschedulable
    assert "insufficient memory" in reason and reason.startswith("0/1 nodes are available")
    assert all(r.phase == Phase.PENDING and not r.node for r in replicas(store))
    failed = [e for t in passes for e in t.events if e.reason == "FailedScheduling"]
    assert len(failed) == 1
    assert failed[0].type == "Warning" and failed[0].object == "deployment/web" and failed[0].message == reason
    # Later passes re-try placement but neither rewrite the deployment nor repeat the event.
    for k in range(3):
        assert not ctl.reconcile(store.state, NOW + k)

    # Once it fits, the reason clears (without another event).
    await put_deployment(store, deployment_raw(replicas=2, memory="64Mi"), generation=2)
    passes = await settle(ctl, store)
    assert deployment(store).unschedulable == ""
    assert all(r.phase == Phase.ASSIGNED for r in replicas(store))
    assert not [e for t in passes for e in t.events if e.reason == "FailedScheduling"]


async def test_unrelated_placements_do_not_repeat_failed_scheduling() -> None:
    store, ctl = MemoryStore(), controller()
    await with_node(store)
    await put_deployment(store, deployment_raw(name="big", replicas=1, memory="1000Gi"))
    await settle(ctl, store)
    first = deployment(store, "big").unschedulable
    await put_deployment(store, deployment_raw(name="web", replicas=2, memory="1Gi"))
    passes = await settle(ctl, store)
    assert deployment(store, "big").unschedulable != first  # "largest free" moved
    assert not [e for t in passes for e in t.events if e.reason == "FailedScheduling"]


async def test_partly_schedulable_places_what_fits_and_settles() -> None:
    store, ctl = MemoryStore(), controller()
    await with_node(store)  # 8Gi
    await put_deployment(store, deployment_raw(replicas=3, memory="3Gi"))
    passes = await settle(ctl, store)
    phases = sorted(r.phase for r in replicas(store))
    assert phases == [Phase.PENDING, Phase.ASSIGNED, Phase.ASSIGNED]
    assert deployment(store).unschedulable
    assert sum(1 for t in passes for e in t.events if e.reason == "FailedScheduling") == 1


# -- tables -----------------------------------------------------------------------


async def test_tables_list_ready_replicas_sorted_and_version_moves_only_on_change() -> None:
    store, ctl = MemoryStore(), controller()
    await with_node(store, address="10.0.0.9")
    await put_service(store, service_raw())
    await put_deployment(store, deployment_raw(replicas=3))
    await settle(ctl, store)
    t = table(store)
    assert (t.version, t.endpoints, t.algorithm) == (1, [], "round_robin")
    assert t.ports == [{"name": "", "port": 80, "target_port": 8080, "node_port": 0, "protocol": "TCP",
                        "app_protocol": "tcp"}]

    reps = sorted(replicas(store), key=lambda r: r.id)
    # Ready in reverse id order: the table is still sorted by id.
    await make_ready(store, reps[2].id)
    await make_ready(store, reps[0].id)
    await make_ready(store, reps[1].id, ready=False)
    await settle(ctl, store)
    t = table(store)
    assert t.version == 2
    assert t.endpoints == [
        {"pod": r.id, "address": "10.0.0.9", "port": r.host_port, "weight": 1} for r in (reps[0], reps[2])
    ]

    # A change that does not touch the endpoints (a restart count) leaves the table alone.
    await update_replica(store, reps[1].id, restarts=4)
    assert not [op for op in ctl.reconcile(store.state, NOW).ops if op.kind == "tables"]
    assert table(store).version == 2

    await make_ready(store, reps[0].id, ready=False)
    await settle(ctl, store)
    assert (table(store).version, [e["pod"] for e in table(store).endpoints]) == (3, [reps[2].id])

    # The service going away takes its table with it.
    await store.commit(Txn(ops=(Delete(kind="services", name="web"),)))
    await settle(ctl, store)
    assert store.state.get("tables", "web") is None


async def test_tables_only_take_replicas_the_selector_matches() -> None:
    store, ctl = MemoryStore(), controller()
    await with_node(store)
    await put_service(store, service_raw(name="web"))
    await put_deployment(store, deployment_raw(name="web", replicas=1))
    await put_deployment(store, deployment_raw(name="other", replicas=1))
    await settle(ctl, store)
    for r in replicas(store):
        await make_ready(store, r.id)
    await settle(ctl, store)
    assert [e["pod"] for e in table(store).endpoints] == [r.id for r in replicas(store, "web")]


# -- settling ----------------------------------------------------------------------


async def test_reconcile_settles_after_one_pass_per_change(tmp_path: pathlib.Path) -> None:
    """The control loop relies on this: a pass over its own committed result is empty,
    also after the state went through the database and back (IntEnums become ints)."""
    store = SqliteStore(tmp_path / "state.db")
    ctl = controller()
    await with_node(store)
    await put_service(store, service_raw())
    await put_deployment(store, deployment_raw(replicas=3))
    await put_deployment(store, deployment_raw(name="big", replicas=1, memory="1000Gi"))
    passes = await settle(ctl, store)
    # "big" failed before web's replicas were reserved in the same batch, so its reason's
    # figures change on the next pass: the record is rewritten once, without an event.
    assert len(passes) <= 2
    assert sum(1 for t in passes for e in t.events if e.reason == "FailedScheduling") == 1
    for r in replicas(store, "web"):
        await make_ready(store, r.id)
    assert len(await settle(ctl, store)) == 1
    snapshot = store.state.to_snapshot()
    await store.close()

    reopened = SqliteStore(tmp_path / "state.db")
    try:
        assert reopened.state.to_snapshot() == snapshot
        fresh = controller(seed=99)  # a new leader: empty caches, another rng
        assert not fresh.reconcile(reopened.state, NOW + 60)
    finally:
        await reopened.close()


@pytest.mark.parametrize("seed", range(5))
async def test_random_histories_always_settle(seed: int) -> None:
    """Scale, roll and readiness flips in a seeded random order: every pass settles."""
    rng = random.Random(seed)
    store, ctl = MemoryStore(), controller(seed)
    await with_node(store)
    await put_service(store, service_raw())
    generation, template = 1, 1
    await put_deployment(store, deployment_raw(replicas=2))
    for _ in range(25):
        step = rng.choice(["scale", "roll", "flip", "flip", "flip"])
        if step == "scale":
            generation += 1
            await put_deployment(store, deployment_raw(replicas=rng.randint(0, 5), image=f"img:{template}"),
                                 generation=generation, template_generation=template)
        elif step == "roll":
            generation += 1
            template += 1
            spec = ctl.deployment_spec(deployment(store))
            assert spec is not None
            await put_deployment(store, deployment_raw(replicas=spec.replicas, image=f"img:{template}"),
                                 generation=generation, template_generation=template)
        else:
            reps = replicas(store)
            if reps:
                r = rng.choice(reps)
                await make_ready(store, r.id, ready=not r.ready)
        await settle(ctl, store)
        spec = ctl.deployment_spec(deployment(store))
        assert spec is not None
        current = [r for r in replicas(store) if r.generation == template]
        old = [r for r in replicas(store) if r.generation != template]
        assert len(current) <= spec.replicas
        if not old:
            assert len(current) == spec.replicas
        ready = sorted(r.id for r in replicas(store) if r.ready)
        assert [e["pod"] for e in table(store).endpoints] == ready
        ports = [r.host_port for r in replicas(store)]
        assert len(set(ports)) == len(ports)


# -- a lost host --------------------------------------------------------------------


async def mark_down(store: Store, name: str, since: float) -> None:
    rec = dataclasses.replace(NodeRecord.from_dict(store.state.get("nodes", name) or {}), status="Down", down_since=since)
    await store.commit(Txn(ops=(Put(kind="nodes", name=name, value=rec.to_dict()),)))


async def test_a_down_host_leaves_the_tables_at_once_and_its_replicas_move_after_the_grace() -> None:
    store, ctl = MemoryStore(), controller()
    await with_node(store, "n1", "10.0.0.1")
    await with_node(store, "n2", "10.0.0.2")
    raw = deployment_raw(replicas=2)
    raw["metadata"]["annotations"] = {"shoal.io/placement": "spread"}
    await put_deployment(store, raw)
    await put_service(store, service_raw())
    await settle(ctl, store)
    for r in replicas(store):
        await make_ready(store, r.id)
    await settle(ctl, store)
    assert {e["address"] for e in table(store).endpoints} == {"10.0.0.1", "10.0.0.2"}
    lost = [r.id for r in replicas(store) if r.node == "n2"]
    assert len(lost) == 1

    await mark_down(store, "n2", NOW)
    await settle(ctl, store, NOW + ctl.node_lost_grace / 2)
    assert {e["address"] for e in table(store).endpoints} == {"10.0.0.1"}, "a dead host serves nobody"
    assert lost[0] in {r.id for r in replicas(store)}, "within the grace period the replica stays"

    passes = await settle(ctl, store, NOW + ctl.node_lost_grace)
    reps = replicas(store)
    assert lost[0] not in {r.id for r in reps}
    assert len(reps) == 2 and all(r.node == "n1" for r in reps), "replaced on the live host"
    assert any(e.reason == "NodeLost" and e.object == f"pod/{lost[0]}" for t in passes for e in t.events)


async def test_a_not_ready_host_keeps_its_replicas() -> None:
    """An agent whose stream dropped (a leader change, a restart) is NotReady, not lost."""
    store, ctl = MemoryStore(), controller()
    await with_node(store, "n1")
    await put_deployment(store, deployment_raw(replicas=2))
    await settle(ctl, store)
    before = sorted(r.id for r in replicas(store))
    rec = dataclasses.replace(NodeRecord.from_dict(store.state.get("nodes", "n1") or {}), status="NotReady")
    await store.commit(Txn(ops=(Put(kind="nodes", name="n1", value=rec.to_dict()),)))
    await settle(ctl, store, NOW + 3600)
    assert sorted(r.id for r in replicas(store)) == before


# -- cordon and drain ---------------------------------------------------------------------


async def set_node(store: Store, name: str, **changes: Any) -> None:
    rec = dataclasses.replace(NodeRecord.from_dict(store.state.get("nodes", name) or {}), **changes)
    await store.commit(Txn(ops=(Put(kind="nodes", name=name, value=rec.to_dict()),)))


async def test_a_cordoned_node_keeps_its_replicas_and_takes_no_new_ones() -> None:
    store, ctl = MemoryStore(), controller()
    await with_node(store, "n1")
    await put_deployment(store, deployment_raw(replicas=2))
    await settle(ctl, store)
    await set_node(store, "n1", cordoned=True)
    await settle(ctl, store)
    assert all(r.node == "n1" for r in replicas(store)), "cordon moves nothing"
    await put_deployment(store, deployment_raw(name="more", replicas=1))
    await settle(ctl, store)
    assert [r.node for r in replicas(store, "more")] == [""]
    assert "cordoned" in deployment(store, "more").unschedulable


async def test_drain_replaces_first_and_removes_only_once_the_replacements_are_ready() -> None:
    store, ctl = MemoryStore(), controller()
    await with_node(store, "n1", "10.0.0.1")
    await put_deployment(store, deployment_raw(replicas=2))
    await put_service(store, service_raw())
    await settle(ctl, store)
    old = sorted(r.id for r in replicas(store))
    for rid in old:
        await make_ready(store, rid)
    await with_node(store, "n2", "10.0.0.2")
    await set_node(store, "n1", cordoned=True, draining=True)
    await settle(ctl, store)
    reps = {r.id: r for r in replicas(store)}
    new = sorted(set(reps) - set(old))
    assert len(new) == 2 and all(reps[i].node == "n2" for i in new), "replacements on the other node"
    assert set(old) <= set(reps), "the drained replicas serve until the replacements are ready"
    assert {e["address"] for e in table(store).endpoints} == {"10.0.0.1"}

    await make_ready(store, new[0])
    await settle(ctl, store)
    assert set(old) <= {r.id for r in replicas(store)}, "one ready replacement is not yet enough for 2"
    await make_ready(store, new[1])
    await settle(ctl, store)
    assert sorted(r.id for r in replicas(store)) == new
    assert {e["address"] for e in table(store).endpoints} == {"10.0.0.2"}
