#!/usr/bin/env python3
"""T1/T2: failure detection of shoal's gossip against HashiCorp memberlist, in netns.

One 5-host cluster in network namespaces (tests/netns.py): h1 the shoal server, h2..h5
shoal clients joined through h1; and, in the same namespaces and the same run, one
memberlist member per host (bench/memberlist/main.go, `memberlist.DefaultLANConfig()`
untouched, port 7946), joined through h1's.

T1 (detection), two kinds of failure, `--kills N` of each (default 5), rotating over the
client hosts h2..h5; each time, the time from the failure to "dead" on *every*
surviving member is taken (the slowest survivor), then the host is brought back and the
next failure waits until every member sees all five alive again. p50/p99 of those
times, for both implementations, and the ratios, per kind:

- agent crash: kill -9 of the member's process while its host (kernel, namespace, link)
  stays up: shoal's agent, then memberlist's node, one at a time. A connection to the
  dead process's port is refused by the host, which shoal's probers ask for.
- silent host: the host's link goes down (its veth in the switch namespace), so nothing
  of it answers, not even a refusal; both implementations see the same failure at once.
  Then both processes on it are killed, the link comes up and both restart, as after a
  reboot.

T2 (calm): `--pauses N` stops both members of a host (SIGSTOP) for `--pause-seconds`
(default 1.5), resumes them, and counts "dead" declarations about it (rotating h2..h5).
`--loss 10,20,30 --seconds S` puts P % loss on every host's link (both directions: two
lossy links per path, so 10 % per link is ~19 % end to end) for S seconds, both
implementations at once, and counts false "dead" declarations (observer, member pairs)
during the window and a short settle after it.

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
    python bench/gossip_detect.py [--kills N] [--kinds crash,silent] [--pauses N [--pause-seconds S]]
                                  [--loss 10,20,30 --seconds S] [--only shoal|memberlist]
The default run (5 failures of each kind, no pause or loss phase) takes about three
minutes; `--kills 0 --pauses 5 --loss 10,20,30 --seconds 60` is the calm check alone.
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

    def signal(self, sig: signal.Signals) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)
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
        wait(lambda: self.all_dead(victim, t0), DEADLINE, f"every memberlist node to declare {victim} dead")
        times = self.dead_times(victim, t0)
        self.start(victim)
        self.wait_all_alive()
        return times

    def all_dead(self, victim: str, since: float) -> bool:
        return all(n.dead_at(victim, since) is not None for name, n in self.nodes.items() if name != victim)

    def dead_times(self, victim: str, since: float) -> list[float]:
        return [n.dead_at(victim, since) - since for name, n in self.nodes.items() if name != victim]  # type: ignore[operator]

    def deaths_of(self, victim: str, since: float, until: float) -> list[tuple[str, float]]:
        """(observer, time) of every declaration that `victim` is dead in the window."""
        return [(obs, t) for obs, node in self.nodes.items() for n, t in node.deaths(since, until) if n == victim]

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


def shoal_all_dead(c: NetnsCluster, victim: str, since: float) -> bool:
    return all(shoal_dead_at(c, h, victim, since) is not None for h in c.hosts if h.name != victim)


def shoal_dead_times(c: NetnsCluster, victim: str, since: float) -> list[float]:
    return [shoal_dead_at(c, h, victim, since) - since for h in c.hosts if h.name != victim]  # type: ignore[operator]


def shoal_kill_and_measure(c: NetnsCluster, victim: str) -> list[float]:
    t0 = time.time()
    c.kill9(victim)
    wait(lambda: shoal_all_dead(c, victim, t0), DEADLINE, f"every shoal agent to declare {victim} dead", interval=0.1)
    times = shoal_dead_times(c, victim, t0)
    c.restart(victim)
    wait(lambda: shoal_all_alive(c), DEADLINE, "every shoal agent to see all alive", interval=0.1)
    return times


# -- both at once ------------------------------------------------------------------------------


def set_link(c: NetnsCluster, host: str, up: bool) -> None:
    """The host's cable: its veth end in the switch namespace, up or down."""
    subprocess.run(["ip", "-n", c.switch, "link", "set", c.host(host).name, "up" if up else "down"],
                   check=True, timeout=15)


