"""Three Raft KV server processes on loopback under crashes, pauses and partitions.

Each server is a real process (`tests/raft_kv.py`: one `RaftStore` + a small KV
service). A few concurrent clients put, get and compare-and-set on a handful of keys,
and put unique keys ("log" writes), while a test kills the leader with SIGKILL and
restarts it, pauses it past an election timeout, cuts it off from the majority, or
restarts every server at once. Every operation is recorded (invoked, returned ok /
failed for sure / unknown, with times) and the history is checked with the
Wing–Gong linearizability checker (`shoal.leader.raft.linearizability`); afterwards
every acknowledged log write must be on every server.

Partitions: server i dials server j's Raft port at 127.<net>.i.j, so each directed
link has its own loopback address (`KvCluster(per_link=True)`); an nftables table of
this run's own drops, at prerouting (a silent drop, like a dead link), every packet to
or from the addresses of the links being cut. Nothing else on the machine matches
those addresses; the table is deleted at the end, and one left by a crashed run (its
pid is in the name) is deleted by the next run. Without root or `nft` the partition
tests skip.

One cluster serves the module; before each test every server is resumed, restarted
if dead and reconnected, and a leader is agreed. Every wait has a deadline; the
servers die with the test process whatever happens (`--parent-pid`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import random
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import pytest

from shoal.leader.raft.linearizability import KVInput, Operation, OpKind, check
from tests.helpers import eventually
from tests.raft_kv import KvClient, KvCluster, KvConnection, Reply, Status

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

CLIENTS = 4
KEYS = 3
OP_TIMEOUT = 4.0
"""Seconds a client keeps retrying one operation: several election timeouts."""
MAX_OPS_PER_CLIENT = 1500
"""Bounds a history (and so the checker's work) whatever the machine's speed."""


# -- partitions: an nftables table on loopback --------------------------------------------------


class LoopbackCuts:
    """Silently drop loopback packets to or from chosen addresses (see module docstring)."""

    PREFIX = "shoal_kv_"

    def __init__(self) -> None:
        self.table = f"{self.PREFIX}{os.getpid()}_{random.randrange(1 << 16):04x}"
        self.created = False

    @staticmethod
    def available() -> str | None:
        """Why this machine cannot cut links, or None when it can."""
        if os.geteuid() != 0:
            return "nftables rules need root"
        if shutil.which("nft") is None:
            return "`nft` not found (install nftables)"
        return None

    def _nft(self, script: str) -> None:
        p = subprocess.run(["nft", "-f", "-"], input=script, text=True, capture_output=True, timeout=10)
        if p.returncode != 0:
            raise RuntimeError(f"nft failed: {p.stderr.strip()}\n{script}")

    def create(self) -> None:
        self._remove_leftovers()
        self._nft(
            f"table ip {self.table} {{\n"
            "  set cut { type ipv4_addr; }\n"
            # prerouting: the packet was sent and is lost on the way, as on a dead link;
            # a drop at output would fail the sender's send() with EPERM instead.
            "  chain pre { type filter hook prerouting priority -300; policy accept;\n"
            "    ip daddr @cut drop\n"
            "    ip saddr @cut drop\n"
            "  }\n"
            "}\n"
        )
        self.created = True

    def cut(self, addresses: set[str]) -> None:
        self._nft(f"add element ip {self.table} cut {{ {', '.join(sorted(addresses))} }}\n")

    def heal(self) -> None:
        if self.created:
            self._nft(f"flush set ip {self.table} cut\n")

    def close(self) -> None:
        if self.created:
            self.created = False
            self._nft(f"delete table ip {self.table}\n")

    def exists(self) -> bool:
        p = subprocess.run(["nft", "list", "tables", "ip"], capture_output=True, text=True, timeout=10)
        return f"table ip {self.table}" in p.stdout.splitlines()

    def _remove_leftovers(self) -> None:
        """Tables of runs whose process is gone (killed before their teardown)."""
        p = subprocess.run(["nft", "list", "tables", "ip"], capture_output=True, text=True, timeout=10)
        for m in re.finditer(rf"^table ip ({self.PREFIX}(\d+)_[0-9a-f]+)$", p.stdout, re.M):
            if not pathlib.Path(f"/proc/{m.group(2)}").exists():
                self._nft(f"delete table ip {m.group(1)}\n")


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KvCluster]:
    cluster = KvCluster(tmp_path_factory.mktemp("raft-kv"), per_link=True, server_args=("--log-level", "info"))
    cluster.start_all()
    try:
        yield cluster
    finally:
        pids = [s.proc.pid for s in cluster.servers.values() if s.proc is not None]
        cluster.close()
        assert not [pid for pid in pids if pathlib.Path(f"/proc/{pid}").exists()], "a server outlived the module"


@pytest.fixture(scope="module")
def cuts() -> Iterator[LoopbackCuts | None]:
    if LoopbackCuts.available() is not None:
        yield None
        return
    c = LoopbackCuts()
    c.create()
    try:
        yield c
    finally:
        c.close()
        assert not c.exists(), f"nft table {c.table} outlived the module"


@dataclass
class Harness:
    servers: KvCluster
    conn: KvConnection
    cuts: LoopbackCuts | None

    async def leader(self, timeout: float = 10.0) -> int:
        return await self.servers.leader(self.conn, timeout)

    def cut_off(self, i: int) -> None:
        if self.cuts is None:
            pytest.skip(f"cannot cut links: {LoopbackCuts.available()}")
        self.cuts.cut(self.servers.link_addresses(i))


@pytest.fixture
async def kv(servers: KvCluster, cuts: LoopbackCuts | None) -> AsyncIterator[Harness]:
    """The module's cluster, whole again: every server running, no link cut, a leader."""
    if cuts is not None:
        cuts.heal()
    for i in servers.ids:
        if servers.servers[i].stopped:
            servers.cont(i)
        if not servers.alive(i):
            servers.start(i)
    conn = KvConnection(servers.client_addresses, rpc_timeout=1.0)
    try:
        await servers.leader(conn, timeout=20.0, among=servers.ids, settled=True)
        yield Harness(servers, conn, cuts)
    finally:
        await conn.close()
        # Captured output: shown only when the test failed.
        print(servers.diagnose())


# -- the workload and its history ----------------------------------------------------------------


@dataclass
class Workload:
    """CLIENTS concurrent clients, each one operation at a time, recording a history."""

    conn: KvConnection
    prefix: str
    forward: bool = False
    """Puts go to a server of their own per client (round-robin), which forwards them."""
    seed: int = field(default_factory=lambda: random.randrange(1 << 30))
    history: list[Operation] = field(default_factory=list)
    acked_logs: dict[str, str] = field(default_factory=dict)
    write_acks: list[tuple[float, int]] = field(default_factory=list)
    """(time, server) of every write a leader acknowledged, or a server that forwarded it
    (not retries answered from the sessions by a follower)."""
    counts: dict[Status, int] = field(default_factory=lambda: {s: 0 for s in Status})

    def __post_init__(self) -> None:
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def key(self, k: int) -> str:
        return f"{self.prefix}/r{k}"

    def _record(self, client: int, inp: KVInput, call: float, reply: Reply) -> None:
        self.counts[reply.status] += 1
        if reply.status is Status.FAIL:
            return  # never took effect: not part of the history
        ret = time.monotonic() if reply.ok else None
        output: object = None
        if reply.ok and inp.kind is OpKind.GET:
            output = reply.value
        elif reply.ok and inp.kind is OpKind.CAS:
            output = bool(reply.value)
        self.history.append(Operation(client=client, input=inp, call=call, ret=ret, output=output))
        if reply.ok and (reply.from_leader or reply.forwarded) and inp.kind is not OpKind.GET and ret is not None:
            self.write_acks.append((ret, reply.server))

    async def _client(self, n: int) -> None:
        rng = random.Random(self.seed * 100 + n)
        via = self.conn.ids[n % len(self.conn.ids)] if self.forward else 0
        cl = KvClient(self.conn, f"{self.prefix}-c{n}-{self.seed}", op_timeout=OP_TIMEOUT, rng=rng, forward_via=via)
        seen: dict[str, str | None] = {}
        for i in range(MAX_OPS_PER_CLIENT):
            if self._stop.is_set():
                return
            key = self.key(rng.randrange(KEYS))
            value = f"{n}.{i}"
            r = rng.random()
            call = time.monotonic()
            if r < 0.3:
                reply = await cl.put(key, value)
                if reply.ok:
                    seen[key] = value  # so that a later CAS of this client has a fair chance
                self._record(n, KVInput(kind=OpKind.PUT, key=key, value=value), call, reply)
            elif r < 0.6:
                reply = await cl.get(key)
                if reply.ok:
                    seen[key] = reply.value
                self._record(n, KVInput(kind=OpKind.GET, key=key), call, reply)
            elif r < 0.8:
                expected = seen.get(key)
                reply = await cl.cas(key, expected, value)
                if reply.ok and reply.value:
                    seen[key] = value
                self._record(n, KVInput(kind=OpKind.CAS, key=key, value=value, expected=expected), call, reply)
            else:
                log_key = f"{self.prefix}/log/{n}/{i}"
                reply = await cl.put(log_key, value)
                self._record(n, KVInput(kind=OpKind.PUT, key=log_key, value=value), call, reply)
                if reply.ok:
                    self.acked_logs[log_key] = value

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client(n), name=f"client-{n}") for n in range(CLIENTS)]

    async def stop(self) -> None:
        """Let every client finish its operation in flight (bounded by OP_TIMEOUT)."""
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), OP_TIMEOUT + 5)

    async def acked_writes(self, count: int, *, since: float, by: Callable[[int], bool] = lambda s: True,
                           timeout: float = 10.0) -> float:
        """Wait for `count` writes acknowledged after `since` by servers `by` accepts;
        returns the time of the first of them."""

        def enough() -> float | None:
            acks = [t for t, s in self.write_acks if t > since and by(s)]
            if any(t.done() and t.exception() for t in self._tasks):
                raise AssertionError("a client failed: " + repr([t.exception() for t in self._tasks if t.done()]))
            if all(t.done() for t in self._tasks):
                raise AssertionError(f"every client did its {MAX_OPS_PER_CLIENT} operations")
            return acks[0] if len(acks) >= count else None

        return float(await eventually(enough, timeout, 0.01, what=f"{count} writes acknowledged"))

    async def verify(self, h: Harness) -> None:
        """Final reads into the history, the linearizability check, and every
        acknowledged log write on every server."""
        reader = KvClient(h.conn, f"{self.prefix}-final", op_timeout=10.0)
        for i in h.servers.ids:
            for k in range(KEYS):
                call = time.monotonic()
                reply = await reader.get(self.key(k), server=i)
                assert reply.ok, f"final read of {self.key(k)} on server {i}: {reply.error}"
                self._record(100 + i, KVInput(kind=OpKind.GET, key=self.key(k)), call, reply)
        result = check(self.history)
        summary = {s.value: c for s, c in self.counts.items()}
        dump = h.servers.root / f"{self.prefix}-history.jsonl"
        with open(dump, "w") as f:
            for op in self.history:
                i = op.input
                record = {"client": op.client, "kind": i.kind.value, "key": i.key, "value": i.value,
                          "expected": i.expected, "call": op.call, "ret": op.ret, "output": op.output}
                f.write(json.dumps(record) + "\n")
        print(f"{len(self.history)} operations {summary}: {result.verdict.value} (history: {dump})")
        assert result.ok, result.explain()
        assert self.counts[Status.OK] > 20, f"too little progress to mean anything: {summary}"
        for i in h.servers.ids:
            reply = await reader.scan(f"{self.prefix}/log/", server=i, timeout=10.0)
            assert reply.ok, f"scan on server {i}: {reply.error}"
            missing = {k: v for k, v in self.acked_logs.items() if reply.value.get(k) != v}
            assert not missing, f"server {i} lost acknowledged writes: {sorted(missing)[:10]}"


