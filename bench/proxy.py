#!/usr/bin/env python3
"""T8: the service proxy's requests/s, latency and CPU per request against HAProxy and
nginx, on loopback, same backends, same run.

Shape: one nginx process (one worker) serves a fixed 200 response on `--backends`
loopback ports; those are the service's endpoints. Each proxy under test listens on one
port and balances connections over all of them, round robin:

- shoal `tcp`: `ServiceProxy` in a process of its own on uvloop, fed one balancing table
  (a `shoal.v1.Table`, as the leader sends it) and holding an `AgentMetrics`, exactly as
  the agent runs it — but with nothing else on its loop, so its CPU is the proxy's alone
  (inside `shoal agent` the same loop also runs gossip, the watch stream and probes). A
  second row runs it without metrics, to show what they cost;
- HAProxy `mode tcp` and `mode http` (`balance roundrobin`, default keep-alive and
  server-side connection reuse);
- nginx `stream` (tcp) and `http` proxy (upstream `keepalive`, HTTP/1.1 to the backends);
- shoal `http`: the same process with the port's `app_protocol: http` (HTTP parsed,
  balanced per request, pooled keep-alive connections to the backends);
- a reference: a minimal forwarder on asyncio protocols and uvloop (round robin and
  nothing else: no retry, no replay, no metrics), what any Python proxy on this loop
  costs at least — the floor under shoal's own row;
- kernel mode (root and `nft`; `--only kernel`): shoal's `KernelDataPlane` given the same
  table with `dataplane: kernel`, against a hand-written nftables rule set doing the
  same DNAT (`numgen inc mod N` round robin in the output hook, which is where a
  loopback client's connections are NATed). There is no proxy process: the kernel does
  the work in wrk's and the backends' context, so these rows have no proxy CPU, and the
  target is req/s >= 0.95x the hand-written rules'. Each rule set is installed only
  while its row is measured, in tables of the bench's own (`ip shoal_bench`, `ip
  bench_dnat`: a real agent's `ip shoal` is left alone), and removed afterwards whatever
  happens (SIGTERM included); a leftover of a killed run is removed at the start.
  Each kernel row balances over backend ports of its own on the same nginx process:
  in close mode conntrack drops a DNATed SYN whose reply tuple matches a TIME_WAIT
  entry another row left on a recycled client port (the client then waits a second
  for its retransmit), which would charge one row for another's traffic.

Every proxy gets one thread (`nbthread 1`, `worker_processes 1`), the same unit of work
as shoal's single event loop; `--proxy-threads 0` lets HAProxy and nginx size themselves.
The machine's cores are shared by wrk, the backends and the proxy, as in T8's anchor.

wrk (one thread, `--connections` connections) drives each case twice: keep-alive, and a
new connection per request (`Connection: close`: the backend closes after answering, so
in tcp mode the proxy also opens one backend connection per request; in http mode
HAProxy and nginx keep theirs). A 1 s warm-up precedes every measured run. Proxy CPU
is utime + stime from /proc/PID/stat of the proxy's processes (nginx: master and
workers) over the measured run, divided by the requests wrk completed. The direct row
(wrk to one backend) is the physical baseline.

Prints, per connection mode, req/s, p50 and p99 latency, proxy CPU per request and
errors, then shoal's ratios to HAProxy against the T8 target (tcp: >= 0.9x req/s,
<= 1.2x CPU per request, p99 <= 1.2x). With `--rounds N` the whole matrix runs N times,
interleaved, and every figure is a median with its range. `--profile DIR` also writes
py-spy flame graphs of the shoal rows.

    python bench/proxy.py --install          # apt-get install haproxy nginx wrk when missing (root)
    python bench/proxy.py --seconds 10 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from procs import cpu_seconds, free_port, process_tree, stop_process  # noqa: E402 - bench/ is sys.path[0]

ROOT = pathlib.Path(__file__).resolve().parent.parent
STREAM_MODULE = pathlib.Path("/usr/lib/nginx/modules/ngx_stream_module.so")
PACKAGES = ("haproxy", "nginx", "libnginx-mod-stream", "wrk")
MODES = ("keep-alive", "close")

# Printed by wrk's `done` hook: exact percentiles in microseconds, and the error kinds.
WRK_SCRIPT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH-RESULT {\\"requests\\": %d, \\"duration_us\\": %d, \\"p50_us\\": %d, \\"p99_us\\": %d, "
    .. "\\"connect\\": %d, \\"read\\": %d, \\"write\\": %d, \\"status\\": %d, \\"timeout\\": %d}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


# --- the shoal proxy process -------------------------------------------------------------


async def serve_shoal(port: int, backends: Sequence[int], metrics: bool, app_protocol: str = "tcp") -> None:
    """Run `ServiceProxy` with one table until SIGTERM: what `--serve-shoal` starts."""
    import logging
    import random

    import structlog

    from shoal.agent.metrics import AgentMetrics
    from shoal.agent.proxy import ProxyConfig, ServiceProxy
    from shoal.v1 import types_pb2

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory(prefix="shoal-proxy-bench-") as data_dir:
        proxy = ServiceProxy(ProxyConfig(bind_host="127.0.0.1"), rng=random.Random(1),
                             metrics=AgentMetrics(pathlib.Path(data_dir)) if metrics else None)
        endpoints = [types_pb2.Endpoint(pod=f"bench-{i}", address="127.0.0.1", port=p, weight=1)
                     for i, p in enumerate(backends)]
        await proxy.update([types_pb2.Table(
            service="bench", algorithm="round_robin", version=1, endpoints=endpoints,
            ports=[types_pb2.ServicePort(port=port, target_port="80", protocol="TCP", app_protocol=app_protocol)])])
        if port not in proxy.routes:
            raise SystemExit(f"the proxy could not listen on 127.0.0.1:{port}")
        print("ready", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await proxy.close()


class _Forward(asyncio.Protocol):
    """One side of a reference-forwarder connection: bytes in, written to the other side."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _Forward | None = None
        self.pending: list[bytes] = []  # client bytes that came before the backend connected
        self.eof = False

    def _peer(self) -> asyncio.Transport | None:
        """The other side's transport while it is open."""
        t = self.other.transport if self.other is not None else None
        return t if t is not None and not t.is_closing() else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if (t := self._peer()) is not None:
            t.write(data)
        elif self.other is None:
            self.pending.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        t = self._peer()
        if self.other is not None and self.other.eof:
            # Both directions are done: close both. (A version that half-closed here
            # instead aborted under uvloop 0.23, intermittently, with glibc's "double
            # free or corruption"; closing is equivalent and kept it running.)
            if t is not None:
                t.close()
            return False
        if t is not None and t.can_write_eof():
            t.write_eof()
        return True  # half-close: the other direction may still be sending

    def connection_lost(self, exc: Exception | None) -> None:
        if (t := self._peer()) is not None:
            t.close()

    # Flow control: a slow reader on one side pauses reading on the other.
    def pause_writing(self) -> None:
        if (t := self._peer()) is not None:
            t.pause_reading()

    def resume_writing(self) -> None:
        if (t := self._peer()) is not None:
            t.resume_reading()