def silent_and_measure(c: NetnsCluster, ml: Memberlist | None, victim: str,
                       do_shoal: bool) -> tuple[list[float], list[float]]:
    """Take `victim`'s link down; time until every survivor of each implementation has
    declared it dead; then bring the host back as after a reboot."""
    t0 = time.time()
    set_link(c, victim, False)
    try:
        wait(lambda: (not do_shoal or shoal_all_dead(c, victim, t0)) and (ml is None or ml.all_dead(victim, t0)),
             DEADLINE, f"every member to declare {victim} dead", interval=0.1)
        s = shoal_dead_times(c, victim, t0) if do_shoal else []
        m = ml.dead_times(victim, t0) if ml is not None else []
    finally:
        if do_shoal:
            c.kill9(victim)
        if ml is not None:
            ml.nodes[victim].kill9()
        set_link(c, victim, True)
    if do_shoal:
        c.restart(victim)
    if ml is not None:
        ml.start(victim)
        ml.wait_all_alive()
    if do_shoal:
        wait(lambda: shoal_all_alive(c), DEADLINE, "every shoal agent to see all alive", interval=0.1)
    return s, m


def pause_and_count(c: NetnsCluster, ml: Memberlist | None, victim: str, seconds: float,
                    do_shoal: bool) -> tuple[int, int, int, float]:
    """SIGSTOP both members on `victim` for `seconds`, SIGCONT, settle; the "dead"
    declarations about it (shoal, memberlist), shoal's suspicions of it (memberlist does
    not report its own) and how long the pause really was."""
    since = time.time()
    agent = c.host(victim).proc
    assert agent is not None

    def both(sig: signal.Signals) -> None:
        # Both signals first, back to back; the harness's checks (which wait) after.
        if do_shoal:
            os.killpg(agent.pid, sig)
        if ml is not None:
            ml.nodes[victim].signal(sig)

    both(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        if do_shoal:
            c.stop(victim)  # returns once every thread has stopped
        time.sleep(max(0.0, seconds - (time.monotonic() - stopped)))  # the scenario: a stopped process
    finally:
        both(signal.SIGCONT)
        paused = time.monotonic() - stopped
        if do_shoal:
            c.cont(victim)
    ok = (not do_shoal or _settle(lambda: shoal_all_alive(c))) and (ml is None or _settle(ml.all_alive))
    if not ok:
        print(f"  [{victim} not back alive everywhere within {DEADLINE:g} s]", flush=True)
    until = time.time()
    about = [e for e in gossip_logs.events(c, since=since, kinds=("dead", "suspect"))
             if e.time <= until and e.name == victim]
    md = ml.deaths_of(victim, since, until) if ml is not None else []
    return sum(e.kind == "dead" for e in about), len(md), sum(e.kind == "suspect" for e in about), paused


# -- the run -------------------------------------------------------------------------------------


KINDS = {
    "crash": "agent crash (kill -9, host up)",
    "silent": "silent host (link down)",
}


def report_kills(label: str, per_kill: list[list[float]]) -> tuple[float, float]:
    slowest = [max(t) for t in per_kill]
    every = [x for t in per_kill for x in t]
    p50, p99 = pct(slowest, 50), pct(slowest, 99)
    print(f"    {label:<11} failure -> dead on every member: p50 {p50:5.2f} s  p99 {p99:5.2f} s   "
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
        results: dict[tuple[str, str], list[list[float]]] = {
            (k, impl): [] for k in KINDS for impl in ("shoal", "memberlist")
        }
        for i in range(args.kills):
            victim = victims[i % len(victims)]
            if "crash" in args.kinds:
                if do_shoal:
                    t = shoal_kill_and_measure(cluster, victim)
                    results["crash", "shoal"].append(t)
                    print(f"  crash  {i + 1}/{args.kills} {victim}: shoal      slowest {max(t):.2f} s", flush=True)
                if ml is not None:
                    t = ml.kill_and_measure(victim)
                    results["crash", "memberlist"].append(t)
                    print(f"  crash  {i + 1}/{args.kills} {victim}: memberlist slowest {max(t):.2f} s", flush=True)
            if "silent" in args.kinds:
                ts, tm = silent_and_measure(cluster, ml, victim, do_shoal)
                if do_shoal:
                    results["silent", "shoal"].append(ts)
                if ml is not None:
                    results["silent", "memberlist"].append(tm)
                print(f"  silent {i + 1}/{args.kills} {victim}: "
                      + ", ".join(f"{name} slowest {max(t):.2f} s" for name, t in (("shoal", ts), ("memberlist", tm)) if t),
                      flush=True)

        if args.kills:
            print(f"\nT1: detection, {args.hosts} hosts, {args.kills} failures of each kind "
                  f"(target shoal p50 <= 1.5 s, p99 <= 3 s, >= 3x faster than memberlist)")
        for kind in KINDS:
            if kind not in args.kinds or not args.kills:
                continue
            print(f"  {KINDS[kind]}:")
            s = report_kills("shoal", results[kind, "shoal"]) if do_shoal else None
            m = report_kills("memberlist", results[kind, "memberlist"]) if ml is not None else None
            if s and m:
                print(f"    ratio (memberlist / shoal): p50 {m[0] / s[0]:.1f}x  p99 {m[1] / s[1]:.1f}x")

        if args.pauses:
            print(f"\nT2: {args.pause_seconds:g} s pauses (SIGSTOP), {args.pauses} of them "
                  f"(target: never declared dead)", flush=True)
            dead_s = dead_m = 0
            for i in range(args.pauses):
                victim = victims[i % len(victims)]
                ns, nm, sus, paused = pause_and_count(cluster, ml, victim, args.pause_seconds, do_shoal)
                dead_s, dead_m = dead_s + ns, dead_m + nm
                print(f"  pause {i + 1}/{args.pauses} {victim} ({paused:.2f} s): "
                      + ", ".join(f"{name} {n} dead" + (f" ({sus} suspicions)" if name == "shoal" else "")
                                  for name, n, on in (("shoal", ns, do_shoal), ("memberlist", nm, ml is not None))
                                  if on),
                      flush=True)
            print("  total: " + ", ".join(f"{name} {n} false dead" for name, n, on in (
                ("shoal", dead_s, do_shoal), ("memberlist", dead_m, ml is not None)) if on))

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
    ap.add_argument("--kills", type=int, default=5,
                    help="failures of each kind per implementation (default 5; 0: no detection phase)")
    ap.add_argument("--kinds", type=lambda v: [k for k in v.split(",") if k], default=list(KINDS),
                    help="comma-separated failure kinds: crash (kill -9, host up), silent (link down); default both")
    ap.add_argument("--pauses", type=int, default=0, help="SIGSTOP pauses of a host's members (default 0)")
    ap.add_argument("--pause-seconds", type=float, default=1.5, help="length of each pause (default 1.5)")
    ap.add_argument("--hosts", type=int, default=5)
    ap.add_argument("--loss", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                    help="comma-separated loss percentages per link, e.g. 10,20,30 (default: no loss phase)")
    ap.add_argument("--seconds", type=float, default=60.0, help="duration of each loss level (default 60)")
    ap.add_argument("--only", choices=["shoal", "memberlist"], default="")
    args = ap.parse_args(argv)
    if args.hosts < 3:
        ap.error("--hosts must be at least 3")
    if unknown := set(args.kinds) - set(KINDS):
        ap.error(f"unknown failure kind(s) {sorted(unknown)}: choose from {sorted(KINDS)}")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