@contextlib.asynccontextmanager
async def running(h: Harness, prefix: str, *, forward: bool = False) -> AsyncIterator[Workload]:
    w = Workload(h.conn, prefix, forward=forward)
    print(f"workload seed {w.seed}")
    w.start()
    try:
        yield w
    finally:
        await w.stop()


# -- tests ------------------------------------------------------------------------------------------


ROUNDS = 2
"""Faults per test: the second hits a leader elected under load after the first."""


async def kill_leaders_under_load(kv: Harness, w: Workload, *, acked: str) -> None:
    """ROUNDS times: kill -9 the leader while `w` writes, report how soon a survivor
    acknowledged a write (`acked` says how it reached one), restart the old leader and
    wait for it to catch up and for writes to flow again."""
    await w.acked_writes(20, since=0.0)
    for _ in range(ROUNDS):
        old = await kv.leader()
        killed_at = time.monotonic()
        kv.servers.kill(old)
        first = await w.acked_writes(10, since=killed_at, by=lambda s, old=old: s != old)
        print(f"first write acknowledged {acked} {first - killed_at:.3f} s after kill -9 of {old}")
        kv.servers.start(old)
        await kv.servers.caught_up(kv.conn, old, timeout=15.0)
        await w.acked_writes(20, since=time.monotonic())


