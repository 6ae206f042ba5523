"""Raft configuration: validation with actionable messages, profiles, timeout formulas."""

from __future__ import annotations

import dataclasses

import pytest

from shoal.errors import ConfigError
from shoal.leader.raft import Config, election_timeout_seconds, failover_quantile


def test_defaults_are_valid() -> None:
    Config(id=1).validate()
    Config.lan(1).validate()
    Config.wan(1).validate()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"id": 0}, "id must be a positive"),
        ({"tick_interval": 0.0}, "tick_interval"),
        ({"tick_interval": float("nan")}, "tick_interval"),
        ({"heartbeat_tick": 0}, "heartbeat_tick"),
        ({"election_tick": 1}, "election_tick .* must be greater than heartbeat_tick"),
        ({"max_size_per_msg": 0}, "max_size_per_msg"),
        ({"max_inflight_msgs": 0}, "max_inflight_msgs"),
        ({"max_inflight_bytes": -1}, "max_inflight_bytes"),
        ({"max_committed_size_per_ready": 0}, "max_committed_size_per_ready"),
        ({"applied": -1}, "applied"),
    ],
)
def test_invalid_settings_name_the_setting(change: dict[str, object], message: str) -> None:
    config = dataclasses.replace(Config(id=1), **change)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=message):
        config.validate()


def test_election_timeout_range() -> None:
    assert election_timeout_seconds(Config(id=1)) == pytest.approx((0.4, 0.8))
    assert election_timeout_seconds(Config.wan(1)) == pytest.approx((2.0, 4.0))


@pytest.mark.parametrize(
    ("followers", "q", "expected"),
    [
        (1, 0.5, 0.6),  # one follower: the median of U[0.4, 0.8)
        (2, 0.5, 0.4 + 0.4 * (1 - 0.5**0.5)),
        (2, 0.99, 0.76),
        (4, 0.99, 0.4 + 0.4 * (1 - 0.01**0.25)),
    ],
)
def test_failover_quantile(followers: int, q: float, expected: float) -> None:
    assert failover_quantile(Config(id=1), followers, q) == pytest.approx(expected)


def test_default_failover_leaves_room_for_the_election_under_one_second() -> None:
    # T4: p99 ≤ 1 s from kill -9 to an acknowledged write. The timeout alone must
    # leave a few round trips and fsyncs of margin with 3 servers (2 followers).
    assert failover_quantile(Config(id=1), followers=2, q=0.99) < 0.8


def test_failover_quantile_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        failover_quantile(Config(id=1), 0, 0.5)
    with pytest.raises(ValueError):
        failover_quantile(Config(id=1), 2, 1.0)
