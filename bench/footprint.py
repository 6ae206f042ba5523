#!/usr/bin/env python3
"""T9: the idle footprint of a client agent and a server agent — resident memory and CPU.

Shape: one server agent (`shoal agent --server`, a cluster of one with the LAN gossip
timings a real server has; `--dev-server` runs `shoal agent --dev`, whose faster local
gossip profile costs more CPU) and one client agent (`shoal agent
--join 127.0.0.1:<server gossip port>`), both on loopback with their own ports, data
directories and node names, default drivers and metrics on (as on a real host), nothing
deployed and nothing scraping them. Once the client's node is Ready on the server, both
settle for `--settle` seconds (start-up work and the first push-pull syncs are not idle
time), then every second for `--seconds` (default 60) this reads each agent's VmRSS from
/proc/PID/status and its utime + stime from /proc/PID/stat (children included, should an
agent have any). CPU is the CPU time used over the window divided by its length: the
share of one core.

Prints, per agent, RSS at the start and end of the window (and how much of it is mapped
files: shared libraries), its maximum, and CPU, against T9 (and the host's load average
before and after the window: CPU shares are only comparable at a similar load):
client <= 60 MB RSS and <= 1 % of a core; server <= 120 MB, with MB read as MiB
(1,048,576 bytes, what VmRSS and `ps` count in). Everything it starts is stopped
(SIGTERM, then SIGKILL after 15 s) and its data directories removed.

    python bench/footprint.py                  # 60 s window
    python bench/footprint.py --seconds 300
    python bench/footprint.py --driver process   # without Docker's SDK in the agents
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from procs import cpu_seconds, free_port, process_tree, stop_process  # noqa: E402 - bench/ is sys.path[0]

ROOT = pathlib.Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
CLIENT_RSS_MIB, CLIENT_CPU_PERCENT, SERVER_RSS_MIB = 60, 1.0, 120


def rss_bytes(pids: list[int]) -> tuple[int, int]:
    """VmRSS and its file-backed part (RssFile: shared libraries and other mapped files)."""
    total = files = 0
    for pid in pids:
        try:
            for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                elif line.startswith("RssFile:"):
                    files += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total, files


@dataclass
class Agent:
    role: str  # "server" or "client"
    args: list[str]
    data_dir: pathlib.Path
    grpc_port: int = field(default_factory=free_port)
    gossip_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def node(self) -> str:
        return f"footprint-{self.role}-{os.getpid()}"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True)
        log = open(self.data_dir.parent / f"{self.role}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shoal", "agent", *self.args, "--data-dir", str(self.data_dir),
             "--grpc-port", str(self.grpc_port), "--gossip-port", str(self.gossip_port),
             "--metrics-port", str(self.metrics_port), "--node-name", self.node],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT)
        log.close()

    def log(self) -> str:
        path = self.data_dir.parent / f"{self.role}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise SystemExit(f"the {self.role} agent exited with status {self.proc.returncode}:\n{self.log()}")

    def stop(self) -> None:
        stop_process(self.proc, 15)


def ready_nodes(server: Agent) -> set[str]:
    """Names of the nodes the server reports Ready (empty while it cannot answer)."""
    r = subprocess.run([sys.executable, "-m", "shoal", "get", "nodes", "-o", "json"], capture_output=True, text=True,
                       env={**os.environ, "SHOAL_ADDR": f"127.0.0.1:{server.grpc_port}"}, cwd=ROOT, timeout=30)
    if r.returncode != 0 or not r.stdout.strip():
        return set()
    try:
        data = json.loads(r.stdout)
    except ValueError:
        return set()
    items = data.get("items", [data])  # one node prints as the object itself
    return {str(n.get("name")) for n in items if n.get("status") == "Ready"}


def wait_ready(server: Agent, client: Agent, timeout: float) -> float:
    t0 = time.monotonic()
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        server.check_alive()
        client.check_alive()
        if {server.node, client.node} <= ready_nodes(server):
            return time.monotonic() - t0
        time.sleep(0.5)
    raise SystemExit(f"the client did not turn Ready on the server within {timeout:g} s\n"
                     f"server log:\n{server.log()}\nclient log:\n{client.log()}")


@dataclass
class Sample:
    rss_start: int = 0  # the window's first second: with rss_end, the trend
    rss_end: int = 0
    rss_file_end: int = 0  # of rss_end, mapped files (libpython, grpc's core, ...)
    rss_max: int = 0
    cpu: float = 0.0  # share of one core, 0-1


def measure(agents: list[Agent], seconds: int) -> dict[str, Sample]:
    pids = {a.role: process_tree(a.proc.pid) for a in agents if a.proc is not None}
    out = {role: Sample() for role in pids}
    t0 = time.monotonic()
    cpu0 = {role: cpu_seconds(p) for role, p in pids.items()}
    for _ in range(seconds):
        time.sleep(max(0.0, t0 + _ + 1 - time.monotonic()))
        for a in agents:
            a.check_alive()
        for role, p in pids.items():
            rss, files = rss_bytes(p)
            out[role].rss_file_end = files
            out[role].rss_start = out[role].rss_start or rss
            out[role].rss_end = rss
            out[role].rss_max = max(out[role].rss_max, rss)
    elapsed = time.monotonic() - t0
    for role, p in pids.items():
        out[role].cpu = (cpu_seconds(p) - cpu0[role]) / elapsed
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=60, help="measurement window (default 60)")
    p.add_argument("--settle", type=int, default=15,
                   help="seconds after the client is Ready before measuring (default 15)")
    p.add_argument("--dev-server", action="store_true", help="run the server as `shoal agent --dev`")
    p.add_argument("--driver", action="append", default=[],
                   help="runtime driver for both agents, repeatable (default: the agent's own, docker and process)")
    args = p.parse_args()
    if args.seconds < 1 or args.settle < 0:
        p.error("--seconds must be >= 1 and --settle >= 0")

    with tempfile.TemporaryDirectory(prefix="shoal-footprint-") as tmp:
        base = pathlib.Path(tmp)
        drivers = [a for d in args.driver for a in ("--driver", d)]
        server = Agent("server", ["--dev" if args.dev_server else "--server", *drivers], base / "server")
        client = Agent("client", [], base / "client")
        client.args = ["--join", f"127.0.0.1:{server.gossip_port}", *drivers]
        try:
            server.start()
            client.start()
            took = wait_ready(server, client, 60)
            print(f"T9: idle agents on loopback, {os.cpu_count()} cores; server `shoal agent {' '.join(server.args)}`, "
                  f"client `shoal agent {' '.join(client.args)}`; both Ready after {took:.1f} s, "
                  f"settling {args.settle} s, then sampling every second for {args.seconds} s", flush=True)
            time.sleep(args.settle)
            load_before = os.getloadavg()[0]
            got = measure([server, client], args.seconds)
            load_after = os.getloadavg()[0]
        finally:
            client.stop()
            server.stop()
    print(f"\n  {'agent':<8} {'RSS start':>10} {'RSS end':>10} {'(files)':>8} {'RSS max':>10} {'CPU':>8}   target")
    for role, rss_target in (("client", CLIENT_RSS_MIB), ("server", SERVER_RSS_MIB)):
        s = got[role]
        ok = s.rss_max <= rss_target * MIB
        target = f"<= {rss_target} MiB"
        if role == "client":
            ok = ok and s.cpu * 100 <= CLIENT_CPU_PERCENT
            target += f" and <= {CLIENT_CPU_PERCENT:g} %"
        print(f"  {role:<8} {s.rss_start / MIB:6.1f} MiB {s.rss_end / MIB:6.1f} MiB {s.rss_file_end / MIB:4.1f} MiB "
              f"{s.rss_max / MIB:6.1f} MiB {s.cpu * 100:6.2f} %   {target}: {'meets' if ok else 'MISSES'} "
              f"(RSS {s.rss_max / MIB / rss_target:.2f}x the target)")
    print(f"  host load average (1 min): {load_before:.2f} before the window, {load_after:.2f} after")
    print("  anchor: a Serf agent idles at 5-10 MB")


if __name__ == "__main__":
    main()
