#!/usr/bin/env python3
"""T5 (first cut): committed writes/s of 3 `RaftStore` servers vs a 3-member etcd, same run.

Shape: three server processes on loopback (fsync on: SQLite `synchronous=FULL` for
shoal, etcd's WAL fsync for etcd), one load generator (this process) with C concurrent
clients, each sending one write at a time to the leader and waiting for the answer.
Both clusters are driven by the *same* Python gRPC client, over the same kind of call:
a unary `Put(key, value)` whose request is etcd's `PutRequest` wire format (field 1
key, field 2 value). For etcd that is `etcdserverpb.KV/Put` itself; for shoal it is a
bench-only `shoal.bench.Kv/Put` served next to each RaftStore that commits
`Put(kind="nodes", name=key, value={"v": value})` — the controllers' write path
(`Store.commit`), minus the Control API's manifest handling. Keys are drawn from a
fixed key space so state size stays bounded, as in etcd's own benchmark tool.

Prints writes/s, p50 and p99 latency for each cluster and client count, and the ratio.
If `etcd` is not installed it says how to install it (`--install-etcd` does it with
apt-get when run as root) and prints shoal's figures alone.

    python bench/raft_write.py                     # 64 clients, 10 s per run
    python bench/raft_write.py --clients 64,1000 --duration 20
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
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parent.parent

import grpc  # noqa: E402

KV_METHOD_SHOAL = "/shoal.bench.Kv/Put"
KV_METHOD_ETCD = "/etcdserverpb.KV/Put"


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def use_uvloop() -> None:
    if os.environ.get("SHOAL_BENCH_NO_UVLOOP"):
        return
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return
    uvloop.install()


# --- a shoal server process ---------------------------------------------------------------


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
            await store.commit(Txn(ops=(Put(kind="nodes", name=key.decode(), value={"v": value.decode()}),)))
        except NotLeader as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"leader={exc.leader_hint}")
        return b""

    kv = grpc.aio.server()
    kv.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("shoal.bench.Kv", {"Put": grpc.unary_unary_rpc_method_handler(put)}),)
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


# --- clusters -------------------------------------------------------------------------------


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
            proc = subprocess.Popen(
                [sys.executable, __file__, "serve", "--id", str(i), "--peers", peers,
                 "--kv-port", str(kv_port), "--data", str(self.root / f"s{i}")],
                stdout=subprocess.PIPE, text=True, cwd=ROOT,
            )
            self.procs.append(proc)
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
                        await ch.unary_unary(self.method)(put_request(b"probe", b"x"), timeout=2)
                        return addr
                    except grpc.aio.AioRpcError:
                        continue
            await asyncio.sleep(0.1)
        raise SystemExit("no shoal leader within 10 s")

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


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

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


# --- load -----------------------------------------------------------------------------------


@dataclass
class Result:
    writes_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    server_cpu: float = 0.0
    """CPU seconds the three servers used per second of the measured window."""
    client_cpu: float = 0.0


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


async def load(addr: str, method: str, clients: int, duration: float, warmup: float, value_size: int,
               key_space: int, server_pids: list[int]) -> Result:
    channels = [grpc.aio.insecure_channel(addr) for _ in range(max(1, clients // 64))]
    calls = [ch.unary_unary(method) for ch in channels]
    value = b"v" * value_size
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from = start + warmup
    end = measure_from + duration
    rng = random.Random(5)

    async def client(n: int) -> None:
        nonlocal errors
        call = calls[n % len(calls)]
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                return
            key = f"key-{rng.randrange(key_space)}".encode()
            try:
                await call(put_request(key, value), timeout=10)
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            t1 = time.perf_counter()
            if t0 >= measure_from:
                latencies.append(t1 - t0)

    async def cpu_window() -> tuple[float, float]:
        await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
        s0, c0 = cpu_seconds(server_pids), cpu_seconds([os.getpid()])
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        return cpu_seconds(server_pids) - s0, cpu_seconds([os.getpid()]) - c0

    *_, (server_cpu, client_cpu) = await asyncio.gather(*(client(n) for n in range(clients)), cpu_window())
    for ch in channels:
        await ch.close()
    latencies.sort()
    if not latencies:
        return Result(0.0, 0.0, 0.0, errors)
    return Result(
        writes_per_s=len(latencies) / duration,
        p50_ms=statistics.median(latencies) * 1000,
        p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        errors=errors,
        server_cpu=server_cpu / duration,
        client_cpu=client_cpu / duration,
    )


async def run_cluster(cluster: ShoalCluster | EtcdCluster, args: argparse.Namespace) -> dict[int, Result]:
    cluster.start()
    try:
        addr = await cluster.leader()
        results = {}
        for c in args.clients:
            r = await load(addr, cluster.method, c, args.duration, args.warmup, args.value_size, args.key_space,
                           [p.pid for p in cluster.procs])
            results[c] = r
            per_write = r.server_cpu / r.writes_per_s * 1e6 if r.writes_per_s else 0.0
            print(f"{cluster.name:>5}  {c:>5} clients  {r.writes_per_s:8.0f} writes/s  "
                  f"p50 {r.p50_ms:6.1f} ms  p99 {r.p99_ms:6.1f} ms  errors {r.errors}  "
                  f"CPU servers {r.server_cpu:4.2f} cores ({per_write:.0f} µs/write), client {r.client_cpu:4.2f}",
                  flush=True)
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


async def main_async(args: argparse.Namespace) -> None:
    base = pathlib.Path(args.data_root) if args.data_root else None
    print(f"3 servers on loopback, fsync on, {args.duration:g} s per run after {args.warmup:g} s warm-up, "
          f"{args.value_size}-byte values, {args.key_space} keys, {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        shoal = await run_cluster(ShoalCluster(pathlib.Path(tmp) / "shoal"), args)
        if args.skip_etcd:
            return
        if not ensure_etcd(args.install_etcd):
            print("etcd is not installed, so there is no anchor in this run. Install it with\n"
                  "  apt-get install etcd-server etcd-client   (Debian; or run with --install-etcd as root)")
            return
        etcd = await run_cluster(EtcdCluster(pathlib.Path(tmp) / "etcd"), args)
    print("\nT5: shoal / etcd (target: writes/s ratio ≥ 1.0 with p99 ≤ etcd's)")
    for c in args.clients:
        s, e = shoal[c], etcd[c]
        ratio = s.writes_per_s / e.writes_per_s if e.writes_per_s else float("nan")
        print(f"  {c:>5} clients: {ratio:5.2f}× writes/s   p99 {s.p99_ms:.1f} ms vs {e.p99_ms:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd")
    s = sub.add_parser("serve", help="(internal) run one shoal server")
    s.add_argument("--id", type=int, required=True)
    s.add_argument("--peers", required=True)
    s.add_argument("--kv-port", type=int, required=True)
    s.add_argument("--data", required=True)
    parser.add_argument("--clients", default="64", help="comma-separated concurrent client counts (default 64)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--value-size", type=int, default=256)
    parser.add_argument("--key-space", type=int, default=10_000)
    parser.add_argument("--data-root", default=None, help="where the clusters' data dirs go (a disk, not tmpfs)")
    parser.add_argument("--skip-etcd", action="store_true", help="measure shoal only")
    parser.add_argument("--install-etcd", action="store_true", help="apt-get install etcd when missing (root)")
    args = parser.parse_args()
    use_uvloop()
    if args.cmd == "serve":
        asyncio.run(serve(args))
        return
    args.clients = [int(c) for c in str(args.clients).split(",")]
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
