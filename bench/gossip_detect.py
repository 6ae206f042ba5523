#!/usr/bin/env python3
"""T1/T2: failure detection of shoal's gossip against HashiCorp memberlist, in netns.

One 5-host cluster in network namespaces (tests/netns.py): h1 the shoal server, h2..h5
shoal clients joined through h1; and, in the same namespaces and the same run, one
memberlist member per host (bench/memberlist/main.go, `memberlist.DefaultLANConfig()`
untouched, port 7946), joined through h1's.

T1 (detection): `--kills N` times (default 5), a client host's member is killed with
kill -9 (shoal's agent, then memberlist's node, one at a time, rotating h2..h5); the
time from the kill to "dead" on *every* surviving member is taken (the slowest
survivor), then the victim is restarted and the next kill waits until every member sees
all five alive again. p50/p99 of those times, for both, and the ratios.

T2 (calm): `--loss 10,20,30 --seconds S` puts P % loss on every host's link (both
directions: two lossy links per path, so 10 % per link is ~19 % end to end) for S
seconds, both implementations at once, and counts false "dead" declarations (observer,
member pairs) during the window and a short settle after it.

How each member's view is observed, without adding anything to the product:
- shoal: every agent logs each change it sees (`event=gossip.member_dead node=<observer>
  name=<member>` with a microsecond UTC timestamp) to its host's log file; the bench
  parses those logs (tests/gossip_logs.py). The server's API is not used: client agents
  have none, and the logs give every member's view with the agent's own timestamps.
- memberlist: the Go program prints `DEAD <name> <unix-nanos>` on NotifyLeave (and JOIN
  on NotifyJoin); the bench reads each node's stdout.
Both timestamps and the kill time come from the same system clock.

The memberlist program is built offline against Debian's packaged sources
(golang-github-hashicorp-memberlist-dev, GOPATH mode) into build/bin/memberlist-node.

Usage (root, from the repository root):
    python bench/gossip_detect.py [--kills N] [--loss 10,20,30 --seconds S] [--only shoal|memberlist]
The default run (5 kills each, no loss phase) takes about two minutes.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import gossip_logs  # noqa: E402
from tests.netns import NetnsCluster  # noqa: E402

ML_PORT = 7946
ML_SRC = ROOT / "bench" / "memberlist"
ML_BIN = ROOT / "build" / "bin" / "memberlist-node"
GOPATH = "/usr/share/gocode"
DEADLINE = 60.0  # no detection or recovery takes this long unless something is broken


def build_memberlist() -> pathlib.Path:
    src = ML_SRC / "main.go"
    if ML_BIN.exists() and ML_BIN.stat().st_mtime >= src.stat().st_mtime:
        return ML_BIN
    if not (pathlib.Path(GOPATH) / "src/github.com/hashicorp/memberlist").is_dir():
        sys.exit(f"memberlist sources missing under {GOPATH}: apt-get install golang-github-hashicorp-memberlist-dev")
    ML_BIN.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, GO111MODULE="off", GOPATH=GOPATH, GOCACHE=str(ROOT / "build" / "go" / "cache"))
    subprocess.run(["go", "build", "-o", str(ML_BIN), "."], cwd=ML_SRC, env=env, check=True, timeout=600)
    return ML_BIN


def wait(fn: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (with 5 samples, p99 is the largest)."""
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


# -- memberlist nodes ---------------------------------------------------------------------------


class MlNode:
    """One memberlist-node process in a host's namespace; its events, as read from stdout."""

    def __init__(self, cluster: NetnsCluster, host: str, binary: pathlib.Path, seed: str | None) -> None:
        h = cluster.host(host)
        self.name = h.name
        argv = [str(binary), "-name", h.name, "-bind", h.address, "-port", str(ML_PORT)]
        if seed:
            argv += ["-join", f"{seed}:{ML_PORT}"]
        self.log = open(cluster.root / f"{h.name}.memberlist.log", "ab")
        self.proc = cluster.popen(h, *argv, stdout=subprocess.PIPE, stderr=self.log)
        self.events: list[tuple[str, str, float]] = []  # (kind, name, unix seconds)
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            parts = raw.decode(errors="replace").split()
            if len(parts) == 3:
                with self.lock:
                    self.events.append((parts[0], parts[1], int(parts[2]) / 1e9))

    def view(self) -> dict[str, str]:
        state: dict[str, str] = {}
        with self.lock:
            for kind, name, _ in self.events:
                if kind in ("JOIN", "DEAD"):
                    state[name] = "alive" if kind == "JOIN" else "dead"
        state.pop(self.name, None)
        return state

    def dead_at(self, name: str, since: float) -> float | None:
        with self.lock:
            return next((t for k, n, t in self.events if k == "DEAD" and n == name and t >= since), None)

    def deaths(self, since: float, until: float) -> list[tuple[str, float]]:
        with self.lock:
            return [(n, t) for k, n, t in self.events if k == "DEAD" and since <= t <= until]

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.thread.join(timeout=5)
        self.log.close()