async def test_leader_killed_and_restarted_under_load(kv: Harness) -> None:
    async with running(kv, "kill") as w:
        await kill_leaders_under_load(kv, w, acked="by a new leader")
    await w.verify(kv)


async def test_writes_through_followers_while_the_leader_is_killed(kv: Harness) -> None:
    # Puts go to every server; followers forward them and re-forward what the killed
    # leader may have lost. Each must apply once (the history says so) and none that
    # was acknowledged may be lost.
    async with running(kv, "fwd", forward=True) as w:
        await kill_leaders_under_load(kv, w, acked="through a surviving server")
    assert sum(1 for op in w.history if op.input.kind is OpKind.PUT and op.ret is not None) > 40
    await w.verify(kv)


async def test_a_leader_stopped_with_sigterm_hands_over_and_loses_no_write(kv: Harness) -> None:
    async with running(kv, "term") as w:
        await w.acked_writes(20, since=0.0)
        old = await kv.leader()
        stopped_at = time.monotonic()
        kv.servers.terminate(old)
        first = await w.acked_writes(10, since=stopped_at, by=lambda s: s != old)
        print(f"first write acknowledged by the new leader {first - stopped_at:.3f} s after SIGTERM of {old}")
        assert "raft.transferring_leadership" in kv.servers.log(old, tail=200), "the leader handed over"
        kv.servers.start(old)
        await kv.servers.caught_up(kv.conn, old, timeout=15.0)
    await w.verify(kv)


