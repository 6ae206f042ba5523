#!/usr/bin/env python3
"""T4: a new leader accepting writes after the leader's `kill -9` under load, shoal vs etcd.

Shape: three servers on loopback (fsync on), a few clients in this process each writing
unique keys one at a time, retrying until acknowledged. Repeatedly: wait until writes
flow, `kill -9` the leader, and time until a client sees its first write acknowledged by
a new leader — an acknowledgement from a server other than the killed one, for an
attempt sent after the kill (a write sent before could have been committed by the old
leader). Then restart the killed server, wait until it has caught up, and read every
key back through a linearizable read: no acknowledged write may be missing.

shoal runs as three `python -m tests.raft_kv` servers (one `RaftStore` each, the
product's default Raft and transport settings, uvloop when installed, as `shoal
agent` does); the clients are `tests.raft_kv.KvClient`: a write goes to the leader it
knows, follows "not leader" hints, moves to the next server on an error, 1 s per
attempt, a 10 ms pause after trying every server. etcd runs as a 3-member cluster
(`/usr/bin/etcd` from Debian, all defaults: 100 ms heartbeat, 1 s election timeout)
driven by the same kind of client over etcd's own gRPC API (`KV/Put`, `KV/Range`,
`Maintenance/Status`): 1 s per attempt, next member on an error, the same pause.

Prints each kill's time, then p50 and p99 (nearest rank: with 10 kills p99 is the
worst one) for each system and the ratio. Target: shoal p99 ≤ 1 s, no acknowledged
write lost. If etcd is missing it says how to install it (`--install-etcd` does,
as root) and prints shoal's figures alone.

    python bench/raft_failover.py                 # 10 kills each
    python bench/raft_failover.py --kills 50      # tighter percentiles
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import pathlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from tests.raft_kv import KvClient, KvCluster, KvConnection, Status, free_ports  # noqa: E402

RPC_TIMEOUT = 1.0
"""Seconds a client waits for one attempt, for both systems (`--rpc-timeout`). It counts
for etcd, whose followers forward a write to the leader and hold it until it answers:
a write forwarded to the killed leader is retried only when the attempt times out.
shoal's followers answer "not leader" at once and a dead server's connection is
refused, so its clients never wait out an attempt during a failover."""
RETRY_PAUSE = 0.01
"""Seconds a client pauses after every server failed once, for both systems."""
WRITES_BEFORE_KILL = 20
"""Writes acknowledged since the cluster was whole again before the next kill."""


# -- the load ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ack:
    """One acknowledged write."""

    at: float
    sent: float
    """When the attempt that was answered was sent."""
    server: int
    term: int
    """The answering server's Raft term."""
    new_write: bool
    """False for an answer that proves nothing about the leader: shoal answers a retry of
    a write already applied from its sessions, on any server."""
    key: str
    value: str


@dataclass(frozen=True, slots=True)
class PutResult:
    ok: bool
    sent: float = 0.0
    server: int = 0
    term: int = 0
    new_write: bool = True


PutFn = Callable[[str, str], Awaitable[PutResult]]


@dataclass
class Writers:
    """`clients` concurrent writers of unique keys, one write at a time each."""

    make_put: Callable[[int], PutFn]
    clients: int
    acks: list[Ack] = field(default_factory=list)
    unacked: int = 0

    def __post_init__(self) -> None:
        self._stop = asyncio.Event()
        self._changed = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []

    async def _writer(self, n: int) -> None:
        put = self.make_put(n)
        i = 0
        while not self._stop.is_set():
            i += 1
            key, value = f"w/{n}/{i}", f"{n}.{i}"
            r = await put(key, value)
            if not r.ok:
                self.unacked += 1
                continue
            self.acks.append(Ack(time.monotonic(), r.sent, r.server, r.term, r.new_write, key, value))
            async with self._changed:
                self._changed.notify_all()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._writer(n)) for n in range(self.clients)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def first(self, pred: Callable[[Ack], bool], count: int = 1, timeout: float = 60.0) -> Ack:
        """The first of the first `count` acknowledgements `pred` accepts (waits for them)."""

        def found() -> list[Ack]:
            return [a for a in self.acks if pred(a)]

        async def wait() -> Ack:
            async with self._changed:
                await self._changed.wait_for(lambda: len(found()) >= count)
            return found()[0]

        return await asyncio.wait_for(wait(), timeout)