async def serve_forwarder(port: int, backends: Sequence[int]) -> None:
    """The reference row: a minimal TCP forwarder on asyncio protocols, round robin, and
    nothing else (no retry, no replay, no metrics) — what a Python proxy costs at least
    on this loop, per connection one task (the connect) and per chunk one callback."""
    loop = asyncio.get_running_loop()
    count = 0

    async def connect(client: _Forward) -> None:
        nonlocal count
        backend = backends[count % len(backends)]
        count += 1
        try:
            _, upstream = await loop.create_connection(_Forward, "127.0.0.1", backend)
        except OSError:
            if client.transport is not None:
                client.transport.close()
            return
        if client.transport is None or client.transport.is_closing():
            upstream.transport.close()  # type: ignore[union-attr]
            return
        upstream.other, client.other = client, upstream
        assert upstream.transport is not None
        for data in client.pending:
            upstream.transport.write(data)
        client.pending.clear()
        if client.eof:
            upstream.transport.write_eof()

    connecting: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks

    def accepted() -> _Forward:
        client = _Forward()
        task = loop.create_task(connect(client))
        connecting.add(task)
        task.add_done_callback(connecting.discard)
        return client

    server = await loop.create_server(accepted, "127.0.0.1", port, backlog=1024)
    print("ready", flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()


def run_child(argv: Sequence[str]) -> None:
    """`--serve-shoal PORT` or `--serve-forwarder PORT`, with `--backend PORT` repeated."""
    p = argparse.ArgumentParser(prog="proxy.py --serve-shoal|--serve-forwarder")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--serve-shoal", type=int, metavar="PORT")
    which.add_argument("--serve-forwarder", type=int, metavar="PORT")
    p.add_argument("--backend", type=int, action="append", required=True, metavar="PORT")
    p.add_argument("--no-metrics", action="store_true")
    p.add_argument("--http", action="store_true", help="serve the port in http mode")
    args = p.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        print("uvloop is not installed; the proxy runs on the default asyncio loop", file=sys.stderr)
    if args.serve_shoal:
        asyncio.run(serve_shoal(args.serve_shoal, args.backend, not args.no_metrics, "http" if args.http else "tcp"))
    else:
        asyncio.run(serve_forwarder(args.serve_forwarder, args.backend))


# --- processes, their CPU time, and configuration files ----------------------------------


def wait_listening(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout:g} s")


def nginx_main(work: pathlib.Path, threads: int, *, stream: bool = False) -> str:
    """The main context every nginx here shares: foreground, own pid and logs, no access log."""
    for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (work / d).mkdir(exist_ok=True)
    return (
        (f"load_module {STREAM_MODULE};\n" if stream else "")
        + f"worker_processes {threads or 'auto'};\n"
        f"pid {work / 'nginx.pid'};\n"
        f"error_log {work / 'error.log'} warn;\n"
        "worker_rlimit_nofile 16384;\n"
        "events { worker_connections 8000; }\n"
    )


def nginx_http_paths(work: pathlib.Path) -> str:
    return (
        f"client_body_temp_path {work / 'client_body'}; proxy_temp_path {work / 'proxy'};\n"
        f"fastcgi_temp_path {work / 'fastcgi'}; uwsgi_temp_path {work / 'uwsgi'}; scgi_temp_path {work / 'scgi'};\n"
        "access_log off;\n"
    )


def nginx_backend_conf(work: pathlib.Path, ports: Sequence[int]) -> str:
    servers = "".join(
        f"  server {{ listen 127.0.0.1:{p}; location / {{ return 200 \"hello from backend {i}\\n\"; }} }}\n"
        for i, p in enumerate(ports))
    # keepalive_requests: nginx closes a keep-alive connection after 1,000 requests by
    # default, which would turn part of the keep-alive runs into new-connection ones.
    return (nginx_main(work, 1) + "http {\n" + nginx_http_paths(work)
            + "  default_type text/plain;\n  keepalive_requests 10000000;\n  keepalive_timeout 300s;\n"
            + servers + "}\n")


def nginx_proxy_conf(work: pathlib.Path, listen: int, backends: Sequence[int], threads: int, mode: str) -> str:
    servers = "".join(f"    server 127.0.0.1:{p};\n" for p in backends)
    if mode == "tcp":
        return (nginx_main(work, threads, stream=True)
                + "stream {\n  upstream bk {\n" + servers + "  }\n"
                f"  server {{ listen 127.0.0.1:{listen} backlog=1024; proxy_pass bk; }}\n}}\n")
    # HTTP/1.1 with an empty Connection header and an upstream keepalive pool: nginx's
    # documented way to reuse backend connections (HAProxy does so by default).
    return (nginx_main(work, threads) + "http {\n" + nginx_http_paths(work)
            + "  keepalive_requests 10000000;\n  keepalive_timeout 300s;\n"
            + "  upstream bk {\n" + servers + "    keepalive 64;\n    keepalive_requests 10000000;\n  }\n"
            f"  server {{\n    listen 127.0.0.1:{listen} backlog=1024;\n"
            "    location / { proxy_pass http://bk; proxy_http_version 1.1; proxy_set_header Connection \"\"; }\n"
            "  }\n}\n")


def haproxy_conf(listen: int, backends: Sequence[int], threads: int, mode: str) -> str:
    servers = "".join(f"  server b{i} 127.0.0.1:{p}\n" for i, p in enumerate(backends))
    return (
        "global\n  maxconn 8000\n" + (f"  nbthread {threads}\n" if threads else "")
        + f"defaults\n  mode {mode}\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n"
        f"frontend ft\n  bind 127.0.0.1:{listen}\n  backlog 1024\n  default_backend bk\n"
        "backend bk\n  balance roundrobin\n" + servers
    )


# --- kernel mode: nftables rule sets instead of a process --------------------------------

SHOAL_BENCH_TABLE = "shoal_bench"  # KernelDataPlane's table here (an agent's is `shoal`)
HAND_TABLE = "bench_dnat"


def nft(script: str) -> None:
    p = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=10)
    if p.returncode != 0:
        raise RuntimeError(f"nft refused the rules: {' '.join(p.stderr.split())}")


