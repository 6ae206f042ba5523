"""Balancing tables (leader) and endpoint pickers (shared by the proxy and the client)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from shoal.balancing import (
    ConsistentHash,
    EjectionConfig,
    Endpoint,
    OutlierEjector,
    RetryBudget,
    LeastConn,
    P2CEwma,
    Random,
    RoundRobin,
    SmoothWeighted,
    Table,
    make_picker,
    round_robin_slot,
)
from shoal.leader.balancer import build_table
from shoal.model import Algorithm


def ep(rid: str, weight: int = 1, port: int = 20000) -> Endpoint:
    return Endpoint(replica_id=rid, address="10.0.0.1", port=port, weight=weight)


ABC = (ep("a"), ep("b"), ep("c"))


def names(picks: list[Endpoint | None]) -> str:
    return " ".join(p.replica_id if p else "-" for p in picks)


# --------------------------------------------------------------------------- round robin


@pytest.mark.parametrize(
    ("r", "n", "s"),
    [(0, 3, 1), (1, 3, 2), (2, 3, 3), (3, 3, 1), (29, 3, 3), (7, 4, 4), (8, 4, 1), (5, 1, 1)],
)
def test_round_robin_slot_is_the_seed_formula(r: int, n: int, s: int) -> None:
    assert round_robin_slot(r, n) == s == (r % n) + 1


def test_round_robin_slot_needs_endpoints() -> None:
    with pytest.raises(ValueError):
        round_robin_slot(0, 0)


@pytest.mark.parametrize("n", [1, 3, 4, 7])
def test_round_robin_order_over_30_picks(n: int) -> None:
    eps = tuple(ep(f"e{k}") for k in range(n))
    rr = RoundRobin(eps)
    got = [rr.pick() for _ in range(30)]
    # Request R goes to endpoint number S = (R mod N) + 1, counted from 1.
    assert got == [eps[((r % n) + 1) - 1] for r in range(30)]
    assert rr.count == 30


def test_round_robin_exclude_skips_forward_and_counts_once() -> None:
    rr = RoundRobin(ABC)
    assert rr.pick(frozenset({"a"})).replica_id == "b"  # type: ignore[union-attr]
    assert rr.count == 1
    # R = 1 now: slot 2 is b again, as the formula says.
    assert names([rr.pick(), rr.pick(), rr.pick()]) == "b c a"
    # Skipping wraps around the end of the table.
    rr = RoundRobin(ABC)
    rr.pick()
    rr.pick()
    assert rr.pick(frozenset({"c"})).replica_id == "a"  # type: ignore[union-attr]
    assert rr.pick(frozenset({"a", "b", "c"})) is None
    assert rr.count == 3  # a pick that found nothing does not count


def test_round_robin_empty_and_update_keeps_counting() -> None:
    rr = RoundRobin()
    assert rr.pick() is None
    rr.update(ABC)
    assert names([rr.pick() for _ in range(4)]) == "a b c a"
    rr.update(ABC[:2])  # c went away; R = 4 continues: 4 mod 2 + 1 = slot 1
    assert names([rr.pick() for _ in range(3)]) == "a b a"
    assert rr.endpoints == ABC[:2]


# --------------------------------------------------------------------------- random


def test_random_is_roughly_uniform() -> None:
    eps = tuple(ep(f"e{k}") for k in range(5))
    picker = Random(eps, random.Random(42))
    n = 10_000
    counts = Counter(picker.pick().replica_id for _ in range(n))  # type: ignore[union-attr]
    expected = n / len(eps)
    chi2 = sum((counts[e.replica_id] - expected) ** 2 / expected for e in eps)
    assert chi2 < 18.47  # chi-square, 4 degrees of freedom, p = 0.001


def test_random_exclude_and_empty() -> None:
    picker = Random(ABC, random.Random(1))
    picks = {getattr(picker.pick(frozenset({"b"})), "replica_id", None) for _ in range(200)}
    assert picks == {"a", "c"}
    assert picker.pick(frozenset({"a", "b", "c"})) is None
    picker.update(())
    assert picker.pick() is None


def test_random_is_deterministic_per_seed() -> None:
    a = Random(ABC, random.Random(9))
    b = Random(ABC, random.Random(9))
    assert [a.pick() for _ in range(50)] == [b.pick() for _ in range(50)]


# --------------------------------------------------------------------------- weighted


def test_smooth_weighted_sequence_is_nginx_interleave() -> None:
    sw = SmoothWeighted((ep("a", 5), ep("b", 1), ep("c", 1)))
    assert names([sw.pick() for _ in range(14)]) == "a a b a c a a a a b a c a a"


@pytest.mark.parametrize("weights", [(5, 1, 1), (3, 2, 1), (1, 1, 1, 1), (10, 1), (7, 0, 3)])
def test_smooth_weighted_proportions(weights: tuple[int, ...]) -> None:
    eps = tuple(ep(f"e{k}", w) for k, w in enumerate(weights))
    sw = SmoothWeighted(eps)
    n = 10_000
    counts = Counter(sw.pick().replica_id for _ in range(n))  # type: ignore[union-attr]
    total = sum(weights)
    for e in eps:
        assert abs(counts[e.replica_id] / n - e.weight / total) < 0.01
    assert counts[eps[0].replica_id] > 0


def test_smooth_weighted_exclude_skips_without_charging() -> None:
    sw = SmoothWeighted((ep("a", 5), ep("b", 1), ep("c", 1)))
    assert sw.pick(frozenset({"a"})).replica_id == "b"  # type: ignore[union-attr]
    # b and c each gained 1; b won (first in table order) and paid the total of 2.
    assert sw.current_weights == {"a": 0, "b": -1, "c": 1}
    assert sw.pick(frozenset({"a", "b", "c"})) is None
    assert SmoothWeighted((ep("z", 0),)).pick() is None  # weight 0 drains


def test_smooth_weighted_update_preserves_remaining_state() -> None:
    eps = (ep("a", 5), ep("b", 1), ep("c", 1))
    sw = SmoothWeighted(eps)
    first = [sw.pick() for _ in range(3)]
    sw.update(eps)  # same table: the sequence goes on as if nothing happened
    assert names(first + [sw.pick() for _ in range(4)]) == "a a b a c a a"
    sw = SmoothWeighted(eps)
    sw.pick()  # a: a=-2 b=1 c=1
    sw.update((ep("a", 5), ep("b", 1), ep("d", 2)))
    # c left with current 1; the rest shift so the sum is near zero again; d starts at 0.
    assert sw.current_weights == {"a": -2, "b": 1, "d": 0}
    seq = names([sw.pick() for _ in range(8)])
    assert Counter(seq.split()) == {"a": 5, "b": 1, "d": 2}


def test_smooth_weighted_stays_bounded_under_churn() -> None:
    sw = SmoothWeighted()
    rng = random.Random(3)
    for _ in range(2000):
        eps = tuple(ep(f"e{k}", rng.randint(1, 5)) for k in range(8) if rng.random() < 0.7)
        sw.update(eps)
        for _ in range(rng.randint(0, 5)):
            sw.pick()
        assert all(abs(c) <= 200 for c in sw.current_weights.values())


# --------------------------------------------------------------------------- make_picker


def test_make_picker() -> None:
    rng = random.Random(1)
    assert isinstance(make_picker(Algorithm.ROUND_ROBIN, ABC, rng), RoundRobin)
    assert isinstance(make_picker(Algorithm.RANDOM, ABC, rng), Random)
    assert isinstance(make_picker(Algorithm.WEIGHTED, ABC, rng), SmoothWeighted)
    assert isinstance(make_picker(Algorithm.LEAST_CONN, ABC, rng), LeastConn)
    assert isinstance(make_picker(Algorithm.P2C_EWMA, ABC, rng), P2CEwma)
    assert isinstance(make_picker(Algorithm.CONSISTENT_HASH, ABC, rng), ConsistentHash)
    for algorithm in Algorithm:
        picker = make_picker(algorithm, ABC, rng)
        assert picker.endpoints == ABC
        assert picker.pick() in ABC


# --------------------------------------------------------------------------- least connections


def test_least_conn_sends_new_work_to_the_idle_endpoint() -> None:
    lc = LeastConn(ABC)
    for rid in ("a", "a", "b"):
        lc.started(rid)
    assert names([lc.pick()]) == "c"
    lc.started("c")
    assert names([lc.pick()]) == "b", "b and c have one each; the next in rotation wins"
    lc.finished("a", 0.01)
    lc.finished("a", 0.01)
    assert lc.outstanding == {"b": 1, "c": 1}
    assert names([lc.pick()]) == "a"


def test_least_conn_idle_endpoints_share_round_robin_and_respect_weight() -> None:
    lc = LeastConn(ABC)
    assert names([lc.pick() for _ in range(6)]) == "a b c a b c"
    heavy = LeastConn((ep("a", weight=3), ep("b")))
    for _ in range(3):
        heavy.started("a")
    heavy.started("b")
    # a: 3/3 = 1 per weight, b: 1/1 = 1: a tie, decided by rotation; one more on b
    # tips it to a.
    heavy.started("b")
    assert names([heavy.pick()]) == "a"
    assert names([lc.pick(exclude=frozenset("abc"))]) == "-"


# --------------------------------------------------------------------------- p2c ewma


def test_p2c_ewma_avoids_a_slow_endpoint() -> None:
    rng = random.Random(3)
    p = P2CEwma(ABC, rng)
    latency = {"a": 0.010, "b": 0.010, "c": 0.100}  # c is ten times slower
    counts: Counter[str] = Counter()
    for _ in range(3000):
        e = p.pick()
        assert e is not None
        counts[e.replica_id] += 1
        p.started(e.replica_id)
        p.finished(e.replica_id, latency[e.replica_id])
    assert counts["c"] / 3000 < 0.10, counts
    assert counts["c"] > 0, "a slow endpoint is still tried now and then"


def test_p2c_ewma_prefers_the_less_loaded_of_equals_and_new_endpoints_get_tried() -> None:
    p = P2CEwma((ep("a"), ep("b")), random.Random(1))
    p.finished("a", 0.01)
    p.finished("b", 0.01)
    for _ in range(5):
        p.started("a")
    assert {p.pick().replica_id for _ in range(20)} == {"b"}  # type: ignore[union-attr]
    p.update((ep("a"), ep("b"), ep("new")))
    picks = Counter(p.pick().replica_id for _ in range(300))  # type: ignore[union-attr]
    assert picks["new"] > 0
    assert p.pick(exclude=frozenset({"a", "b", "new"})) is None


# --------------------------------------------------------------------------- consistent hash


def test_consistent_hash_keeps_a_key_on_one_endpoint_and_spreads_keys() -> None:
    ch = ConsistentHash(ABC, random.Random(1))
    keys = [f"10.0.{i // 250}.{i % 250}".encode() for i in range(3000)]
    first = {k: ch.pick(key=k).replica_id for k in keys}  # type: ignore[union-attr]
    assert all(ch.pick(key=k).replica_id == first[k] for k in keys[:300])  # type: ignore[union-attr]
    share = Counter(first.values())
    assert all(800 < share[r] < 1200 for r in "abc"), share


def test_consistent_hash_moves_only_the_leaving_endpoints_keys() -> None:
    eps = tuple(ep(f"r{i}") for i in range(5))
    ch = ConsistentHash(eps, random.Random(1))
    keys = [f"client-{i}".encode() for i in range(5000)]
    before = {k: ch.pick(key=k).replica_id for k in keys}  # type: ignore[union-attr]
    ch.update(eps[:4])  # r4 leaves
    after = {k: ch.pick(key=k).replica_id for k in keys}  # type: ignore[union-attr]
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == "r4" for k in moved), "only r4's keys move"
    assert len(moved) / len(keys) < 1 / 5 * 1.3
    # An excluded endpoint's keys go to the next point on the ring, the rest stay.
    k = next(k for k in keys if after[k] == "r0")
    assert ch.pick(exclude=frozenset({"r0"}), key=k).replica_id != "r0"  # type: ignore[union-attr]


# --------------------------------------------------------------------------- outliers and retries


def test_an_endpoint_failing_in_a_row_is_ejected_for_a_growing_time() -> None:
    ej = OutlierEjector(EjectionConfig(consecutive_failures=3, base_seconds=1.0, max_seconds=4.0))
    assert not ej.record("a", False, 0.0, 4) and not ej.record("a", False, 0.1, 4)
    assert ej.record("a", False, 0.2, 4)
    assert ej.ejected(0.5) == {"a"} and ej.ejected(1.3) == frozenset()
    for t in (2.0, 2.1, 2.2):
        ej.record("a", False, t, 4)
    assert ej.ejected(3.9) == {"a"} and ej.ejected(4.3) == frozenset(), "second time: 2 s"
    for t in (5.0, 5.1, 5.2, 10.0, 10.1, 10.2, 20.0, 20.1, 20.2):
        ej.record("a", False, t, 4)
    assert ej.ejected(23.9) == {"a"} and ej.ejected(24.3) == frozenset(), "capped at max_seconds"


def test_a_success_resets_the_streak_and_ejection_never_takes_every_endpoint() -> None:
    ej = OutlierEjector(EjectionConfig(consecutive_failures=2))
    ej.record("a", False, 0.0, 2)
    ej.record("a", True, 0.1, 2)
    assert not ej.record("a", False, 0.2, 2), "the success broke the streak"
    assert ej.record("a", False, 0.3, 2)
    # Half of 2 endpoints is out already: b stays in however often it fails.
    for t in (0.4, 0.5, 0.6, 0.7):
        assert not ej.record("b", False, t, 2)
    assert ej.ejected(0.8) == {"a"}
    ej.forget(["b"])
    assert ej.ejected(0.8) == frozenset()


def test_the_retry_budget_is_a_share_of_requests_with_a_reserve() -> None:
    b = RetryBudget(ratio=0.25, reserve=3.0)
    assert [b.try_retry() for _ in range(4)] == [True, True, True, False]
    for _ in range(10):
        b.request()
    assert [b.try_retry() for _ in range(3)] == [True, True, False], "10 requests earn 2.5 retries"


# --------------------------------------------------------------------------- tables


def test_build_table_sorts_and_starts_at_version_1() -> None:
    t = build_table("web", Algorithm.ROUND_ROBIN, [ep("c"), ep("a"), ep("b")], None)
    assert t == Table(service="web", algorithm=Algorithm.ROUND_ROBIN, version=1, endpoints=ABC)


def test_build_table_version_bumps_only_on_change() -> None:
    t1 = build_table("web", Algorithm.ROUND_ROBIN, ABC, None)
    same = build_table("web", Algorithm.ROUND_ROBIN, reversed(ABC), t1)
    assert same is t1 and same.version == 1
    t2 = build_table("web", Algorithm.ROUND_ROBIN, ABC[:2], t1)
    assert t2.version == 2
    t3 = build_table("web", Algorithm.WEIGHTED, ABC[:2], t2)
    assert t3.version == 3
    t4 = build_table("web", Algorithm.WEIGHTED, (ep("a", 3), ep("b")), t3)
    assert t4.version == 4  # a weight change is a change
    t5 = build_table("web", Algorithm.WEIGHTED, (ep("b"), ep("a", 3)), t4)
    assert t5 is t4
    assert build_table("web", Algorithm.WEIGHTED, (), t5).version == 5


@pytest.mark.parametrize(
    "endpoints",
    [
        (ep("a"), ep("a", port=20001)),
        (ep("a", weight=-1),),
        (ep("a", port=0),),
        (ep("a", port=70000),),
    ],
)
def test_build_table_rejects_bad_endpoints(endpoints: tuple[Endpoint, ...]) -> None:
    with pytest.raises(ValueError):
        build_table("web", Algorithm.ROUND_ROBIN, endpoints, None)


def test_build_table_rejects_another_services_previous_table() -> None:
    t = build_table("web", Algorithm.ROUND_ROBIN, ABC, None)
    with pytest.raises(ValueError, match="api"):
        build_table("api", Algorithm.ROUND_ROBIN, ABC, t)