async def test_leader_paused_past_an_election_timeout(kv: Harness) -> None:
    async with running(kv, "pause") as w:
        await w.acked_writes(20, since=0.0)
        for _ in range(ROUNDS):
            old = await kv.leader()
            stopped_at = time.monotonic()
            kv.servers.stop(old)
            # Paused until a new leader has acknowledged writes: longer than any election timeout.
            await w.acked_writes(10, since=stopped_at, by=lambda s, old=old: s != old)
            kv.servers.cont(old)
            await kv.servers.caught_up(kv.conn, old)
            await w.acked_writes(20, since=time.monotonic())
    await w.verify(kv)


async def test_leader_partitioned_from_the_majority(kv: Harness) -> None:
    async with running(kv, "partition") as w:
        await w.acked_writes(20, since=0.0)
        for _ in range(ROUNDS):
            old = await kv.leader()
            cut_at = time.monotonic()
            kv.cut_off(old)
            await w.acked_writes(10, since=cut_at, by=lambda s, old=old: s != old)

            # Check-quorum: the old leader steps down on its own, without hearing anyone.
            async def stepped_down(old: int = old) -> bool:
                st = await kv.conn.status(old)
                return st is not None and st["role"] != "leader"

            await eventually(stepped_down, 5.0, 0.02, what=f"server {old} to step down while cut off")
            assert kv.cuts is not None
            kv.cuts.heal()
            await kv.servers.caught_up(kv.conn, old)
            await w.acked_writes(20, since=time.monotonic())
    await w.verify(kv)