def hand_dnat(listen: int, backends: Sequence[int]) -> str:
    """The hand-written anchor: one rule in the output hook, round robin over the backends."""
    targets = ", ".join(f"{i} : 127.0.0.1 . {p}" for i, p in enumerate(backends))
    return (f"table ip {HAND_TABLE}\ndelete table ip {HAND_TABLE}\n"
            f"table ip {HAND_TABLE} {{\n"
            "\tchain output {\n"
            "\t\ttype nat hook output priority -100; policy accept;\n"
            f"\t\tip daddr 127.0.0.1 tcp dport {listen} dnat ip to numgen inc mod {len(backends)} map {{ {targets} }}\n"
            "\t}\n}\n")


def kernel_unusable() -> str:
    """Why the kernel rows cannot run here ("" when they can)."""
    if os.geteuid() != 0:
        return "they need root"
    if shutil.which("nft") is None:
        return "they need nft (apt-get install nftables)"
    return ""


@dataclass
class KernelRules:
    """One kernel-mode row: a rule set DNATing 127.0.0.1:`port` to the backends."""

    name: str
    port: int
    backends: list[int]

    def install(self) -> None:
        if self.name == HAND_KERNEL:
            nft(hand_dnat(self.port, self.backends))
        else:
            asyncio.run(self._shoal())
        # Nothing listens on the port: a connection that gets through went through DNAT.
        with socket.create_connection(("127.0.0.1", self.port), timeout=2):
            pass

    async def _shoal(self) -> None:
        import logging

        import structlog

        from shoal.agent.dataplane import KernelDataPlane
        from shoal.v1 import types_pb2

        events: list[tuple[str, ...]] = []
        quiet = structlog.wrap_logger(None, wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
        plane = KernelDataPlane(bind_host="127.0.0.1", table=SHOAL_BENCH_TABLE, local_addresses=lambda: ("127.0.0.1",),
                                on_event=lambda *e: events.append(e), logger=quiet)
        await plane.start()
        endpoints = [types_pb2.Endpoint(pod=f"bench-{i}", address="127.0.0.1", port=p, weight=1)
                     for i, p in enumerate(self.backends)]
        taken = await plane.update([types_pb2.Table(
            service="bench", algorithm="round_robin", version=1, endpoints=endpoints, dataplane="kernel",
            ports=[types_pb2.ServicePort(port=self.port, target_port="80", protocol="TCP")])])
        if self.port not in taken:
            raise RuntimeError(f"the kernel data plane did not take port {self.port}: {events}")

    def remove(self) -> None:
        """Remove the row's table (and whatever a killed run left of it); never raises."""
        table = HAND_TABLE if self.name == HAND_KERNEL else SHOAL_BENCH_TABLE
        remove_kernel_tables((table,))


def remove_kernel_tables(tables: Sequence[str] = (SHOAL_BENCH_TABLE, HAND_TABLE)) -> None:
    for table in tables:
        try:
            nft(f"table ip {table}\ndelete table ip {table}\n")
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"could not remove nftables table ip {table}: {exc}", file=sys.stderr)


