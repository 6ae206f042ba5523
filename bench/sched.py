"""T6: the scheduler core's speed and packing quality, with its anchors in the same run.

    python bench/sched.py            # 1,000 nodes, 50,000 replicas (< 60 s)
    python bench/sched.py --full     # 10,000 nodes, 1,000,000 replicas (T6)

What it does
1. Builds a cluster of identical nodes (16 CPUs, 64 GiB) and a batch of deployments of
   1-200 replicas each, whose shapes are drawn from a catalogue of CPU-heavy, memory-
   heavy and balanced requests scaled so the batch fills about 70 % of the cluster's CPU
   and 65 % of its memory (room to spare, so the node count binpack needs is what is
   measured). Every replica publishes a port.
2. Times one `Scheduler.schedule` call over the whole batch (binpack, default config):
   placements per second, against the T6 target of 20,000/s and Nomad's C1M figure
   (1 M containers on 5 k hosts in under 5 minutes, about 3,750/s end to end).
3. Counts the nodes binpack used against the lower bound ceil(sum of requests /
   node capacity), taken in the tighter of CPU and memory (T6: <= 1.05 x).
4. On a smaller sub-problem of the same shape (exhaustive search is O(nodes) per
   replica), runs an exhaustive best fit (every node scored with the same binpack
   formula, exact argmax, no sampling, no colocation penalty), both in the order the
   scheduler places (one replica per deployment per round) and in request order, and
   the shoal scheduler twice: forced to scan every node and forced to sample
   (`sample_threshold=0`); prints node counts and ratios.

Everything is seeded (`--seed`), so two runs print the same node counts.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from shoal.leader.scheduler import (
    NodeInfo,
    Plan,
    PlacementRequest,
    Scheduler,
    SchedulerConfig,
    binpack_score,
)
from shoal.model import Resources

MI = 1 << 20
GI = 1 << 30
NODE_CPU = 16_000
NODE_MEM = 64 * GI
TARGET_RATE = 20_000.0
NOMAD_C1M_RATE = 3_750.0  # C1M: 1 M containers on 5 k hosts in < 5 min, end to end
TARGET_RATIO = 1.05
FILL_CPU = 0.70
FILL_MEM = 0.65

# (cpu millis, memory MiB) before scaling: balanced, CPU-heavy and memory-heavy shapes.
CATALOGUE: tuple[tuple[int, int], ...] = (
    (100, 128),
    (100, 256),
    (250, 256),
    (250, 512),
    (500, 512),
    (500, 1024),
    (1000, 1024),
    (1000, 2048),
    (100, 1024),
    (250, 2048),
    (1000, 256),
    (2000, 4096),
)


@dataclass(frozen=True, slots=True)
class Workload:
    nodes: tuple[NodeInfo, ...]
    requests: tuple[PlacementRequest, ...]


def make_workload(nodes: int, replicas: int, seed: int) -> Workload:
    """Identical nodes and a batch of deployments filling FILL_CPU / FILL_MEM of them."""
    rng = random.Random(seed)
    mean_cpu = sum(c for c, _ in CATALOGUE) / len(CATALOGUE)
    mean_mem = sum(m for _, m in CATALOGUE) / len(CATALOGUE) * MI
    scale_cpu = FILL_CPU * NODE_CPU * nodes / replicas / mean_cpu
    scale_mem = FILL_MEM * NODE_MEM * nodes / replicas / mean_mem
    node_list = tuple(
        NodeInfo(
            name=f"node-{i:05d}",
            capacity=Resources(cpu_millis=NODE_CPU, memory_bytes=NODE_MEM),
            allocated=Resources(cpu_millis=0, memory_bytes=0),
        )
        for i in range(nodes)
    )
    reqs: list[PlacementRequest] = []
    dep = 0
    while len(reqs) < replicas:
        count = min(rng.randint(1, 200), replicas - len(reqs))
        c, m = rng.choice(CATALOGUE)
        res = Resources(
            cpu_millis=max(5, round(c * scale_cpu / 5) * 5),
            memory_bytes=max(1, round(m * scale_mem)) * MI,
        )
        name = f"dep-{dep:05d}"
        reqs.extend(
            PlacementRequest(replica_id=f"{name}-{k}", deployment=name, requests=res)
            for k in range(count)
        )
        dep += 1
    return Workload(nodes=node_list, requests=tuple(reqs))


def lower_bound(work: Workload) -> int:
    """ceil(sum of requests / node capacity) in the tighter dimension (nodes identical)."""
    cpu = sum(r.requests.cpu_millis or 0 for r in work.requests)
    mem = sum(r.requests.memory_bytes or 0 for r in work.requests)
    return max(math.ceil(cpu / NODE_CPU), math.ceil(mem / NODE_MEM))


def nodes_used(plan: Plan) -> int:
    return len({a.node for a in plan.assignments})


def check_plan(work: Workload, plan: Plan) -> None:
    """No node overcommitted, no host port handed out twice on a node."""
    req = {r.replica_id: r for r in work.requests}
    cpu: dict[str, int] = {}
    mem: dict[str, int] = {}
    ports: set[tuple[str, int | None]] = set()
    for a in plan.assignments:
        r = req[a.replica_id].requests
        cpu[a.node] = cpu.get(a.node, 0) + (r.cpu_millis or 0)
        mem[a.node] = mem.get(a.node, 0) + (r.memory_bytes or 0)
        key = (a.node, a.host_port)
        if key in ports:
            raise AssertionError(f"port {a.host_port} used twice on {a.node}")
        ports.add(key)
    if any(v > NODE_CPU for v in cpu.values()) or any(v > NODE_MEM for v in mem.values()):
        raise AssertionError("a node is overcommitted")


def interleaved(requests: Sequence[PlacementRequest]) -> list[PlacementRequest]:
    """The order the scheduler places in: one replica of each deployment per round."""
    rounds: list[list[PlacementRequest]] = []
    seen: dict[str, int] = {}
    for r in requests:
        nth = seen.get(r.deployment, 0)
        seen[r.deployment] = nth + 1
        if nth == len(rounds):
            rounds.append([])
        rounds[nth].append(r)
    return [r for rnd in rounds for r in rnd]


def exhaustive_best_fit(nodes: int, requests: Sequence[PlacementRequest]) -> tuple[int, int]:
    """Best fit by exhaustive search: every node scored for every replica with the same
    binpack formula, the exact argmax taken (first index on ties), no sampling and no
    colocation penalty. Returns (nodes used, replicas unplaced)."""
    free_cpu = [NODE_CPU] * nodes
    free_mem = [NODE_MEM] * nodes
    unplaced = 0
    for r in requests:
        c = r.requests.cpu_millis or 0
        m = r.requests.memory_bytes or 0
        best, best_i = -1.0, -1
        for i in range(nodes):
            fc = free_cpu[i] - c
            fm = free_mem[i] - m
            if fc < 0 or fm < 0:
                continue
            s = binpack_score(fc / NODE_CPU, fm / NODE_MEM)
            if s > best:
                best, best_i = s, i
        if best_i < 0:
            unplaced += 1
            continue
        free_cpu[best_i] -= c
        free_mem[best_i] -= m
    used = sum(1 for i in range(nodes) if free_cpu[i] < NODE_CPU or free_mem[i] < NODE_MEM)
    return used, unplaced


def run_scheduler(work: Workload, config: SchedulerConfig, seed: int) -> tuple[Plan, float]:
    sched = Scheduler(config, random.Random(seed))
    t0 = time.perf_counter()
    plan = sched.schedule(work.nodes, work.requests)
    return plan, time.perf_counter() - t0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--full", action="store_true", help="10,000 nodes, 1,000,000 replicas (T6)")
    ap.add_argument("--nodes", type=int, default=None)
    ap.add_argument("--replicas", type=int, default=None)
    ap.add_argument("--sub-nodes", type=int, help="nodes in the exhaustive sub-problem")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sample-size", type=int, help="override SchedulerConfig.sample_size")
    args = ap.parse_args(argv)

    nodes = args.nodes or (10_000 if args.full else 1_000)
    replicas = args.replicas or (1_000_000 if args.full else 50_000)
    sub_nodes = args.sub_nodes or (300 if args.full else 150)
    config = SchedulerConfig()
    if args.sample_size is not None:
        config = replace(config, sample_size=args.sample_size, sample_probes=4 * args.sample_size)
    per_node = replicas / nodes

    print(f"scheduler core: {nodes:,} nodes x {replicas:,} replicas, seed {args.seed}, "
          f"sample_size {config.sample_size}, threshold {config.sample_threshold}")
    work = make_workload(nodes, replicas, args.seed)
    plan, secs = run_scheduler(work, config, args.seed)
    check_plan(work, plan)
    rate = len(work.requests) / secs
    used = nodes_used(plan)
    lb = lower_bound(work)
    print(f"  placements/s       {rate:12,.0f}   ({secs:.1f} s; target {TARGET_RATE:,.0f}/s: "
          f"{rate / TARGET_RATE:.2f}x; Nomad C1M ~{NOMAD_C1M_RATE:,.0f}/s: "
          f"{rate / NOMAD_C1M_RATE:.1f}x)")
    print(f"  unplaced           {len(plan.unplaced):12,}")
    print(f"  nodes used         {used:12,}   lower bound ceil(sum/capacity) {lb:,}: "
          f"ratio {used / lb:.3f} (target <= {TARGET_RATIO})")

    sub = make_workload(sub_nodes, round(sub_nodes * per_node), args.seed + 1)
    sub_lb = lower_bound(sub)
    t0 = time.perf_counter()
    ex_used, ex_unplaced = exhaustive_best_fit(sub_nodes, interleaved(sub.requests))
    ex_secs = time.perf_counter() - t0
    t0 = time.perf_counter()
    exr_used, exr_unplaced = exhaustive_best_fit(sub_nodes, sub.requests)
    exr_secs = time.perf_counter() - t0
    scan_cfg = replace(config, sample_threshold=sub_nodes)
    scan_plan, scan_secs = run_scheduler(sub, scan_cfg, args.seed)
    samp_plan, samp_secs = run_scheduler(sub, replace(config, sample_threshold=0), args.seed)
    check_plan(sub, scan_plan)
    check_plan(sub, samp_plan)
    print(f"sub-problem: {sub_nodes:,} nodes x {len(sub.requests):,} replicas, "
          f"lower bound {sub_lb:,} nodes")
    rows = (
        ("exhaustive, interleaved", ex_used, ex_unplaced, ex_secs),
        ("exhaustive, request order", exr_used, exr_unplaced, exr_secs),
        ("shoal, full scan", nodes_used(scan_plan), len(scan_plan.unplaced), scan_secs),
        ("shoal, sampling", nodes_used(samp_plan), len(samp_plan.unplaced), samp_secs),
    )
    for name, u, unp, s in rows:
        print(f"  {name:26s} nodes {u:6,}  unplaced {unp:5,}  vs bound {u / sub_lb:.3f}  "
              f"vs exhaustive {u / ex_used:.3f}  {len(sub.requests) / s:9,.0f} placements/s")
    ok = rate >= TARGET_RATE and used / lb <= TARGET_RATIO and not plan.unplaced
    print(f"T6 {'met' if ok else 'NOT met'}: {rate:,.0f} placements/s, "
          f"{used / lb:.3f} x lower bound")
    return 0


if __name__ == "__main__":
    sys.exit(main())
