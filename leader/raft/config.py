"""Configuration of one Raft node: a frozen dataclass with a reason for every default.

Time in the core is counted in logical ticks; the shell calls `Node.tick()` every
`tick_interval` seconds, the only field the core itself never reads. Profiles:
`Config.lan()` (the defaults, for servers on one network) and `Config.wan()` (servers
across regions, where round trips are tens of milliseconds and pauses longer).

How the election defaults meet T4 (a new leader accepts writes ≤ 1 s p99 after the
leader is killed): a follower campaigns after a randomized timeout drawn uniformly from
[election_tick, 2 × election_tick) ticks, restarted on every heartbeat. With 3 servers
two followers race, so the first one fires after min(U1, U2): with the defaults
(40 ms × 10 ticks) that is 0.40–0.80 s, p50 ≈ 0.52 s and p99 ≈ 0.76 s after the last
heartbeat (`failover_quantile`). Pre-vote, vote and the new leader's no-op commit add
three round trips and two fsyncs (≈ 20 ms on loopback), the client's retry one more.
The timeout stays ≥ 10 heartbeats so a few lost heartbeats or a stalled event loop do
not start elections, and a leader steps down (check-quorum) after one election timeout
without hearing from a majority — before any follower can have elected a new one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shoal.errors import ConfigError

__all__ = ["Config", "election_timeout_seconds", "failover_quantile"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Settings of one Raft node. Units: ticks unless stated; sizes in bytes."""

    id: int
    """This node's id, > 0, unique in the cluster and never reused after removal."""

    tick_interval: float = 0.04
    """Seconds between two `tick()` calls (read by the shell only). 40 ms keeps the
    failover p99 under 1 s (module docstring) at 25 heartbeats/s per follower."""

    election_tick: int = 10
    """Ticks without hearing from a leader before a follower campaigns; the actual
    timeout is randomized in [election_tick, 2 × election_tick) so candidates rarely
    collide. Also the check-quorum and leader-lease period. 10 = 0.4 s at 40 ms."""

    heartbeat_tick: int = 1
    """Ticks between leader heartbeats. Every tick: heartbeats are tiny, and each one
    also carries the commit index and acknowledges pending ReadIndex requests."""

    max_size_per_msg: int = 1 << 20
    """Most entry bytes in one MsgApp (at least one entry is always sent). 1 MiB keeps
    one append under ~10 ms on a LAN while letting a lagging follower catch up fast."""

    max_inflight_msgs: int = 2
    """MsgApps sent but not yet acknowledged, per follower (pipelining window). Two
    keep a follower busy (one batch on its disk, the next on the wire) while whatever
    is proposed meanwhile waits for the next ack and leaves as one bigger append: every
    message costs both ends a gRPC write and a read, so under load a wider window only
    buys more, smaller batches (measured on 2 cores: 256 sent ~40 % more messages per
    write). A batch is bounded by `max_size_per_msg`, not by this."""

    max_inflight_bytes: int = 0
    """Entry bytes in flight per follower; 0 means limited by message count only."""

    max_committed_size_per_ready: int = 4 << 20
    """Most committed-entry bytes handed to the application in one Ready (at least one
    entry), so one apply batch cannot stall the event loop after a long catch-up."""

    pre_vote: bool = True
    """Ask for votes without raising the term first, so a node that rejoins after a
    partition cannot depose a healthy leader by bumping the term (thesis §9.6)."""

    check_quorum: bool = True
    """A leader that heard from no majority within election_tick steps down, and
    followers that heard from a leader within election_tick ignore vote requests (the
    leader lease). Needed so an isolated leader stops accepting writes and reads."""

    applied: int = 0
    """Last index the state machine already holds (e.g. restored from a snapshot);
    entries up to it are not handed out again on restart."""

    def validate(self) -> None:
        """Raise `ConfigError` naming the first setting that cannot work."""
        if self.id <= 0:
            raise ConfigError(f"raft: id must be a positive integer, got {self.id}")
        if not (self.tick_interval > 0 and math.isfinite(self.tick_interval)):
            raise ConfigError(f"raft: tick_interval must be > 0 seconds, got {self.tick_interval}")
        if self.heartbeat_tick < 1:
            raise ConfigError(f"raft: heartbeat_tick must be ≥ 1, got {self.heartbeat_tick}")
        if self.election_tick <= self.heartbeat_tick:
            raise ConfigError(
                f"raft: election_tick ({self.election_tick}) must be greater than "
                f"heartbeat_tick ({self.heartbeat_tick}), or followers time out between "
                "heartbeats; 10 × heartbeat_tick is a good start"
            )
        if self.max_size_per_msg < 1:
            raise ConfigError(f"raft: max_size_per_msg must be ≥ 1, got {self.max_size_per_msg}")
        if self.max_inflight_msgs < 1:
            raise ConfigError(f"raft: max_inflight_msgs must be ≥ 1, got {self.max_inflight_msgs}")
        if self.max_inflight_bytes < 0:
            raise ConfigError(
                f"raft: max_inflight_bytes must be ≥ 0 (0 = no byte limit), got {self.max_inflight_bytes}"
            )
        if self.max_committed_size_per_ready < 1:
            raise ConfigError(
                "raft: max_committed_size_per_ready must be ≥ 1, "
                f"got {self.max_committed_size_per_ready}"
            )
        if self.applied < 0:
            raise ConfigError(f"raft: applied must be ≥ 0, got {self.applied}")

    @classmethod
    def lan(cls, id: int) -> Config:
        """Servers on one network (the defaults)."""
        return cls(id=id)

    @classmethod
    def wan(cls, id: int) -> Config:
        """Servers across regions: 100 ms ticks, 2–4 s election timeout, heartbeat 200 ms."""
        return cls(id=id, tick_interval=0.1, election_tick=20, heartbeat_tick=2)


def election_timeout_seconds(config: Config) -> tuple[float, float]:
    """The range [low, high) a follower's randomized election timeout falls in, seconds."""
    return (config.election_tick * config.tick_interval, 2 * config.election_tick * config.tick_interval)


def failover_quantile(config: Config, followers: int, q: float) -> float:
    """Seconds after the last heartbeat by which the first of `followers` campaigns,
    with probability `q` (0 < q < 1): the q-quantile of the minimum of that many
    uniform timeouts, (1 − (1 − q)^(1/followers)) of the way through the range.
    Ignores tick granularity and election round trips."""
    if followers < 1 or not 0 < q < 1:
        raise ValueError("followers must be ≥ 1 and 0 < q < 1")
    low, high = election_timeout_seconds(config)
    return low + (high - low) * (1 - math.pow(1 - q, 1 / followers))