# --- what is measured --------------------------------------------------------------------


@dataclass
class Proxy:
    """One process tree under test, listening on `port`."""

    name: str
    port: int
    command: list[str]
    proc: subprocess.Popen[bytes] | None = None
    pids: list[int] = field(default_factory=list)

    def start(self, work: pathlib.Path, ready_line: bool = False) -> None:
        log = open(work / f"{self.name.replace(' ', '-')}.log", "wb")
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE if ready_line else log, stderr=log,
                                     stdin=subprocess.DEVNULL, cwd=ROOT)
        if ready_line:
            assert self.proc.stdout is not None
            if self.proc.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"{self.name} did not start; see {log.name}")
        wait_listening(self.port, self.proc, self.name)
        time.sleep(0.2)  # nginx's workers start after the master has bound the port
        self.pids = process_tree(self.proc.pid)

    def stop(self) -> None:
        stop_process(self.proc, 5)


@dataclass(frozen=True)
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float | None  # proxy CPU per request; None for the direct row
    errors: int


def wrk(port: int, seconds: int, connections: int, mode: str, script: pathlib.Path) -> dict[str, int]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "2s", "-s", str(script)]
    if mode == "close":
        cmd += ["-H", "Connection: close"]
    out = subprocess.run(cmd + [f"http://127.0.0.1:{port}/"], capture_output=True, text=True,
                         timeout=seconds + 30).stdout
    for line in out.splitlines():
        if line.startswith("BENCH-RESULT "):
            return json.loads(line.removeprefix("BENCH-RESULT "))
    raise RuntimeError(f"wrk printed no result:\n{out}")