class Memberlist:
    def __init__(self, cluster: NetnsCluster, binary: pathlib.Path) -> None:
        self.cluster = cluster
        self.binary = binary
        self.seed = cluster.server.address
        self.nodes: dict[str, MlNode] = {}

    def start(self, name: str) -> None:
        seed = None if name == self.cluster.server.name else self.seed
        self.nodes[name] = MlNode(self.cluster, name, self.binary, seed)

    def start_all(self) -> None:
        first = self.cluster.server.name
        self.start(first)
        wait(lambda: any(k == "READY" for k, _, _ in self.nodes[first].events), 10, "memberlist seed READY")
        for h in self.cluster.hosts[1:]:
            self.start(h.name)
        self.wait_all_alive()

    def all_alive(self) -> bool:
        names = {h.name for h in self.cluster.hosts}
        return all(
            {n for n, st in node.view().items() if st == "alive"} == names - {obs}
            for obs, node in self.nodes.items()
        ) and set(self.nodes) == names

    def wait_all_alive(self) -> None:
        wait(self.all_alive, DEADLINE, "every memberlist node to see all alive", interval=0.1)

    def kill_and_measure(self, victim: str) -> list[float]:
        t0 = time.time()
        self.nodes[victim].kill9()
        survivors = [n for name, n in self.nodes.items() if name != victim]
        wait(lambda: all(n.dead_at(victim, t0) is not None for n in survivors), DEADLINE,
             f"every memberlist node to declare {victim} dead")
        times = [n.dead_at(victim, t0) - t0 for n in survivors]  # type: ignore[operator]
        self.start(victim)
        self.wait_all_alive()
        return times

    def close(self) -> None:
        for n in self.nodes.values():
            n.kill9()


# -- shoal -------------------------------------------------------------------------------------


def shoal_all_alive(c: NetnsCluster) -> bool:
    names = {h.name for h in c.hosts}
    return all({n for n, (st, _) in v.items() if st == "alive"} == names - {obs}
               for obs, v in gossip_logs.views(c).items())


def shoal_dead_at(c: NetnsCluster, observer: Any, victim: str, since: float) -> float | None:
    text = gossip_logs.current_run(c.log(observer))
    return next((e.time for e in gossip_logs.member_events(text)
                 if e.kind == "dead" and e.name == victim and e.time >= since), None)


def shoal_kill_and_measure(c: NetnsCluster, victim: str) -> list[float]:
    survivors = [h for h in c.hosts if h.name != victim]
    t0 = time.time()
    c.kill9(victim)
    wait(lambda: all(shoal_dead_at(c, h, victim, t0) is not None for h in survivors), DEADLINE,
         f"every shoal agent to declare {victim} dead", interval=0.1)
    times = [shoal_dead_at(c, h, victim, t0) - t0 for h in survivors]  # type: ignore[operator]
    c.restart(victim)
    wait(lambda: shoal_all_alive(c), DEADLINE, "every shoal agent to see all alive", interval=0.1)
    return times


# -- the run -------------------------------------------------------------------------------------


def report_kills(label: str, per_kill: list[list[float]]) -> tuple[float, float]:
    slowest = [max(t) for t in per_kill]
    every = [x for t in per_kill for x in t]
    p50, p99 = pct(slowest, 50), pct(slowest, 99)
    print(f"  {label:<11} kill -> dead on every member: p50 {p50:5.2f} s  p99 {p99:5.2f} s   "
          f"(per member: p50 {pct(every, 50):.2f} s, max {max(every):.2f} s; "
          f"runs: {', '.join(f'{x:.2f}' for x in slowest)})")
    return p50, p99


