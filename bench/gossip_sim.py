#!/usr/bin/env python3
"""T3: gossip load and spread in the deterministic SWIM simulator.

For simulated groups of N = 100 and 1,000 members (and 10,000 with --full; that one
needs ~3 GB of memory and ~8 minutes of one core), all starting with a converged view, it
prints:

- datagrams and messages each member sends per protocol period (failure detection:
  the load that must stay flat in N), and the extra datagrams and messages per member
  that one update costs over its whole life (bounded by the retransmit limit, log N),
- the protocol periods (and gossip rounds) until a metadata update reaches every member,
- the seconds until a crashed member is known dead by every other member (its agent
  killed, its host up: probers are refused).

SWIM's claims (T3 in the brief): load per member flat in N, spread in O(log N) periods.
The last column divides the spread by log10(N): roughly constant means logarithmic.
Anchor: the SWIM paper (constant per-member load; dissemination in O(log N) rounds).
Also prints the 5-member LAN failure detection distribution (the simulated side of T1),
for both kinds of failure: an agent crash on a live host (refused) and a silent host.

Usage: python bench/gossip_sim.py [--full] [--seed S] [--updates U]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time

from shoal.agent.swim.broadcast import retransmit_limit
from shoal.agent.swim.config import Config
from shoal.agent.swim.node import EventKind, MemberEvent
from shoal.agent.swim.sim import DeathRecorder, Sim, SimNode


def spread(n: int, seed: int, updates: int) -> dict[str, float]:
    cfg = Config.lan()
    period = cfg.probe_interval
    sim = Sim(seed=seed, config=cfg, count_kinds=False)
    names = [f"m{i:05d}" for i in range(n)]
    sim.add_converged(names)
    sim.run_for(3 * period)  # let the staggered first probes settle

    before = sim.stats.snapshot()
    idle_periods = 5
    sim.run_for(idle_periods * period)
    idle = sim.stats.since(before)

    rng = random.Random(seed)
    heard: dict[str, set[str]] = {}
    target: dict[str, int] = {}

    def observe(_sim: Sim, node: SimNode, events: tuple[MemberEvent, ...]) -> None:
        for e in events:
            inc = target.get(e.member.name)
            if e.kind is EventKind.UPDATE and inc is not None and e.member.incarnation >= inc:
                heard[e.member.name].add(node.name)

    sim.observers.append(observe)
    spreads: list[float] = []
    busy_packets = busy_messages = 0.0
    for u in range(updates):
        who = rng.choice(names)
        target[who] = sim.nodes[who].swim.local.incarnation + 1
        heard[who] = set()
        start = sim.now
        s0 = sim.stats.snapshot()
        sim.update_meta(who, {"version": str(u + 1)})
        done = sim.run_until_true(lambda: len(heard[who]) == n - 1, timeout=60 * period, step=period / 8)
        if not done:
            raise SystemExit(f"N={n}: update {u} reached {len(heard[who])} of {n - 1} (seed {seed})")
        spreads.append((sim.now - start) / period)
        del target[who]
        # Until every retransmit of it is spent, then charge what exceeds the idle rate.
        sim.run_until_true(lambda: not any(x.swim.pending_broadcasts for x in sim.nodes.values()),
                           timeout=60 * period, step=period / 2)
        st = sim.stats.since(s0)
        window = (sim.now - start) / period
        busy_packets += st.packets - idle.packets / idle_periods * window
        busy_messages += st.messages - idle.messages / idle_periods * window
        sim.run_for(period)

    deaths = DeathRecorder()
    sim.observers.append(deaths)
    victim = rng.choice(names)
    killed = sim.now
    sim.crash(victim)
    ok = sim.run_until_true(lambda: len(deaths.seen_by(victim)) == n - 1, timeout=200 * period, step=period / 4)
    detect = max(deaths.seen_by(victim).values()) - killed if ok else float("nan")

    per = n * idle_periods
    return {
        "idle_packets": idle.packets / per,
        "idle_messages": idle.messages / per,
        "update_packets": busy_packets / (n * updates),
        "update_messages": busy_messages / (n * updates),
        "spread_mean": statistics.fmean(spreads),
        "spread_max": max(spreads),
        "rounds_mean": statistics.fmean(spreads) * period / cfg.gossip_interval,
        "detect": detect,
    }


def detection_5(seed: int, runs: int, fault: str) -> list[float]:
    """Seconds from a failure to dead-on-every-member, 5 members, LAN profile. `fault` is
    "crash" (the agent killed, its host refuses) or "power_off" (the host goes silent)."""
    out: list[float] = []
    for r in range(runs):
        sim = Sim(seed=seed * 100_000 + r)
        deaths = DeathRecorder()
        sim.observers.append(deaths)
        sim.add("h0")
        for i in range(1, 5):
            sim.add(f"h{i}", join=["h0"])
        sim.run_for(5 + sim.rng.uniform(0, 2))
        killed = sim.now
        getattr(sim, fault)("h3")
        sim.run_until_true(lambda: len(deaths.seen_by("h3")) == 4, timeout=30, step=0.02)
        out.append(max(deaths.seen_by("h3").values()) - killed)
    return out


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(p / 100 * len(xs)) - 1))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="also N = 10,000 (~8 min, ~3 GB)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--updates", type=int, default=5, help="updates timed per N")
    ap.add_argument("--detect-runs", type=int, default=200, help="5-member failure runs of each kind")
    args = ap.parse_args(argv)
    cfg = Config.lan()
    sizes = [100, 1000] + ([10_000] if args.full else [])
    print(f"T3 gossip load and spread, simulated, LAN profile (probe period {cfg.probe_interval} s, "
          f"gossip round {cfg.gossip_interval} s, fan-out {cfg.gossip_nodes}), seed {args.seed}")
    print(f"{'N':>7} {'retx':>4} {'idle pkt':>8} {'idle msg':>8} {'upd pkt':>8} {'upd msg':>8} "
          f"{'spread p':>8} {'max p':>6} {'rounds':>6} {'p/log10N':>8} {'dead-all s':>10} {'wall s':>6}")
    results = {}
    for n in sizes:
        t0 = time.monotonic()
        r = spread(n, args.seed, args.updates)
        results[n] = r
        print(f"{n:>7} {retransmit_limit(cfg.retransmit_mult, n):>4} {r['idle_packets']:>8.2f} "
              f"{r['idle_messages']:>8.2f} {r['update_packets']:>8.2f} {r['update_messages']:>8.2f} {r['spread_mean']:>8.2f} "
              f"{r['spread_max']:>6.2f} {r['rounds_mean']:>6.1f} {r['spread_mean'] / math.log10(n):>8.2f} "
              f"{r['detect']:>10.2f} {time.monotonic() - t0:>6.1f}", flush=True)
    base = results[sizes[0]]
    for n in sizes[1:]:
        r = results[n]
        print(f"ratio N={n} vs N={sizes[0]}: messages/member/period x{r['idle_messages'] / base['idle_messages']:.2f} "
              f"(flat = 1); extra datagrams/member/update x{r['update_packets'] / base['update_packets']:.2f} and spread "
              f"x{r['spread_mean'] / base['spread_mean']:.2f}, for log10 N x{math.log10(n) / math.log10(sizes[0]):.2f} (O(log N))")
    print("columns: retx = retransmit limit; idle = datagrams and messages each member sends per protocol")
    print("  period (failure detection); upd = extra datagrams and messages per member for one update, over")
    print("  its whole life (gossip rounds; piggybacked copies ride on probes); spread = protocol periods")
    print("  until the update reached every member (mean, max; rounds = gossip rounds); dead-all = seconds")
    print("  from an agent crash (host up) until every member marked it dead.")
    for fault, label in (("crash", "agent crashes, host up"), ("power_off", "silent hosts")):
        if not args.detect_runs:
            break
        t0 = time.monotonic()
        d = detection_5(args.seed, args.detect_runs, fault)
        print(f"T1 (simulated LAN, 5 members, {len(d)} {label}): dead on every member p50 {pct(d, 50):.2f} s, "
              f"p99 {pct(d, 99):.2f} s, min {min(d):.2f} s (memberlist measured: p50 5.8 s, p99 7.8 s -> "
              f"x{5.8 / pct(d, 50):.1f} / x{7.8 / pct(d, 99):.1f}); wall {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