def measure(port: int, pids: Sequence[int], seconds: int, connections: int, mode: str,
            script: pathlib.Path, profile: pathlib.Path | None = None) -> Result:
    """One case: warm-up, then a measured wrk run; with `profile`, py-spy samples the
    proxy's first process during the run and writes a flame graph there."""
    wrk(port, 1, connections, mode, script)  # warm-up: caches, allocator, connection pools
    spy = None
    if profile is not None and pids:
        spy = subprocess.Popen(["py-spy", "record", "--nonblocking", "-r", "200", "-d", str(seconds),
                                "-o", str(profile), "-p", str(pids[0])],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # attached before the run starts
    before = cpu_seconds(pids)
    r = wrk(port, seconds, connections, mode, script)
    cpu = cpu_seconds(pids) - before
    if spy is not None:
        spy.wait(30)
    n = max(r["requests"], 1)
    errors = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    return Result(rps=r["requests"] / (r["duration_us"] / 1e6), p50_ms=r["p50_us"] / 1000,
                  p99_ms=r["p99_us"] / 1000, cpu_us=cpu / n * 1e6 if pids else None, errors=errors)


# --- the run -----------------------------------------------------------------------------

DIRECT = "direct (1 backend)"
SHOAL_KERNEL = "shoal kernel"
HAND_KERNEL = "nftables dnat"
# Row name -> (what runs, proxy mode). Rows print in this order.
ROWS: dict[str, tuple[str, str]] = {
    DIRECT: ("direct", "tcp"),
    "shoal tcp": ("shoal", "tcp"),
    "shoal tcp, no metrics": ("shoal", "tcp"),
    "python forwarder tcp": ("python", "tcp"),
    "haproxy tcp": ("haproxy", "tcp"),
    "nginx tcp": ("nginx", "tcp"),
    SHOAL_KERNEL: ("kernel", "tcp"),
    HAND_KERNEL: ("kernel", "tcp"),
    "shoal http": ("shoal", "http"),
    "haproxy http": ("haproxy", "http"),
    "nginx http": ("nginx", "http"),
}
NOT_IMPLEMENTED: set[str] = set()
# (row, its anchor, whether the T8 target applies to it)
RATIOS = (("shoal tcp", "haproxy tcp", True), ("shoal tcp, no metrics", "haproxy tcp", False),
          ("shoal http", "haproxy http", True), ("python forwarder tcp", "haproxy tcp", False),
          ("nginx tcp", "haproxy tcp", False), ("nginx http", "haproxy http", False))


def proxies(work: pathlib.Path, backends: Sequence[int], threads: int, only: set[str],
            http_only: bool = False) -> dict[str, Proxy]:
    here = str(pathlib.Path(__file__).resolve())
    to_backends = [a for b in backends for a in ("--backend", str(b))]
    made: dict[str, Proxy] = {}
    for name, (kind, mode) in ROWS.items():
        if kind in ("direct", "kernel") or name in NOT_IMPLEMENTED or (only and kind not in only):
            continue
        if http_only and mode != "http":
            continue
        port = free_port()
        d = work / name.replace(" ", "-").replace(",", "")
        d.mkdir()
        if kind == "shoal":
            cmd = [sys.executable, here, "--serve-shoal", str(port), *to_backends]
            if "no metrics" in name:
                cmd.append("--no-metrics")
            if mode == "http":
                cmd.append("--http")
        elif kind == "python":
            cmd = [sys.executable, here, "--serve-forwarder", str(port), *to_backends]
        elif kind == "haproxy":
            (d / "haproxy.cfg").write_text(haproxy_conf(port, backends, threads, mode))
            cmd = ["haproxy", "-db", "-q", "-f", str(d / "haproxy.cfg")]
        else:
            (d / "nginx.conf").write_text(nginx_proxy_conf(d, port, backends, threads, mode))
            cmd = ["nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(d / "nginx.conf"),
                   "-g", "daemon off;"]
        made[name] = Proxy(name, port, cmd)
    return made


def ensure_tools(install: bool) -> list[str]:
    """What is missing (after installing it when asked and allowed)."""
    def missing() -> list[str]:
        gone = [t for t in ("wrk", "haproxy", "nginx") if shutil.which(t) is None]
        if not STREAM_MODULE.exists():
            gone.append("libnginx-mod-stream")
        return gone

    if missing() and install and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        # The packages' init scripts would start a system nginx on port 80 and a system
        # HAProxy; invoke-rc.d asks policy-rc.d first, and 101 means "do not start".
        policy = pathlib.Path("/usr/sbin/policy-rc.d")
        ours = not policy.exists()
        if ours:
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
        try:
            subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
            subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], check=False, env=env)
        finally:
            if ours:
                policy.unlink(missing_ok=True)
    return missing()