# -- the two systems ---------------------------------------------------------------------------


class System(Protocol):
    name: str
    ids: list[int]

    async def start(self) -> None: ...
    async def leader(self) -> int: ...
    async def term(self, i: int) -> int: ...
    def kill(self, i: int) -> None: ...
    async def restart(self, i: int) -> None: ...
    def make_put(self, n: int) -> PutFn: ...
    async def read_all(self, prefix: str) -> dict[str, str]: ...
    async def close(self) -> None: ...


class Shoal:
    name = "shoal"

    def __init__(self, root: pathlib.Path, rpc_timeout: float = RPC_TIMEOUT) -> None:
        self.rpc_timeout = rpc_timeout
        self.cluster = KvCluster(root, server_args=("--uvloop",))
        self.ids = self.cluster.ids
        self.conn: KvConnection | None = None

    async def start(self) -> None:
        self.cluster.start_all()
        self.conn = KvConnection(self.cluster.client_addresses, rpc_timeout=self.rpc_timeout)
        await self.cluster.leader(self.conn, timeout=30.0, settled=True)

    async def leader(self) -> int:
        assert self.conn is not None
        return await self.cluster.leader(self.conn, timeout=30.0)

    async def term(self, i: int) -> int:
        assert self.conn is not None
        st = await self.conn.status(i)
        return int(st["term"]) if st is not None else 0

    def kill(self, i: int) -> None:
        self.cluster.kill(i)

    async def restart(self, i: int) -> None:
        assert self.conn is not None
        self.cluster.start(i)
        await self.cluster.caught_up(self.conn, i, timeout=30.0)

    def make_put(self, n: int) -> PutFn:
        assert self.conn is not None
        client = KvClient(self.conn, f"bench-{n}-{os.getpid()}", op_timeout=60.0)
        client.RETRY_BACKOFF = RETRY_PAUSE

        async def put(key: str, value: str) -> PutResult:
            reply = await client.put(key, value)
            return PutResult(reply.status is Status.OK, reply.sent, reply.server, reply.term, reply.from_leader)

        return put

    async def read_all(self, prefix: str) -> dict[str, str]:
        assert self.conn is not None
        reply = await KvClient(self.conn, "bench-check").scan(prefix, timeout=30.0)
        if not reply.ok:
            raise SystemExit(f"shoal: cannot read the keys back: {reply.error}")
        return dict(reply.value)

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
        self.cluster.close()


