"""SWIM configuration: one frozen dataclass, named profiles, and the formulas it feeds.

Rules:
- Times are seconds (float), sizes bytes, counts plain ints. Every default carries its
  reason; `lan()` is the default profile, `local()` is for one machine (loopback,
  `shoal agent --dev`, tests). Override single fields with `dataclasses.replace`.
- `validate()` raises `shoal.errors.ConfigError` with a sentence a user can act on.

How the LAN numbers were chosen (targets T1 and T2 of the brief, 5 hosts):

  A member that goes silent at time S is declared dead no earlier than

      silence_tolerance = probe_interval + suspicion_min
                        = probe_interval * (1 + suspicion_mult * max(1, log10 N))

  because the first failed probe whose ping arrived after S concludes one (awareness
  scaled) probe interval after it started, and the suspicion it raises cannot time out
  before `suspicion_min` even with every confirmation in. A 1.5 s pause (SIGSTOP) must
  end, and its refutation reach the accusers, before that: 0.3 * (1 + 5) = 1.8 s, i.e.
  1.5 s plus 300 ms (three gossip rounds) for the refutation.

  A failed member is found by the first of the N-1 others whose randomized round robin
  reaches it: each probes one member per interval, so that wait W is a fraction of a
  probe interval on average (p99 ~3 intervals at N=5). For a silent one (host down),
  detection by everyone is then W + silence_tolerance + one hop (the Dead goes out at
  once). The other members learn the suspicion within one gossip round and probe the
  suspect next (see `Swim`), so k = 3 confirmations arrive within ~2 probe intervals
  plus a round, inside `suspicion_min`: the timer is at its minimum when it matters.
  Simulated (5 members, `bench/gossip_sim.py`): p50 ~2.0 s, p99 ~2.8 s, never below
  1.8 s.

  A crash looks exactly like a pause to a silent probe, so silence alone cannot both
  detect in under 1.5 s and never kill a member paused 1.5 s. The reachability check
  (`reach.py`) tells them apart whenever the target's host still answers TCP: when the
  direct ping times out, the prober connects to the target's gossip port.

  - Agent gone, host up (crash, kill -9, OOM kill): the host's kernel refuses (RST)
    within a round trip. The prober suspects the member with `refused_suspicion_timeout`
    (0.3 s) instead of the Lifeguard timer and gossips the suspicion; the death follows
    when it runs out, and members that heard the suspicion take it at once. Detection
    by everyone is then W + probe_timeout + refused_suspicion_timeout + one hop:
    simulated p50 ~0.7 s, p99 ~1.5 s, never below 0.42 s.
  - Paused or overloaded (SIGSTOP, swap, a long GC): the kernel still completes the
    handshake, so the missed probe is excused rather than suspected, for up to
    `host_up_patience` (5 s) of continuous excuses. Without loss, a pause shorter than
    host_up_patience + silence_tolerance raises no suspicion at all.
  - Host silent (power off, link down, partition) or the check itself lost: no answer,
    and the silence threshold above applies unchanged: a pause is safe up to 1.8 s
    (minus its refutation's travel) whatever the network does to the check.

  Under 20 % loss on every link a probe fails only if the direct round trip (0.8^2) and
  all three indirect paths (0.8^4 each) fail: 0.36 * 0.59^3 = 7.4 %. Such a lone
  suspicion runs on the unconfirmed timer (max = 6 * min = 9 s) while the suspect,
  probed by the others at once with the suspicion piggybacked (buddy system), refutes
  in a few hundred milliseconds. And most such suspicions are never raised: the
  reachability check of a running agent completes (SYN and SYN-ACK through: 0.8^2) and
  excuses the missed probe, leaving 0.074 * 0.36 = 2.7 % of probes to suspect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shoal.errors import ConfigError

__all__ = ["Config", "silence_tolerance", "push_pull_scale"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Tuning of one SWIM member. Use `Config.lan()` or `Config.local()`."""

    # Time between two probes started by this member (scaled by local health). Each member
    # probes one other per interval, so a crash is first noticed after a fraction of an
    # interval; 0.3 s keeps that short (T1's p99) while a probe costs two small datagrams.
    probe_interval: float = 0.3
    # How long to wait for a direct ack before asking helpers (scaled by local health).
    # LAN round trips are < 1 ms; 120 ms absorbs event-loop lag of a busy Python agent and
    # leaves 180 ms in the interval for PingReq -> Ping -> (helper's 120 ms) -> Ack/Nack.
    # A slower agent misses nacks and its awareness stretches both (Lifeguard).
    probe_timeout: float = 0.12
    # Helpers asked to probe indirectly (k of SWIM). Three independent paths make a false
    # probe failure at 20 % loss 7.4 % instead of 36 %; more adds load for little gain.
    indirect_checks: int = 3
    # suspicion_min = suspicion_mult * max(1, log10 N) * probe_interval = 1.5 s at N <= 10:
    # with the probe interval, 1.8 s of silence before death (see the module docstring).
    suspicion_mult: float = 5.0
    # An unconfirmed suspicion lasts suspicion_max_timeout_mult * suspicion_min (9 s):
    # a lone accuser (often the one with the problem) gets little weight (Lifeguard).
    suspicion_max_timeout_mult: float = 6.0
    # Independent confirmations that bring a suspicion down to its minimum (Lifeguard's
    # K). Capped at N-2. Three means every other member of a 5-host cluster agrees.
    suspicion_confirmations: int = 3
    # Each broadcast is sent retransmit_mult * ceil(log10(N+1)) times: 4 at N=5, 12 at
    # N=100, 16 at N=1000; enough for an epidemic to reach all with high probability.
    retransmit_mult: int = 4
    # Gossip rounds while something is queued (an idle member sends nothing). 100 ms
    # keeps a suspicion, refutation or death one round away from everyone on a LAN.
    gossip_interval: float = 0.1
    # Members gossiped to per round (fan-out). Three gives an infection factor of ~4 per
    # round: 10,000 members are reached in about log4(10,000) ~ 7 rounds.
    gossip_nodes: int = 3
    # Dead members still get gossip this long, so one that was only cut off learns it is
    # thought dead and refutes; this is what heals short partitions quickly.
    gossip_to_the_dead_time: float = 30.0
    # Full-state TCP sync with one random member (scaled up beyond 32 members): repairs
    # whatever gossip missed. 30 s costs little and bounds how long views can differ.
    push_pull_interval: float = 30.0
    # A push-pull with one random DEAD member every this often: heals partitions longer
    # than gossip_to_the_dead_time (and finds a member that came back without rejoining).
    reconnect_interval: float = 10.0
    # DEAD members are remembered (and reconnect-tried) this long, then forgotten.
    dead_reap_time: float = 3600.0
    # LEFT members are remembered this long so a stale "alive" from a peer that missed the
    # leave is recognised: ten push-pull intervals.
    left_reap_time: float = 300.0
    # Local health multiplier cap: a struggling member waits at most 8x longer (memberlist
    # and Lifeguard use 8).
    awareness_max_multiplier: int = 8
    # When the direct ping of a probe times out, ask the shell to open a TCP connection to
    # the target's gossip port (`reach.py`): a refusal is positive evidence that the agent
    # is gone, a completed handshake that its host is up and the agent merely slow. Off,
    # every missed probe is judged by silence alone (plain SWIM + Lifeguard).
    reachability_checks: bool = True
    # A member whose host refused the check (nothing listens on its gossip port) is
    # suspected with this timeout instead of the Lifeguard one, then declared dead.
    # Why not dead at once: a running agent behind a firewall that rejects TCP on the
    # gossip port (a misconfiguration) would be refused too; 0.3 s is three gossip rounds,
    # time for the suspicion (sent to it directly) to be refuted and the refutation to
    # come back, and for the suspicion to reach the other members of a small group before
    # the death does (a death about a member never suspected costs them suspicion_min).
    # A restarting agent is safe either way: it rejoins with an incarnation above the
    # one it was suspected or declared dead at, and a late refusal about the previous
    # life is ignored (checks are tied to the incarnation they were asked about).
    refused_suspicion_timeout: float = 0.3
    # Missed probes of a member whose host accepts the check are excused (no suspicion,
    # no confirmation) for this long after the first excused one; an ack ends the
    # excuse. Bounded so that a wedged agent whose kernel still accepts connections is
    # declared dead after host_up_patience + silence_tolerance (~6.8 s, about what
    # memberlist takes for a crash); 5 s outlasts ordinary GC pauses and swap storms by
    # far, and a false death is what costs most (every replica on the host is moved).
    host_up_patience: float = 5.0
    # A timer that fires this much later than asked means this process was not running
    # (SIGSTOP, swap, a long GC): its own timers are pushed back instead of blaming others.
    stall_threshold: float = 0.1
    # Bytes per datagram including piggybacked gossip: below a 1500-byte Ethernet MTU with
    # room for IP/UDP headers and the cluster name.
    udp_buffer_size: int = 1400
    # Metadata (role, gRPC address, labels, version) must fit with room to piggyback.
    meta_max_size: int = 512
    # Queued broadcasts kept at most; beyond it the most-sent are dropped (join storms).
    max_broadcasts: int = 4096

    @classmethod
    def lan(cls) -> Config:
        """The default profile: hosts on one LAN (sub-millisecond round trips)."""
        return cls()

    @classmethod
    def local(cls) -> Config:
        """One machine (loopback, `--dev`, tests): faster timers, fewer helpers."""
        return cls(
            # Loopback round trips are microseconds; a busy Python loop is the only delay.
            probe_interval=0.2,
            probe_timeout=0.08,
            # There are few members on one machine and the "network" does not lose packets.
            indirect_checks=1,
            # suspicion_min = 0.8 s, silence tolerance 1.0 s: quick feedback for developers.
            suspicion_mult=4.0,
            suspicion_max_timeout_mult=4.0,
            # Three gossip rounds, as on the LAN.
            refused_suspicion_timeout=0.15,
            # Not lower than the LAN's: with 2, a 5-member cluster sends each change only
            # twice and some members miss metadata updates and leaves (seen in the
            # simulator and the shell tests); sending costs nothing on loopback.
            retransmit_mult=4,
            gossip_interval=0.05,
            gossip_to_the_dead_time=15.0,
            push_pull_interval=10.0,
            reconnect_interval=5.0,
            left_reap_time=60.0,
        )

    def validate(self) -> Config:
        """Raise `ConfigError` if the settings cannot work together; return self."""
        problems: list[str] = []

        def positive(name: str, value: float) -> None:
            if not value > 0:
                problems.append(f"{name} must be greater than 0 (got {value})")

        for name in (
            "probe_interval", "probe_timeout", "suspicion_mult", "gossip_interval",
            "push_pull_interval", "reconnect_interval", "stall_threshold",
            "refused_suspicion_timeout",
        ):
            positive(name, getattr(self, name))
        for name in ("gossip_to_the_dead_time", "dead_reap_time", "left_reap_time", "host_up_patience"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative (got {getattr(self, name)})")
        if self.probe_timeout >= self.probe_interval:
            problems.append(
                f"probe_timeout ({self.probe_timeout}) must be shorter than probe_interval "
                f"({self.probe_interval}) to leave time for indirect probes; "
                "use at most half of it"
            )
        if self.indirect_checks < 0:
            problems.append(f"indirect_checks must not be negative (got {self.indirect_checks})")
        if self.suspicion_max_timeout_mult < 1:
            problems.append(
                "suspicion_max_timeout_mult must be at least 1 "
                f"(got {self.suspicion_max_timeout_mult})"
            )
        if self.suspicion_confirmations < 0:
            problems.append(
                f"suspicion_confirmations must not be negative (got {self.suspicion_confirmations})"
            )
        for name in ("retransmit_mult", "gossip_nodes", "awareness_max_multiplier", "max_broadcasts"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.udp_buffer_size < 512:
            problems.append(
                f"udp_buffer_size must be at least 512 bytes (got {self.udp_buffer_size})"
            )
        if not 0 < self.meta_max_size <= self.udp_buffer_size // 2:
            problems.append(
                f"meta_max_size must be between 1 and half of udp_buffer_size "
                f"({self.udp_buffer_size // 2}), got {self.meta_max_size}"
            )
        if problems:
            raise ConfigError("invalid gossip settings: " + "; ".join(problems))
        return self


def silence_tolerance(config: Config, n: int) -> float:
    """The shortest silence after which a member of a group of `n` can be declared dead.

    probe_interval + suspicion_mult * max(1, log10 n) * probe_interval: a pause shorter
    than this (minus the time its refutation takes to travel) is never a false death.
    """
    return config.probe_interval * (1 + config.suspicion_mult * max(1.0, math.log10(max(1, n))))


def push_pull_scale(interval: float, n: int) -> float:
    """The push-pull interval for `n` members: doubled per doubling beyond 32.

    interval * (1 + ceil(log2(n) - log2(32))) for n > 32, else `interval`: every member
    sends its whole view, so large groups sync less often to keep the bytes per second
    (n * view size / interval) from growing quadratically.
    """
    if n <= 32:
        return interval
    return interval * (1 + math.ceil(math.log2(n) - math.log2(32)))