def fmt(values: Sequence[float], spec: str, scale: float = 1.0) -> str:
    """Median, and the range when there is more than one value."""
    if not values:
        return "-"
    med = statistics.median(values) * scale
    if len(values) == 1:
        return format(med, spec)
    return f"{format(med, spec)} ({format(min(values) * scale, spec)}-{format(max(values) * scale, spec)})"


def main() -> None:
    if "--serve-shoal" in sys.argv or "--serve-forwarder" in sys.argv:
        run_child(sys.argv[1:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=3, help="measured seconds per case (default 3)")
    p.add_argument("--rounds", type=int, default=1, help="times the whole matrix runs (default 1)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--backends", type=int, default=3, help="backend endpoints (default 3)")
    p.add_argument("--proxy-threads", type=int, default=1,
                   help="HAProxy nbthread and nginx worker_processes (default 1; 0: their own default)")
    p.add_argument("--only", default="",
                   help="comma-separated: shoal, python, haproxy, nginx, kernel (default: all; the direct row always "
                        "runs)")
    p.add_argument("--http", action="store_true", help="only the http-mode rows (and the direct row)")
    p.add_argument("--install", action="store_true", help="apt-get install haproxy, nginx, wrk when missing (root)")
    p.add_argument("--profile", type=pathlib.Path, default=None, metavar="DIR",
                   help="py-spy flame graphs of the shoal rows into DIR (py-spy's sampling adds to their CPU)")
    args = p.parse_args()
    if args.profile and shutil.which("py-spy") is None:
        p.error("--profile needs py-spy (pip install py-spy)")
    if args.seconds < 1 or args.rounds < 1 or args.connections < 1 or args.backends < 1:
        p.error("--seconds, --rounds, --connections and --backends must be >= 1")
    gone = ensure_tools(args.install)
    if gone:
        sys.exit(f"missing: {', '.join(gone)}. Install with\n  apt-get install {' '.join(PACKAGES)}"
                 "   (Debian; or run with --install as root)")
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    kernel_wanted = (not only or "kernel" in only) and not args.http
    if kernel_wanted and (why := kernel_unusable()):
        print(f"kernel rows skipped: {why}", flush=True)
        kernel_wanted = False
    # SIGTERM unwinds like Ctrl-C, so the finally blocks remove rules and stop processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    threads = ("single-threaded" if args.proxy_threads == 1
               else f"with {args.proxy_threads or 'their default number of'} threads")
    print(f"T8: service proxy on loopback, {os.cpu_count()} cores shared by wrk, backends and proxy; "
          f"wrk -t1 -c{args.connections}, {args.seconds} s per case after a 1 s warm-up, {args.rounds} round(s); "
          f"{args.backends} backends (one nginx worker, 200 with a 21-byte body); "
          f"proxies {threads}",
          flush=True)
    results: dict[tuple[str, str], list[Result]] = {}
    with tempfile.TemporaryDirectory(prefix="shoal-bench-proxy-") as tmp:
        work = pathlib.Path(tmp)
        script = work / "report.lua"
        script.write_text(WRK_SCRIPT)
        backend_ports = [free_port() for _ in range(args.backends)]
        (work / "backend").mkdir()
        kernel_backends = {name: [free_port() for _ in range(args.backends)]
                           for name in (SHOAL_KERNEL, HAND_KERNEL) if kernel_wanted}
        (work / "backend" / "nginx.conf").write_text(nginx_backend_conf(
            work / "backend", backend_ports + [p for ports in kernel_backends.values() for p in ports]))
        backend = Proxy("backend", backend_ports[0],
                        ["nginx", "-p", str(work / "backend"), "-e", str(work / "backend" / "error.log"),
                         "-c", str(work / "backend" / "nginx.conf"), "-g", "daemon off;"])
        under_test = proxies(work, backend_ports, args.proxy_threads, only, args.http)
        kernel = {name: KernelRules(name, free_port(), ports) for name, ports in kernel_backends.items()}
        started: list[Proxy] = [backend]
        try:
            if kernel:
                remove_kernel_tables()  # what a killed run left
            backend.start(work)
            for px in under_test.values():
                started.append(px)
                px.start(work, ready_line=ROWS[px.name][0] in ("shoal", "python"))
            for rnd in range(args.rounds):
                for mode in MODES:
                    cases: list[tuple[str, int, list[int]]] = [(DIRECT, backend_ports[0], [])]
                    cases += [(px.name, px.port, px.pids) for px in under_test.values()]
                    # Every round swaps the kernel rows, so neither always runs first.
                    kernel_cases: list[tuple[str, int, list[int]]] = [(k.name, k.port, []) for k in kernel.values()]
                    cases += kernel_cases[::-1] if rnd % 2 else kernel_cases
                    for name, port, pids in cases:
                        profile = None
                        if args.profile and ROWS[name][0] == "shoal":
                            args.profile.mkdir(parents=True, exist_ok=True)
                            slug = name.replace(" ", "-").replace(",", "")
                            profile = args.profile / f"{slug}-{mode}-round{rnd + 1}.svg"
                        rules = kernel.get(name)
                        if rules is not None:
                            rules.install()  # only while measured: no row pays for another's rules
                        try:
                            r = measure(port, pids, args.seconds, args.connections, mode, script, profile)
                        finally:
                            if rules is not None:
                                rules.remove()
                        results.setdefault((name, mode), []).append(r)
                        print(f"  round {rnd + 1} {mode:>10} {name:<22} {r.rps:9.0f} req/s  p50 {r.p50_ms:6.2f} ms  "
                              f"p99 {r.p99_ms:6.2f} ms  cpu {'-' if r.cpu_us is None else f'{r.cpu_us:.1f}'} us/req  "
                              f"errors {r.errors}", flush=True)
        finally:
            if kernel:
                remove_kernel_tables()
            for px in reversed(started):
                px.stop()
    report(results, args.rounds)
    report_kernel(results, args.rounds)