# etcd's gRPC API, with just enough protobuf to speak it (field numbers from etcd's
# rpc.proto): PutRequest{key=1, value=2}, RangeRequest{key=1, range_end=2},
# RangeResponse{kvs=2}, KeyValue{key=1, value=5}, StatusResponse{header=1, leader=4,
# raftIndex=5, raftTerm=6, raftAppliedIndex=7}, ResponseHeader{member_id=2}.


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _bytes_field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _decode(data: bytes) -> dict[int, list[Any]]:
    fields: dict[int, list[Any]] = {}
    i = 0

    def varint() -> int:
        nonlocal i
        n = shift = 0
        while True:
            b = data[i]
            i += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n

    while i < len(data):
        tag = varint()
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value: Any = varint()
        elif wire == 2:
            n = varint()
            value, i = data[i : i + n], i + n
        elif wire == 1:
            value, i = data[i : i + 8], i + 8
        elif wire == 5:
            value, i = data[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


class Etcd:
    name = "etcd"

    def __init__(self, root: pathlib.Path, rpc_timeout: float = RPC_TIMEOUT) -> None:
        self.rpc_timeout = rpc_timeout
        self.root = root
        self.ids = [1, 2, 3]
        ports = free_ports(6)
        self.peer_ports = dict(zip(self.ids, ports[:3], strict=True))
        self.client_ports = dict(zip(self.ids, ports[3:], strict=True))
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.channels: dict[int, grpc.aio.Channel] = {}
        self.member_ids: dict[int, int] = {}

    def _spawn(self, i: int) -> None:
        initial = ",".join(f"e{j}=http://127.0.0.1:{p}" for j, p in self.peer_ports.items())
        cport, pport = self.client_ports[i], self.peer_ports[i]
        # An existing data dir wins over the --initial-* flags, so a restart is the same command.
        self.procs[i] = subprocess.Popen(
            ["etcd", "--name", f"e{i}", "--data-dir", str(self.root / f"e{i}"),
             "--listen-client-urls", f"http://127.0.0.1:{cport}",
             "--advertise-client-urls", f"http://127.0.0.1:{cport}",
             "--listen-peer-urls", f"http://127.0.0.1:{pport}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{pport}",
             "--initial-cluster", initial, "--initial-cluster-state", "new",
             "--initial-cluster-token", "bench-failover", "--logger", "zap", "--log-level", "error"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    async def start(self) -> None:
        for i in self.ids:
            self._spawn(i)
        options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.enable_http_proxy", 0),
                   ("grpc.enable_retries", 0), ("grpc.initial_reconnect_backoff_ms", 50),
                   ("grpc.min_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 250)]
        self.channels = {i: grpc.aio.insecure_channel(f"127.0.0.1:{p}", options=options)
                         for i, p in self.client_ports.items()}
        await self.leader()

    async def _status(self, i: int) -> dict[int, list[Any]] | None:
        try:
            raw = await self.channels[i].unary_unary("/etcdserverpb.Maintenance/Status")(b"", timeout=0.5)
        except grpc.aio.AioRpcError:
            return None
        st = _decode(raw)
        self.member_ids[i] = _decode(st[1][0])[2][0]
        return st

    def _alive(self) -> list[int]:
        return [i for i, p in self.procs.items() if p.poll() is None]

    async def leader(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive = self._alive()
            statuses = await asyncio.gather(*(self._status(i) for i in alive))
            if all(statuses):
                leaders = {st[4][0] if 4 in st else 0 for st in statuses if st is not None}
                if len(leaders) == 1 and (lead := leaders.pop()):
                    for i, mid in self.member_ids.items():
                        if mid == lead and i in alive:
                            return i
            await asyncio.sleep(0.05)
        raise SystemExit(f"etcd: no leader agreed within {timeout:g} s")

    async def term(self, i: int) -> int:
        st = await self._status(i)
        return int(st[6][0]) if st is not None and 6 in st else 0

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    async def restart(self, i: int) -> None:
        self._spawn(i)
        lead = await self.leader()
        st = await self._status(lead)
        target = st[5][0] if st is not None else 0
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            mine = await self._status(i)
            if mine is not None and mine.get(7, [0])[0] >= target:
                return
            await asyncio.sleep(0.05)
        raise SystemExit(f"etcd: member {i} did not catch up within 30 s")

    def make_put(self, n: int) -> PutFn:
        state = {"target": self.ids[n % len(self.ids)]}

        async def put(key: str, value: str) -> PutResult:
            request = _bytes_field(1, key.encode()) + _bytes_field(2, value.encode())
            tried: set[int] = set()
            while True:
                if len(tried) == len(self.ids):
                    tried.clear()
                    await asyncio.sleep(RETRY_PAUSE)
                target = state["target"]
                tried.add(target)
                sent = time.monotonic()
                try:
                    call = self.channels[target].unary_unary("/etcdserverpb.KV/Put")
                    raw = await call(request, timeout=self.rpc_timeout)
                except grpc.aio.AioRpcError:
                    state["target"] = self.ids[(self.ids.index(target) + 1) % len(self.ids)]
                    continue
                header = _decode(_decode(raw)[1][0])
                return PutResult(True, sent, target, int(header.get(4, [0])[0]))

        return put

    async def read_all(self, prefix: str) -> dict[str, str]:
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        request = _bytes_field(1, prefix.encode()) + _bytes_field(2, end.encode())
        lead = await self.leader()
        raw = await self.channels[lead].unary_unary("/etcdserverpb.KV/Range")(request, timeout=30.0)
        out = {}
        for kv in _decode(raw).get(2, []):
            f = _decode(kv)
            out[f[1][0].decode()] = f.get(5, [b""])[0].decode()
        return out

    async def close(self) -> None:
        for ch in self.channels.values():
            await ch.close()
        for i, proc in self.procs.items():
            if proc.poll() is None:
                self.kill(i)


# -- the measurement ---------------------------------------------------------------------------


@dataclass
class Result:
    failovers: list[float]
    lost: int
    acked: int


def quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile."""
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


async def measure(system: System, kills: int, clients: int) -> Result:
    await system.start()
    writers = Writers(system.make_put, clients)
    failovers: list[float] = []
    lost = 0
    try:
        writers.start()
        for k in range(1, kills + 1):
            since = time.monotonic()
            await writers.first(lambda a, since=since: a.at > since, count=WRITES_BEFORE_KILL)
            # Asked right before the kill: leadership can move while writes flow (a loaded
            # machine stalls a leader past an election timeout now and then).
            old = await system.leader()
            term = await system.term(old)
            killed_at = time.monotonic()
            system.kill(old)
            # A write of a later term, sent after the kill, answered as a new write.
            first = await writers.first(
                lambda a, t=killed_at, term=term: a.at > t and a.sent > t and a.term > term and a.new_write
            )
            failovers.append(first.at - killed_at)
            await system.restart(old)
            checked_at = time.monotonic()
            stored = await system.read_all("w/")
            missing = [a for a in writers.acks if a.at <= checked_at and stored.get(a.key) != a.value]
            lost += len(missing)
            print(f"  {system.name:>5} kill {k:>3}: leader {old} (term {term}) killed, first write acknowledged by "
                  f"server {first.server} (term {first.term}) after {failovers[-1] * 1000:7.1f} ms; "
                  f"{len(stored)} keys read back, {len(missing)} acknowledged writes missing", flush=True)
        await writers.stop()
    finally:
        await system.close()
    return Result(failovers, lost, len(writers.acks))


def ensure_etcd(install: bool) -> bool:
    if shutil.which("etcd"):
        return True
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "etcd-server", "etcd-client"], check=False, env=env)
    return shutil.which("etcd") is not None


def summary(name: str, r: Result) -> str:
    f = r.failovers
    return (f"  {name:>5}: p50 {statistics.median(f) * 1000:7.1f} ms   p99 {quantile(f, 0.99) * 1000:7.1f} ms   "
            f"max {max(f) * 1000:7.1f} ms   ({len(f)} kills, {r.acked} writes acknowledged, {r.lost} lost)")


async def main_async(args: argparse.Namespace) -> int:
    base = pathlib.Path(args.data_root) if args.data_root else None
    print(f"T4: leader kill -9 under load -> first write acknowledged by a new leader; 3 servers on loopback, "
          f"{args.clients} writing clients, {args.rpc_timeout:g} s per attempt, {args.kills} kills, "
          f"{os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory(prefix="raft-failover-", dir=base) as tmp:
        shoal = await measure(Shoal(pathlib.Path(tmp) / "shoal", args.rpc_timeout), args.kills, args.clients)
        etcd: Result | None = None
        if args.skip_etcd:
            pass
        elif ensure_etcd(args.install_etcd):
            etcd = await measure(Etcd(pathlib.Path(tmp) / "etcd", args.rpc_timeout), args.kills, args.clients)
        else:
            print("etcd is not installed, so there is no anchor in this run. Install it with\n"
                  "  apt-get install etcd-server etcd-client   (Debian; or run with --install-etcd as root)")
    print("\nT4 (target: shoal p99 <= 1 s, no acknowledged write lost)")
    print(summary("shoal", shoal))
    if etcd is not None:
        print(summary("etcd", etcd))
        p50 = statistics.median(etcd.failovers) / statistics.median(shoal.failovers)
        p99 = quantile(etcd.failovers, 0.99) / quantile(shoal.failovers, 0.99)
        print(f"  etcd / shoal: p50 {p50:.2f}x   p99 {p99:.2f}x  (shoal is that many times faster)")
    ok = quantile(shoal.failovers, 0.99) <= 1.0 and shoal.lost == 0
    print(f"  shoal {'meets' if ok else 'MISSES'} the target")
    return 0 if shoal.lost == 0 else 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=10, help="leader kills per system (default 10)")
    p.add_argument("--clients", type=int, default=4, help="concurrent writing clients (default 4)")
    p.add_argument("--rpc-timeout", type=float, default=RPC_TIMEOUT,
                   help=f"seconds a client waits for one attempt, both systems (default {RPC_TIMEOUT:g})")
    p.add_argument("--data-root", default=None, help="where the data dirs go (a disk, not tmpfs)")
    p.add_argument("--skip-etcd", action="store_true", help="measure shoal only")
    p.add_argument("--install-etcd", action="store_true", help="apt-get install etcd when missing (root)")
    args = p.parse_args()
    if args.kills < 1 or args.clients < 1 or args.rpc_timeout <= 0:
        p.error("--kills and --clients must be ≥ 1, --rpc-timeout > 0")
    raise SystemExit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