async def test_every_server_restarted_at_once(kv: Harness) -> None:
    async with running(kv, "restart-all") as w:
        await w.acked_writes(20, since=0.0)
        for i in kv.servers.ids:
            kv.servers.kill(i)
        restarted_at = time.monotonic()
        kv.servers.start_all()
        await kv.leader(timeout=20.0)
        await w.acked_writes(20, since=restarted_at, timeout=20.0)
    await w.verify(kv)


def _bytes_waiting(port: int) -> int:
    """Bytes received but not yet read by the server on 127.0.0.1:`port` from clients
    on 127.0.0.1 (Raft links use other addresses), from /proc/net/tcp{,6} (gRPC listens
    on dual-stack sockets: 127.0.0.1 shows as ::ffff:127.0.0.1)."""
    loopback = "0100007F"  # 127.0.0.1, as the kernel prints it
    waiting = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in pathlib.Path(table).read_text().splitlines()[1:]:
            f = line.split()
            local, remote, state = f[1], f[2], f[3]
            if local.endswith(f"{loopback}:{port:04X}") and remote.split(":")[0].endswith(loopback) and state == "01":
                waiting += int(f[4].split(":")[1], 16)
    return waiting


async def _deposed_leader_read(kv: Harness, prefix: str, *, pause: bool) -> None:
    """Write `old`, depose the leader (pause it, or cut it off), write `new` through its
    successor, then read at the deposed leader: the read fails or sees `new`, never `old`."""
    key = f"{prefix}/x"
    writer = KvClient(kv.conn, f"{prefix}-writer", op_timeout=10.0)
    assert (await writer.put(key, "old")).ok
    old = await kv.leader()
    if pause:
        kv.servers.stop(old)
    else:
        kv.cut_off(old)
    kv.conn.leader = next(i for i in kv.servers.ids if i != old)
    reply = await writer.put(key, "new")
    assert reply.ok and reply.server != old, reply
    reader = KvClient(kv.conn, f"{prefix}-reader")
    read = asyncio.create_task(reader.get(key, server=old, timeout=3.0))
    if pause:
        # The read is queued at the paused server before it resumes, so it may be
        # handled before any message from its peers tells it that it was deposed.
        port = kv.servers.servers[old].port
        await eventually(lambda: _bytes_waiting(port) > 0, 3.0, 0.005, what="the read to reach the paused server")
        kv.servers.cont(old)
    got = await read
    print(f"read at the deposed leader {old}: {got}")
    assert not got.ok or got.value == "new", f"deposed leader {old} served a stale read: {got}"
    if not pause:
        assert kv.cuts is not None
        kv.cuts.heal()

    async def fresh() -> bool:
        r = await reader.get(key, server=old, timeout=1.0)
        return r.ok and r.value == "new"

    await eventually(fresh, 10.0, 0.02, what=f"server {old} to serve the new value")


async def test_paused_leader_does_not_serve_a_stale_read(kv: Harness) -> None:
    await _deposed_leader_read(kv, "stale-pause", pause=True)


async def test_partitioned_leader_does_not_serve_a_stale_read(kv: Harness) -> None:
    await _deposed_leader_read(kv, "stale-cut", pause=False)


async def test_concurrent_compare_and_set_increments_are_not_lost(kv: Harness) -> None:
    key = "counter/x"
    wins = 0

    async def incrementer(n: int) -> None:
        nonlocal wins
        cl = KvClient(kv.conn, f"counter-{n}")
        for _ in range(15):
            current = await cl.get(key)
            assert current.ok, current
            value = str(int(current.value or 0) + 1)
            reply = await cl.cas(key, current.value, value)
            assert reply.status is not Status.UNKNOWN, "no fault here: every CAS has an answer"
            if reply.ok and reply.value:
                wins += 1

    await asyncio.gather(*(incrementer(n) for n in range(CLIENTS)))
    final = await KvClient(kv.conn, "counter-check").get(key)
    assert final.ok and int(final.value) == wins, (final, wins)
    assert wins >= 15, "at least one client's worth of increments won"