def run(args: argparse.Namespace) -> int:
    do_shoal = args.only in ("", "shoal")
    do_ml = args.only in ("", "memberlist")
    binary = build_memberlist() if do_ml else None
    t_start = time.monotonic()
    cluster = NetnsCluster(args.hosts)
    ml: Memberlist | None = None
    try:
        cluster.up(timeout=60)
        print(f"cluster {cluster.prefix}: {args.hosts} hosts up in {time.monotonic() - t_start:.1f} s "
              f"(logs under {cluster.root})", flush=True)
        wait(lambda: shoal_all_alive(cluster), DEADLINE, "every shoal agent to see all alive", interval=0.1)
        if do_ml:
            assert binary is not None
            ml = Memberlist(cluster, binary)
            ml.start_all()
            print("memberlist: all members alive everywhere", flush=True)
        victims = [h.name for h in cluster.hosts[1:]]
        results: dict[str, list[list[float]]] = {"shoal": [], "memberlist": []}
        for i in range(args.kills):
            victim = victims[i % len(victims)]
            if do_shoal:
                t = shoal_kill_and_measure(cluster, victim)
                results["shoal"].append(t)
                print(f"  kill {i + 1}/{args.kills} {victim}: shoal      slowest {max(t):.2f} s", flush=True)
            if ml is not None:
                t = ml.kill_and_measure(victim)
                results["memberlist"].append(t)
                print(f"  kill {i + 1}/{args.kills} {victim}: memberlist slowest {max(t):.2f} s", flush=True)

        print(f"\nT1: detection, {args.hosts} hosts, {args.kills} kills each "
              f"(target shoal p50 <= 1.5 s, p99 <= 3 s, >= 3x faster than memberlist)")
        s = report_kills("shoal", results["shoal"]) if do_shoal else None
        m = report_kills("memberlist", results["memberlist"]) if ml is not None else None
        if s and m:
            print(f"  ratio (memberlist / shoal): p50 {m[0] / s[0]:.1f}x  p99 {m[1] / s[1]:.1f}x")

        if args.loss:
            print(f"\nT2: false dead under loss, {args.seconds:g} s per level, every link, both directions "
                  f"(target 0 for shoal at 10 and 20 %, fewer than memberlist at 30 %)")
            for p in args.loss:
                since = time.time()
                for h in cluster.hosts:
                    cluster.loss(h, p)
                try:
                    time.sleep(args.seconds)  # the scenario: S seconds of loss
                finally:
                    for h in cluster.hosts:
                        cluster.loss(h, 0)
                # Deaths already under way when the loss stops still count: settle first.
                ok_s = _settle(lambda: shoal_all_alive(cluster))
                ok_m = _settle(ml.all_alive) if ml is not None else True
                until = time.time()
                sd = [e for e in gossip_logs.events(cluster, since=since, kinds=("dead",)) if e.time <= until]
                md = [(obs, n, t) for obs, node in (ml.nodes.items() if ml else []) for n, t in node.deaths(since, until)]
                print(f"  {p:>3} % per link (~{100 - (100 - p) ** 2 / 100:.0f} % end to end): "
                      f"shoal {len(sd)} false dead ({len({e.name for e in sd})} members)"
                      + (f", memberlist {len(md)} false dead ({len({n for _, n, _ in md})} members)" if ml else "")
                      + ("" if ok_s and ok_m else "  [not all back alive within the deadline]"), flush=True)
        print(f"\ntotal {time.monotonic() - t_start:.0f} s")
        return 0
    finally:
        if ml is not None:
            ml.close()
        cluster.close()


def _settle(fn: Callable[[], bool]) -> bool:
    try:
        wait(fn, DEADLINE, "recovery", interval=0.2)
    except TimeoutError:
        return False
    time.sleep(3.0)  # an observation window: a death under way shows up within it
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=5, help="kills per implementation (default 5)")
    ap.add_argument("--hosts", type=int, default=5)
    ap.add_argument("--loss", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                    help="comma-separated loss percentages per link, e.g. 10,20,30 (default: no loss phase)")
    ap.add_argument("--seconds", type=float, default=60.0, help="duration of each loss level (default 60)")
    ap.add_argument("--only", choices=["shoal", "memberlist"], default="")
    args = ap.parse_args(argv)
    if args.hosts < 3:
        ap.error("--hosts must be at least 3")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
