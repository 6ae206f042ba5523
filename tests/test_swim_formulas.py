"""Table tests for the SWIM formulas, the config and the small building blocks."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from shoal.agent.swim.awareness import Awareness, scale_timeout
from shoal.agent.swim.broadcast import BroadcastQueue, retransmit_limit
from shoal.agent.swim.config import Config, push_pull_scale, silence_tolerance
from shoal.agent.swim.member import IllegalTransition, State, check_transition, make_meta, meta_size
from shoal.agent.swim.messages import Alive, Broadcast, Dead, Suspect, approx_size
from shoal.agent.swim.suspicion import (
    Suspicion,
    expected_confirmations,
    remaining_suspicion_time,
    suspicion_timeout,
)
from shoal.errors import ConfigError


@pytest.mark.parametrize(
    ("mult", "n", "interval", "expected"),
    [
        (4, 0, 1.0, 4.0),  # log10 of nothing: scale 1
        (4, 1, 1.0, 4.0),
        (4, 5, 1.0, 4.0),  # log10(5) < 1: scale 1
        (4, 10, 1.0, 4.0),
        (4, 100, 1.0, 8.0),
        (4, 1000, 1.0, 12.0),
        (3.5, 5, 0.4, 1.4),
        (3.5, 10_000, 0.4, 5.6),
        (5, 50, 0.2, 5 * math.log10(50) * 0.2),
    ],
)
def test_suspicion_timeout(mult: float, n: int, interval: float, expected: float) -> None:
    assert suspicion_timeout(mult, n, interval) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("confirmations", "k", "elapsed", "low", "high", "expected"),
    [
        (0, 3, 0.0, 2.0, 30.0, 30.0),  # unconfirmed: the maximum
        (3, 3, 0.0, 2.0, 30.0, 2.0),  # all confirmations in: the minimum
        (1, 3, 0.0, 2.0, 30.0, 30.0 - 28.0 * math.log(2) / math.log(4)),  # = 16.0
        (2, 3, 0.0, 2.0, 30.0, 30.0 - 28.0 * math.log(3) / math.log(4)),
        (1, 3, 5.0, 2.0, 30.0, 11.0),  # elapsed time is subtracted
        (3, 3, 3.0, 2.0, 30.0, -1.0),  # already expired: negative
        (5, 3, 0.0, 2.0, 30.0, 2.0),  # more than k never goes below the minimum
        (0, 0, 0.0, 2.0, 30.0, 2.0),  # nobody to confirm: the minimum straight away
        (0, 1, 0.0, 1.4, 8.4, 8.4),
        (1, 1, 0.0, 1.4, 8.4, 1.4),
    ],
)
def test_remaining_suspicion_time(
    confirmations: int, k: int, elapsed: float, low: float, high: float, expected: float
) -> None:
    assert remaining_suspicion_time(confirmations, k, elapsed, low, high) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("k", "n", "expected"),
    [(3, 5, 3), (3, 4, 2), (3, 3, 1), (3, 2, 0), (3, 1, 0), (3, 100, 3), (0, 100, 0)],
)
def test_expected_confirmations(k: int, n: int, expected: int) -> None:
    assert expected_confirmations(k, n) == expected


def test_suspicion_counts_distinct_independent_accusers() -> None:
    s = Suspicion(accuser="a", k=2, min_timeout=1.0, max_timeout=6.0, start=10.0)
    assert s.deadline() == pytest.approx(16.0)
    assert not s.confirm("a")  # the original accuser again
    assert s.confirm("b")
    assert not s.confirm("b")  # a repeat
    assert s.deadline() == pytest.approx(10.0 + 6.0 - 5.0 * math.log(2) / math.log(3))
    assert s.confirm("c")
    assert not s.confirm("d")  # beyond k
    assert s.deadline() == pytest.approx(11.0)
    s.shift(0.5)
    assert s.deadline() == pytest.approx(11.5)


@pytest.mark.parametrize(
    ("mult", "n", "expected"),
    [(4, 1, 4), (4, 5, 4), (4, 9, 4), (4, 10, 8), (4, 99, 8), (4, 100, 12), (4, 1000, 16), (4, 10_000, 20), (3, 50, 6)],
)
def test_retransmit_limit(mult: int, n: int, expected: int) -> None:
    assert retransmit_limit(mult, n) == expected


@pytest.mark.parametrize(
    ("timeout", "score", "expected"), [(0.15, 0, 0.15), (0.15, 1, 0.30), (0.4, 7, 3.2), (1.0, 3, 4.0)]
)
def test_scale_timeout(timeout: float, score: int, expected: float) -> None:
    assert scale_timeout(timeout, score) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("deltas", "expected"),
    [([], 0), ([1], 1), ([1, 1, -1], 1), ([-5], 0), ([3, 3, 3], 7), ([10, -1], 6)],
)
def test_awareness_is_clamped(deltas: list[int], expected: int) -> None:
    a = Awareness(8)
    for d in deltas:
        a.apply_delta(d)
    assert a.score == expected
    assert a.scale(0.5) == pytest.approx(0.5 * (expected + 1))


@pytest.mark.parametrize(
    ("n", "expected"), [(1, 30.0), (32, 30.0), (33, 60.0), (64, 60.0), (65, 90.0), (1000, 180.0), (10_000, 300.0)]
)
def test_push_pull_scale(n: int, expected: float) -> None:
    assert push_pull_scale(30.0, n) == pytest.approx(expected)


def test_lan_silence_tolerance_covers_a_1_5_s_pause_with_margin() -> None:
    cfg = Config.lan()
    # The refutation of a 1.5 s pause needs a few gossip rounds to reach the accusers.
    assert silence_tolerance(cfg, 5) == pytest.approx(1.8)
    assert silence_tolerance(cfg, 5) - 1.5 >= 3 * cfg.gossip_interval - 1e-9


def test_profiles_validate() -> None:
    assert Config.lan().validate() == Config()
    Config.local().validate()


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        ({"probe_interval": 0.0}, "probe_interval must be greater than 0"),
        ({"probe_timeout": 0.5}, "must be shorter than probe_interval"),
        ({"indirect_checks": -1}, "indirect_checks must not be negative"),
        ({"suspicion_max_timeout_mult": 0.5}, "suspicion_max_timeout_mult must be at least 1"),
        ({"retransmit_mult": 0}, "retransmit_mult must be at least 1"),
        ({"gossip_nodes": 0}, "gossip_nodes must be at least 1"),
        ({"udp_buffer_size": 100}, "udp_buffer_size must be at least 512"),
        ({"meta_max_size": 1000}, "meta_max_size must be between 1 and half"),
        ({"dead_reap_time": -1.0}, "dead_reap_time must not be negative"),
    ],
)
def test_validate_rejects_with_a_sentence(change: dict[str, Any], phrase: str) -> None:
    with pytest.raises(ConfigError, match=phrase):
        dataclasses.replace(Config.lan(), **change).validate()


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config.lan().probe_interval = 1.0  # type: ignore[misc]


# ---------------------------------------------------------------- broadcast queue


def _alive(name: str, inc: int = 0) -> Alive:
    return Alive(name=name, address=("10.0.0.1", 7421), incarnation=inc)


def test_newer_message_about_a_member_replaces_the_older() -> None:
    q = BroadcastQueue(lambda _m: 10)
    q.queue("a", _alive("a", 1))
    q.get(1000, 10)
    assert q.transmits("a") == 1
    q.queue("a", Suspect(name="a", incarnation=1, accuser="b"))
    assert len(q) == 1
    assert q.transmits("a") == 0  # the new message starts over
    assert q.get(1000, 10) == [Suspect(name="a", incarnation=1, accuser="b")]


def test_fewest_transmits_first_then_newest() -> None:
    q = BroadcastQueue(lambda _m: 10)
    q.queue("a", _alive("a"))
    q.queue("b", _alive("b"))
    assert q.get(10, 10) == [_alive("b")]  # room for one: the newest of the unsent
    q.queue("c", _alive("c"))
    assert q.get(20, 10) == [_alive("c"), _alive("a")]  # both unsent; b was sent once
    assert q.get(10, 10) == [_alive("c")]  # all sent once now: newest first


def test_packing_respects_the_byte_budget_and_skips_what_does_not_fit() -> None:
    sizes = {"big": 100, "small": 10, "mid": 50}
    q = BroadcastQueue(lambda m: sizes[m.name])
    for name in ("small", "big", "mid"):
        q.queue(name, _alive(name))
    got: list[Broadcast] = q.get(70, 10, overhead=2)
    assert [m.name for m in got] == ["mid", "small"]  # big (102) skipped, 52 + 12 <= 70
    assert q.transmits("big") == 0


def test_messages_are_dropped_at_the_retransmit_limit() -> None:
    q = BroadcastQueue(lambda _m: 10)
    q.queue("a", _alive("a"))
    for _ in range(3):
        assert q.get(100, 3) == [_alive("a")]
    assert q.get(100, 3) == []
    assert len(q) == 0
    q.queue("b", _alive("b"))
    q.get(100, 5)
    q.get(100, 5)
    assert q.get(100, 2) == []  # the group shrank: already sent enough
    assert len(q) == 0


def test_prune_drops_the_most_sent_first() -> None:
    q = BroadcastQueue(lambda _m: 10)
    q.queue("old", _alive("old"))
    q.get(100, 10)
    q.queue("new", _alive("new"))
    assert q.prune(1) == 1
    assert q.transmits("old") is None and q.transmits("new") == 0


# ---------------------------------------------------------------- members and messages


@pytest.mark.parametrize(
    ("old", "new", "ok"),
    [
        (State.ALIVE, State.SUSPECT, True),
        (State.ALIVE, State.DEAD, True),
        (State.ALIVE, State.LEFT, True),
        (State.ALIVE, State.ALIVE, True),
        (State.SUSPECT, State.ALIVE, True),
        (State.SUSPECT, State.DEAD, True),
        (State.DEAD, State.ALIVE, True),
        (State.DEAD, State.SUSPECT, False),
        (State.LEFT, State.ALIVE, True),
        (State.LEFT, State.DEAD, False),
        (State.LEFT, State.SUSPECT, False),
    ],
)
def test_transition_table(old: State, new: State, ok: bool) -> None:
    if ok:
        check_transition(old, new)
    else:
        with pytest.raises(IllegalTransition):
            check_transition(old, new)


def test_meta_is_sorted_and_sized() -> None:
    meta = make_meta({"role": "server", "grpc": "10.0.0.1:7420", "version": "0.1.0"})
    assert [k for k, _ in meta] == ["grpc", "role", "version"]
    assert make_meta(meta) == meta
    assert meta_size(meta) == sum(len(k) + len(v) for k, v in meta)
    with pytest.raises(TypeError):
        make_meta({"role": 1})  # type: ignore[arg-type]


def test_leave_is_a_dead_from_self() -> None:
    assert Dead(name="a", incarnation=3, accuser="a").is_leave
    assert not Dead(name="a", incarnation=3, accuser="b").is_leave


def test_approx_size_grows_with_content() -> None:
    small = approx_size(_alive("a"))
    big = approx_size(Alive(name="a" * 50, address=("10.0.0.1", 1), incarnation=1, meta=make_meta({"k": "v" * 100})))
    assert 0 < small < big
