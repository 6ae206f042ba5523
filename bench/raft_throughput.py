#!/usr/bin/env python3
"""T5: committed writes/s and latency of 3 `RaftStore` servers vs a 3-member etcd, same run.

Shape: three server processes on loopback (fsync on: SQLite `synchronous=FULL` for
shoal, etcd's WAL fsync for etcd) and a load generator of C concurrent clients, each
sending one write at a time and waiting for the answer. The clients are spread
round-robin over all three servers of *both* clusters, as etcd's own benchmark tool
and `etcdctl check perf` spread theirs over every endpoint: a follower forwards the
write to the leader (etcd: its proposal forwarding; shoal: `RaftStore.commit(...,
forward=True)`, a batched `MsgProp` on the Raft stream) and answers once the write is
applied locally. `--target leader` sends every write to the leader instead (the shape
of earlier runs of this bench), for both clusters alike. Both clusters are
driven by the *same* Python gRPC client over the same kind of call: a unary
`Put(key, value)` whose request is etcd's `PutRequest` wire format (field 1 key,
field 2 value). For etcd that is `etcdserverpb.KV/Put` itself; for shoal it is a
bench-only `shoal.bench.Kv/Put` served next to each RaftStore that commits
`Put(kind="nodes", name=key, value={"v": value})` — the controllers' write path
(`Store.commit`), minus the Control API's manifest handling. Keys are drawn from a
fixed key space so state size stays bounded, as in etcd's own benchmark tool.

The load generator is Python too and shares the machine's cores with the servers, so
it runs in `--load-procs` processes (default: one per core, at most one per 64 clients),
each with its share of the clients on its own channels; the same processes drive both
clusters. Every process starts measuring at the same instant and reports its latencies;
the table aggregates them.

Prints, per client count, writes/s, p50 and p99 for each cluster and the ratios, the
CPU each side used per write (servers, load generator) and how much CPU *other*
programs took from the machine meanwhile ("foreign"), which says whether a run was
disturbed. `--rounds N` repeats everything with fresh clusters and prints ranges.
`--python-floor` also measures a gRPC server that does nothing but answer, in one
Python process: the most any Python server can reach with this client on this machine.

If `etcd` is not installed it says how to install it (`--install-etcd` does it with
apt-get when run as root) and prints shoal's figures alone.

    python bench/raft_throughput.py                           # 1, 64, 1000 clients, 5 s each
    python bench/raft_throughput.py --clients 64 --duration 10 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from procs import free_port  # noqa: E402 - bench/ is sys.path[0]

ROOT = pathlib.Path(__file__).resolve().parent.parent

import grpc  # noqa: E402

KV_METHOD_SHOAL = "/shoal.bench.Kv/Put"
KV_METHOD_ETCD = "/etcdserverpb.KV/Put"
CLIENTS_PER_CHANNEL = 64
"""Concurrent clients sharing one HTTP/2 connection, as etcd's benchmark tool shares
one client among many goroutines; 1,000 clients spread over 3 servers by 2 load
processes use 18 connections (3 per server per process)."""


# --- a tiny protobuf codec for PutRequest {bytes key = 1; bytes value = 2;} ----------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def put_request(key: bytes, value: bytes) -> bytes:
    return b"\x0a" + _varint(len(key)) + key + b"\x12" + _varint(len(value)) + value


def parse_put_request(data: bytes) -> tuple[bytes, bytes]:
    fields: dict[int, bytes] = {}
    i = 0
    while i < len(data):
        tag = data[i]
        i += 1
        n = shift = 0
        while True:
            b = data[i]
            i += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        fields[tag >> 3] = data[i : i + n]
        i += n
    return fields.get(1, b""), fields.get(2, b"")


def use_uvloop() -> None:
    if os.environ.get("SHOAL_BENCH_NO_UVLOOP"):
        return
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return
    uvloop.install()


# --- server processes -------------------------------------------------------------------


async def serve(args: argparse.Namespace) -> None:
    import logging

    import structlog

    from shoal.leader.raft import NotLeader
    from shoal.leader.replicated import RaftStore
    from shoal.leader.state import Put, Txn

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    peers = {int(k): v for k, v in (p.split("=", 1) for p in args.peers.split(","))}
    store = RaftStore(node_id=args.id, cluster_id="bench", peers=peers, data_dir=args.data)

    async def put(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        key, value = parse_put_request(request)
        try:
            await store.commit(Txn(ops=(Put(kind="nodes", name=key.decode(), value={"v": value.decode()}),)),
                               forward=True)
        except NotLeader as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"leader={exc.leader_hint}")
        return b""

    async def is_leader(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b"\x01" if store.is_leader else b""

    kv = grpc.aio.server()
    kv.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("shoal.bench.Kv", {
            "Put": grpc.unary_unary_rpc_method_handler(put),
            "IsLeader": grpc.unary_unary_rpc_method_handler(is_leader),
        }),)
    )
    kv.add_insecure_port(f"127.0.0.1:{args.kv_port}")
    await store.start()
    await kv.start()
    print("ready", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await kv.stop(None)
    await store.close()


async def serve_floor(args: argparse.Namespace) -> None:
    """A gRPC server that answers every Put at once: the Python floor."""

    async def put(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b""

    kv = grpc.aio.server()
    kv.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("shoal.bench.Kv", {"Put": grpc.unary_unary_rpc_method_handler(put)}),)
    )
    kv.add_insecure_port(f"127.0.0.1:{args.kv_port}")
    await kv.start()
    print("ready", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await kv.stop(None)


# --- clusters -------------------------------------------------------------------------------


def _stop_all(procs: list[subprocess.Popen[str]] | list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ShoalCluster:
    name = "shoal"
    method = KV_METHOD_SHOAL

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[str]] = []
        self.kv_addrs: list[str] = []

    def start(self) -> None:
        raft_ports = {i: free_port() for i in (1, 2, 3)}
        peers = ",".join(f"{i}=127.0.0.1:{p}" for i, p in raft_ports.items())
        for i in (1, 2, 3):
            kv_port = free_port()
            self.kv_addrs.append(f"127.0.0.1:{kv_port}")
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "serve", "--id", str(i), "--peers", peers,
                     "--kv-port", str(kv_port), "--data", str(self.root / f"s{i}")],
                    stdout=subprocess.PIPE, text=True, cwd=ROOT,
                )
            )
        for proc in self.procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise SystemExit("a shoal server did not start")

    async def leader(self) -> str:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for addr in self.kv_addrs:
                async with grpc.aio.insecure_channel(addr) as ch:
                    try:
                        if await ch.unary_unary("/shoal.bench.Kv/IsLeader")(b"", timeout=2):
                            # A first write through it: the leader has committed in its term.
                            await ch.unary_unary(self.method)(put_request(b"probe", b"x"), timeout=2)
                            return addr
                    except grpc.aio.AioRpcError:
                        continue
            await asyncio.sleep(0.1)
        raise SystemExit("no shoal leader within 10 s")

    def endpoints(self) -> list[str]:
        return list(self.kv_addrs)

    def stop(self) -> None:
        _stop_all(self.procs)


class FloorServer:
    """One Python process answering every Put without doing anything."""

    name = "floor"
    method = KV_METHOD_SHOAL

    def __init__(self, root: pathlib.Path) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.addr = ""

    def start(self) -> None:
        port = free_port()
        self.addr = f"127.0.0.1:{port}"
        self.procs.append(
            subprocess.Popen([sys.executable, __file__, "serve-floor", "--kv-port", str(port)],
                             stdout=subprocess.PIPE, text=True, cwd=ROOT)
        )
        assert self.procs[0].stdout is not None
        if self.procs[0].stdout.readline().strip() != "ready":
            raise SystemExit("the floor server did not start")

    async def leader(self) -> str:
        return self.addr

    def endpoints(self) -> list[str]:
        return [self.addr]

    def stop(self) -> None:
        _stop_all(self.procs)


class EtcdCluster:
    name = "etcd"
    method = KV_METHOD_ETCD

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []
        self.client_addrs: list[str] = []

    def start(self) -> None:
        peer_ports = {i: free_port() for i in (1, 2, 3)}
        initial = ",".join(f"e{i}=http://127.0.0.1:{p}" for i, p in peer_ports.items())
        for i in (1, 2, 3):
            cport = free_port()
            self.client_addrs.append(f"127.0.0.1:{cport}")
            self.procs.append(
                subprocess.Popen(
                    ["etcd", "--name", f"e{i}", "--data-dir", str(self.root / f"e{i}"),
                     "--listen-client-urls", f"http://127.0.0.1:{cport}",
                     "--advertise-client-urls", f"http://127.0.0.1:{cport}",
                     "--listen-peer-urls", f"http://127.0.0.1:{peer_ports[i]}",
                     "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_ports[i]}",
                     "--initial-cluster", initial, "--initial-cluster-state", "new",
                     "--initial-cluster-token", "bench", "--logger", "zap", "--log-level", "error"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
            )

    async def leader(self) -> str:
        endpoints = ",".join(f"http://{a}" for a in self.client_addrs)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            r = subprocess.run(
                ["etcdctl", "--endpoints", endpoints, "endpoint", "status", "-w", "json"],
                capture_output=True, text=True, env={**os.environ, "ETCDCTL_API": "3"},
            )
            if r.returncode == 0:
                for st in json.loads(r.stdout):
                    status = st["Status"]
                    if status.get("leader") and status["header"]["member_id"] == status["leader"]:
                        return str(st["Endpoint"]).removeprefix("http://")
            await asyncio.sleep(0.2)
        raise SystemExit("no etcd leader within 20 s")

    def endpoints(self) -> list[str]:
        return list(self.client_addrs)

    def stop(self) -> None:
        _stop_all(self.procs)


Cluster = ShoalCluster | EtcdCluster | FloorServer


# --- load -----------------------------------------------------------------------------------


async def load_worker(args: argparse.Namespace) -> None:
    """One load process: `args.clients` clients on their own channels; prints its
    latencies (measured window only) as JSON when done. Client n of this process is
    client `first_client + n` of the whole load and talks to endpoint number
    (first_client + n) mod len(endpoints): round-robin over the servers."""
    clients = args.clients
    addrs = args.addr.split(",")
    mine: list[list[int]] = [[] for _ in addrs]
    for n in range(clients):
        mine[(args.first_client + n) % len(addrs)].append(n)
    channels: list[grpc.aio.Channel] = []
    call_of: dict[int, grpc.aio.UnaryUnaryMultiCallable] = {}
    for addr, ns in zip(addrs, mine):
        if not ns:
            continue
        chans = [grpc.aio.insecure_channel(addr) for _ in range(max(1, -(-len(ns) // CLIENTS_PER_CHANNEL)))]
        channels += chans
        calls_here = [ch.unary_unary(args.method) for ch in chans]
        for j, n in enumerate(ns):
            call_of[n] = calls_here[j % len(calls_here)]
    value = b"v" * args.value_size
    latencies: list[float] = []
    errors = 0
    # Wall clock to line up with the other load processes, then the monotonic clock.
    start = time.perf_counter() + max(0.0, args.start_at - time.time())
    measure_from = start + args.warmup
    end = measure_from + args.duration
    rng = random.Random(args.seed)
    await asyncio.sleep(max(0.0, start - time.perf_counter()))

    async def client(n: int) -> None:
        nonlocal errors
        call = call_of[n]
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                return
            key = f"key-{rng.randrange(args.key_space)}".encode()
            try:
                await call(put_request(key, value), timeout=10)
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            t1 = time.perf_counter()
            if t0 >= measure_from:
                latencies.append(t1 - t0)

    await asyncio.gather(*(client(n) for n in range(clients)))
    for ch in channels:
        await ch.close()
    json.dump({"latencies": latencies, "errors": errors}, sys.stdout)
    sys.stdout.flush()


@dataclass
class Result:
    writes_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    server_cpu: float = 0.0
    """Cores the servers used during the measured window."""
    load_cpu: float = 0.0
    """Cores the load generator used."""
    foreign_cpu: float = 0.0
    """Cores everything else on the machine used: noise from other programs."""

    def server_us_per_write(self) -> float:
        return self.server_cpu / self.writes_per_s * 1e6 if self.writes_per_s else 0.0

    def load_us_per_write(self) -> float:
        return self.load_cpu / self.writes_per_s * 1e6 if self.writes_per_s else 0.0


def cpu_seconds(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def machine_busy_seconds() -> float:
    import psutil

    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


async def load(cluster: Cluster, addr: str, clients: int, args: argparse.Namespace) -> Result:
    procs_n = max(1, min(args.load_procs, -(-clients // CLIENTS_PER_CHANNEL)))
    shares = [clients // procs_n + (1 if i < clients % procs_n else 0) for i in range(procs_n)]
    start_at = time.time() + 1.5  # time for the load processes to import grpc
    firsts = [sum(shares[:i]) for i in range(procs_n)]
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, __file__, "load", "--addr", addr, "--method", cluster.method,
            "--clients", str(share), "--first-client", str(firsts[i]),
            "--start-at", repr(start_at), "--warmup", str(args.warmup),
            "--duration", str(args.duration), "--value-size", str(args.value_size),
            "--key-space", str(args.key_space), "--seed", str(i),
            stdout=asyncio.subprocess.PIPE, cwd=ROOT,
        )
        for i, share in enumerate(shares)
    ]
    outputs = [asyncio.ensure_future(p.communicate()) for p in procs]
    server_pids = [p.pid for p in cluster.procs]
    load_pids = [p.pid for p in procs]
    await asyncio.sleep(max(0.0, start_at + args.warmup - time.time()))
    s0, l0, m0 = cpu_seconds(server_pids), cpu_seconds(load_pids), machine_busy_seconds()
    await asyncio.sleep(max(0.0, start_at + args.warmup + args.duration - time.time()))
    s1, l1, m1 = cpu_seconds(server_pids), cpu_seconds(load_pids), machine_busy_seconds()
    latencies: list[float] = []
    errors = 0
    for out in outputs:
        stdout, _ = await out
        data = json.loads(stdout)
        latencies.extend(data["latencies"])
        errors += data["errors"]
    latencies.sort()
    d = args.duration
    server_cpu, load_cpu = (s1 - s0) / d, (l1 - l0) / d
    foreign = max(0.0, (m1 - m0) / d - server_cpu - load_cpu - 0.02)  # 0.02: this process
    if not latencies:
        return Result(0.0, 0.0, 0.0, errors, server_cpu, load_cpu, foreign)
    return Result(
        writes_per_s=len(latencies) / d,
        p50_ms=percentile(latencies, 0.5) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        errors=errors,
        server_cpu=server_cpu,
        load_cpu=load_cpu,
        foreign_cpu=foreign,
    )


async def run_cluster(cluster: Cluster, args: argparse.Namespace) -> dict[int, Result]:
    cluster.start()
    try:
        lead = await cluster.leader()
        addr = lead if args.target == "leader" else ",".join(cluster.endpoints())
        results = {}
        for c in args.clients:
            r = await load(cluster, addr, c, args)
            results[c] = r
            print(f"  {cluster.name:>5} {c:>5} clients {r.writes_per_s:7.0f} writes/s  p50 {r.p50_ms:6.1f} ms  "
                  f"p99 {r.p99_ms:6.1f} ms  err {r.errors}  CPU: servers {r.server_cpu:4.2f} "
                  f"({r.server_us_per_write():.0f} µs/write), load {r.load_cpu:4.2f} "
                  f"({r.load_us_per_write():.0f} µs/write), foreign {r.foreign_cpu:4.2f}", flush=True)
        return results
    finally:
        cluster.stop()


def ensure_etcd(install: bool) -> bool:
    if shutil.which("etcd") and shutil.which("etcdctl"):
        return True
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "etcd-server", "etcd-client"], check=False,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        return bool(shutil.which("etcd") and shutil.which("etcdctl"))
    return False


@dataclass
class Rounds:
    shoal: list[dict[int, Result]] = field(default_factory=list)
    etcd: list[dict[int, Result]] = field(default_factory=list)
    floor: list[dict[int, Result]] = field(default_factory=list)


def _span(values: list[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return format(lo, fmt) if len(values) == 1 or format(lo, fmt) == format(hi, fmt) else \
        f"{format(lo, fmt)}–{format(hi, fmt)}"


def print_table(args: argparse.Namespace, rounds: Rounds) -> None:
    print(f"\nT5: committed writes/s, 3 servers on loopback, fsync on"
          f"{f', {len(rounds.shoal)} rounds (ranges)' if len(rounds.shoal) > 1 else ''}")
    head = f"{'clients':>7} | {'shoal w/s':>11} {'p50 ms':>11} {'p99 ms':>11}"
    if rounds.etcd:
        head += f" | {'etcd w/s':>11} {'p50 ms':>11} {'p99 ms':>11} | {'ratio':>9}  p99 ≤ etcd's"
    if rounds.floor:
        head += f" | {'py floor w/s':>12}"
    print(head)
    print("-" * len(head))
    for c in args.clients:
        s = [r[c] for r in rounds.shoal]
        line = (f"{c:>7} | {_span([r.writes_per_s for r in s], '.0f'):>11} {_span([r.p50_ms for r in s], '.1f'):>11} "
                f"{_span([r.p99_ms for r in s], '.1f'):>11}")
        if rounds.etcd:
            e = [r[c] for r in rounds.etcd]
            ratios = [a.writes_per_s / b.writes_per_s for a, b in zip(s, e) if b.writes_per_s]
            p99_ok = sum(a.p99_ms <= b.p99_ms for a, b in zip(s, e))
            line += (f" | {_span([r.writes_per_s for r in e], '.0f'):>11} {_span([r.p50_ms for r in e], '.1f'):>11} "
                     f"{_span([r.p99_ms for r in e], '.1f'):>11} | {_span(ratios, '.2f') + '×':>9}  "
                     f"{p99_ok}/{len(e)}")
        if rounds.floor:
            line += f" | {_span([r[c].writes_per_s for r in rounds.floor], '.0f'):>12}"
        print(line)
    print("target (T5): ratio ≥ 1.0× at 64 and 1,000 clients, with p99 ≤ etcd's")


async def main_async(args: argparse.Namespace) -> None:
    base = pathlib.Path(args.data_root) if args.data_root else None
    print(f"3 servers on loopback, fsync on, {args.duration:g} s measured after {args.warmup:g} s warm-up, "
          f"{args.value_size}-byte values, {args.key_space} keys, {os.cpu_count()} cores, "
          f"clients to {'every server' if args.target == 'all' else 'the leader'}, "
          f"load generator in up to {args.load_procs} processes", flush=True)
    have_etcd = not args.skip_etcd and ensure_etcd(args.install_etcd)
    if not args.skip_etcd and not have_etcd:
        print("etcd is not installed, so there is no anchor in this run. Install it with\n"
              "  apt-get install etcd-server etcd-client   (Debian; or run with --install-etcd as root)")
    rounds = Rounds()
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        for n in range(args.rounds):
            if args.rounds > 1:
                print(f"round {n + 1}/{args.rounds}", flush=True)
            rounds.shoal.append(await run_cluster(ShoalCluster(pathlib.Path(tmp) / f"shoal{n}"), args))
            if have_etcd:
                rounds.etcd.append(await run_cluster(EtcdCluster(pathlib.Path(tmp) / f"etcd{n}"), args))
            if args.python_floor:
                rounds.floor.append(await run_cluster(FloorServer(pathlib.Path(tmp)), args))
    print_table(args, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd")
    s = sub.add_parser("serve", help="(internal) run one shoal server")
    s.add_argument("--id", type=int, required=True)
    s.add_argument("--peers", required=True)
    s.add_argument("--kv-port", type=int, required=True)
    s.add_argument("--data", required=True)
    f = sub.add_parser("serve-floor", help="(internal) run the do-nothing gRPC server")
    f.add_argument("--kv-port", type=int, required=True)
    ld = sub.add_parser("load", help="(internal) run one load process")
    ld.add_argument("--addr", required=True)
    ld.add_argument("--method", required=True)
    ld.add_argument("--clients", type=int, required=True)
    ld.add_argument("--first-client", type=int, default=0)
    ld.add_argument("--start-at", type=float, required=True)
    ld.add_argument("--warmup", type=float, required=True)
    ld.add_argument("--duration", type=float, required=True)
    ld.add_argument("--value-size", type=int, required=True)
    ld.add_argument("--key-space", type=int, required=True)
    ld.add_argument("--seed", type=int, required=True)
    parser.add_argument("--clients", default="1,64,1000", help="comma-separated concurrent client counts")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per client count")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    parser.add_argument("--rounds", type=int, default=1, help="repeat with fresh clusters; the table shows ranges")
    parser.add_argument("--load-procs", type=int, default=os.cpu_count() or 1,
                        help="most load generator processes (each gets at least 64 clients)")
    parser.add_argument("--value-size", type=int, default=256)
    parser.add_argument("--key-space", type=int, default=10_000)
    parser.add_argument("--data-root", default=None, help="where the clusters' data dirs go (a disk, not tmpfs)")
    parser.add_argument("--target", choices=("all", "leader"), default="all",
                        help="spread clients over every server (default, as etcd's tools do) or send all to the leader")
    parser.add_argument("--skip-etcd", action="store_true", help="measure shoal only")
    parser.add_argument("--python-floor", action="store_true",
                        help="also measure a do-nothing Python gRPC server (the ceiling for any Python server)")
    parser.add_argument("--install-etcd", action="store_true", help="apt-get install etcd when missing (root)")
    args = parser.parse_args()
    use_uvloop()
    if args.cmd == "serve":
        asyncio.run(serve(args))
        return
    if args.cmd == "serve-floor":
        asyncio.run(serve_floor(args))
        return
    if args.cmd == "load":
        asyncio.run(load_worker(args))
        return
    args.clients = [int(c) for c in str(args.clients).split(",")]
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