def report(results: dict[tuple[str, str], list[Result]], rounds: int) -> None:
    what = "median (min-max) over rounds" if rounds > 1 else "one round"
    print("\nreq/s and latency move with whatever else the machine runs; CPU per request is the steadier figure.")
    for mode in MODES:
        label = "keep-alive" if mode == "keep-alive" else "new connection per request (Connection: close)"
        print(f"\n{label}, {what}")
        print(f"  {'':<22} {'req/s':>22} {'p50 ms':>20} {'p99 ms':>20} {'proxy CPU us/req':>22} {'errors':>8}")
        for name in ROWS:
            if name in NOT_IMPLEMENTED:
                print(f"  {name:<22} {'not implemented':>22}")
                continue
            rs = results.get((name, mode))
            if not rs:
                continue
            cpu = [r.cpu_us for r in rs if r.cpu_us is not None]
            print(f"  {name:<22} {fmt([r.rps for r in rs], '.0f'):>22} {fmt([r.p50_ms for r in rs], '.2f'):>20} "
                  f"{fmt([r.p99_ms for r in rs], '.2f'):>20} {fmt(cpu, '.1f') if cpu else '-':>22} "
                  f"{sum(r.errors for r in rs):>8}")

    def ratio(a: str, b: str, mode: str, get: Callable[[Result], float | None]) -> list[float]:
        xs, ys = results.get((a, mode), []), results.get((b, mode), [])
        return [ga / gb for x, y in zip(xs, ys) if (ga := get(x)) is not None and (gb := get(y))]

    print("\nratios to HAProxy in the same mode (T8 target for shoal: req/s >= 0.90x, CPU per request <= 1.20x, "
          "p99 <= 1.20x)")
    if not any(name.startswith("haproxy") for name, _ in results):
        print("  HAProxy did not run (--only), so there is no anchor")
    for mode in MODES:
        for ours, theirs, target in RATIOS:
            if ours in NOT_IMPLEMENTED:
                print(f"  {mode:>10} {ours:<22}: not implemented")
                continue
            rps = ratio(ours, theirs, mode, lambda r: r.rps)
            cpu = ratio(ours, theirs, mode, lambda r: r.cpu_us)
            p99 = ratio(ours, theirs, mode, lambda r: r.p99_ms)
            if not (rps and cpu and p99):
                continue
            verdict = ""
            if target:
                ok = statistics.median(rps) >= 0.9 and statistics.median(cpu) <= 1.2 and statistics.median(p99) <= 1.2
                verdict = "  meets the target" if ok else "  MISSES the target"
            print(f"  {mode:>10} {ours:<22}: req/s {fmt(rps, '.2f')}x  CPU/req {fmt(cpu, '.2f')}x  "
                  f"p99 {fmt(p99, '.2f')}x  vs {theirs}{verdict}")


def report_kernel(results: dict[tuple[str, str], list[Result]], rounds: int) -> None:
    pairs = [(mode, results.get((SHOAL_KERNEL, mode), []), results.get((HAND_KERNEL, mode), [])) for mode in MODES]
    if not any(ours and theirs for _, ours, theirs in pairs):
        return
    print("\nkernel mode: shoal's nftables rules to the hand-written ones (T8 target: req/s >= 0.95x)")
    for mode, ours, theirs in pairs:
        rps = [x.rps / y.rps for x, y in zip(ours, theirs) if y.rps]
        p99 = [x.p99_ms / y.p99_ms for x, y in zip(ours, theirs) if y.p99_ms]
        if not rps:
            continue
        verdict = "meets the target" if statistics.median(rps) >= 0.95 else "MISSES the target"
        print(f"  {mode:>10} {SHOAL_KERNEL:<22}: req/s {fmt(rps, '.2f')}x  p99 {fmt(p99, '.2f')}x  "
              f"vs {HAND_KERNEL}  {verdict}")


if __name__ == "__main__":
    main()
