"""A replicated key-value server on one `RaftStore`, its client, and a cluster of them.

    python -m tests.raft_kv --id 1 --peers 1=127.0.0.1:P1,2=127.0.0.1:P2,3=127.0.0.1:P3 \\
                            --data-dir DIR [--listen ADDR ...] [--parent-pid PID]

One process is one Raft server: a `RaftStore` and a small `shoal.test.Kv` gRPC service
on the same gRPC server (`peers[id]` and every `--listen` address). The cluster tests
(tests/test_raft_cluster.py) and the failover benchmark (bench/raft_failover.py) run
three of them and kill, pause and cut them off while clients write and read.

The service (unary calls; request and reply are JSON objects, never pickle):
- `Put {key, value, client, seq}`: one transaction `Put(kind="nodes", name=key,
  value={"v": value})` through `RaftStore.commit(client_id=client, seq=seq)`, so a
  retry with the same client and seq applies at most once, on any server.
- `Get {key}`: `read_barrier()` (ReadIndex: linearizable, served by followers too),
  then the value, or null when absent.
- `Cas {key, expected, value, client, seq}`: compare-and-set, `expected` null meaning
  absent. Replies `{"ok": true, "swapped": bool}`. See "Compare-and-set" below.
- `Scan {prefix}`: `read_barrier()`, then every key with that prefix and its value.
- `Status {}`: the Raft view of this server (role, term, leader, indexes).

Errors are replies, not gRPC statuses, and say what the client may assume:
  `{"error": "not_leader", "leader": N}` nothing was proposed; N is the leader this
                                         server knows of (0: none);
  `{"error": "refused"}`                 nothing was, or ever will be, applied
                                         (`ProposalDropped`, or a CAS that could not
                                         reach a decision point);
  `{"error": "unknown"}`                 the write may or may not apply (`Unavailable`:
                                         no answer in time).
A gRPC error (deadline, connection reset) is "unknown" too: the request may have landed.

Compare-and-set. `ClusterState` has no conditional operation: a transaction is
unconditional Puts and Deletes. So the decision is taken on the leader, at a point where
the leader's state machine is known to be exactly the state the new entry will be
applied on, and nothing awaits between the decision and the proposal:
  1. `read_barrier()`: the state is at least as new as any write acknowledged before
     the call (so a "not swapped" answer is a linearizable read);
  2. wait until this server is the leader and has applied its whole log
     (`applied_index == status().last_index`), and re-check that synchronously;
  3. compare; when equal, propose the Put (`commit` proposes before its first await).
Why it is linearizable: a leader of term T appends only its own proposals, so the entry
lands at `last_index + 1` right behind the entries whose effect was just compared. It
commits only if it commits in term T, and then (Log Matching) the log before it is the
one this leader applied: the comparison saw exactly the state the entry is applied on,
so the linearization point is the entry's application. If it does not commit, nothing
happened ("refused" when the store says so, "unknown" when it timed out). A "not
swapped" answer reads a committed state no older than the call, like `Get`. Step 2 can
starve while Puts keep arriving, so every write passes a gate (`_gate`) that a CAS holds
from step 1 to its proposal: Puts queue behind it, FIFO. A CAS whose decision point
does not come within the store's request timeout is "refused" (nothing was proposed).
A CAS is never retried after "unknown" (its seq could then apply a decision taken
against another state); the client reports it as indeterminate.

Test-only conveniences: `--listen` adds listen addresses (the cluster tests give every
directed Raft link its own loopback address, so an nftables rule can cut one link);
`--parent-pid` makes the server die with the process that started it, so a crashed test
run leaves no servers behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import enum
import itertools
import json
import logging
import os
import pathlib
import random
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

__all__ = [
    "SERVICE",
    "KvService",
    "Status",
    "Reply",
    "KvConnection",
    "KvClient",
    "KvCluster",
    "parse_peers",
    "free_ports",
    "main",
]

ROOT = pathlib.Path(__file__).resolve().parent.parent
SERVICE = "shoal.test.Kv"
KIND = "nodes"
"""The ClusterState collection the keys live in (any collection would do)."""

_PR_SET_PDEATHSIG = 1


def parse_peers(text: str) -> dict[int, str]:
    """`1=host:port,2=host:port,...` → {1: "host:port", ...}."""
    peers: dict[int, str] = {}
    for part in text.split(","):
        id, sep, address = part.partition("=")
        if not sep or not address:
            raise ValueError(f"a peer is ID=HOST:PORT, not {part!r}")
        peers[int(id)] = address
    return peers


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


# -- the server ------------------------------------------------------------------------------


class KvService:
    """The `shoal.test.Kv` service over one `RaftStore` (see the module docstring)."""

    def __init__(self, store: Any) -> None:
        from shoal.leader.raft import Role

        self.store = store
        self._leader_role = Role.LEADER
        # Writes pass it to propose; a CAS holds it from its read barrier to its proposal.
        self._gate = asyncio.Lock()

    def handler(self) -> grpc.GenericRpcHandler:
        methods: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "Put": self.put,
            "Get": self.get,
            "Cas": self.cas,
            "Scan": self.scan,
            "Status": self.status,
        }

        def unary(fn: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]) -> grpc.RpcMethodHandler:
            async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                return _dumps(await self._answer(fn, json.loads(request)))

            return grpc.unary_unary_rpc_method_handler(call)

        return grpc.method_handlers_generic_handler(SERVICE, {name: unary(fn) for name, fn in methods.items()})

    async def _answer(
        self, fn: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]], request: dict[str, Any]
    ) -> dict[str, Any]:
        from shoal.errors import ShoalError, Unavailable
        from shoal.leader.raft import NotLeader, ProposalDropped

        try:
            return await fn(request)
        except NotLeader as exc:
            return {"error": "not_leader", "leader": exc.leader_hint}
        except ProposalDropped as exc:
            return {"error": "refused", "message": str(exc)}
        except (Unavailable, ShoalError) as exc:
            return {"error": "unknown", "message": str(exc)}

    def _quiet(self) -> bool:
        """Leader, with its whole log applied: nothing of ours is still in flight."""
        st = self.store.status()
        return bool(st.role is self._leader_role and self.store.applied_index >= st.last_index)

    async def put(self, r: dict[str, Any]) -> dict[str, Any]:
        from shoal.leader.state import Put, Txn

        txn = Txn(ops=(Put(kind=KIND, name=r["key"], value={"v": r["value"]}),))
        async with self._gate:
            pass
        # No await between passing the gate and the proposal inside `commit`.
        forward = bool(r.get("forward"))
        revision = await self.store.commit(txn, client_id=r["client"], seq=r["seq"], forward=forward)
        return {"ok": True, "revision": revision, **self._role(), **({"forwarded": True} if forward else {})}

    def _role(self) -> dict[str, Any]:
        """Who answered a write: a retry of a write already applied is answered from the
        sessions by any server, leader or not."""
        st = self.store.status()
        return {"term": st.term, "leader": st.role is self._leader_role}

    async def get(self, r: dict[str, Any]) -> dict[str, Any]:
        await self.store.read_barrier()
        value = self.store.state.get(KIND, r["key"])
        return {"ok": True, "value": None if value is None else value["v"]}

    async def cas(self, r: dict[str, Any]) -> dict[str, Any]:
        from shoal.leader.raft import NotLeader
        from shoal.leader.state import Put, Txn

        store = self.store
        if not store.is_leader:
            raise NotLeader(store.leader_id)
        txn = Txn(ops=(Put(kind=KIND, name=r["key"], value={"v": r["value"]}),))
        timeout = store.config.request_timeout
        async with self._gate:
            try:
                await store.read_barrier()
            except NotLeader:
                raise
            except Exception as exc:  # nothing proposed yet: a definite failure
                return {"error": "refused", "message": f"no read point: {exc}"}
            deadline = time.monotonic() + timeout
            while not self._quiet():  # re-checked after the await: see the module docstring
                if not store.is_leader:
                    raise NotLeader(store.leader_id)
                try:
                    await store.wait_for(self._quiet, timeout=max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    return {"error": "refused", "message": "the log did not settle in time"}
            current = store.state.get(KIND, r["key"])
            if (None if current is None else current["v"]) != r["expected"]:
                return {"ok": True, "swapped": False}
            # `commit` proposes synchronously, before it first awaits.
            await store.commit(txn, client_id=r["client"], seq=r["seq"])
            return {"ok": True, "swapped": True, **self._role()}

    async def scan(self, r: dict[str, Any]) -> dict[str, Any]:
        await self.store.read_barrier()
        state = self.store.state
        prefix = r.get("prefix", "")
        items = {}
        for name in state.names(KIND):
            if name.startswith(prefix):
                value = state.get(KIND, name)
                items[name] = None if value is None else value["v"]
        return {"ok": True, "items": items}

    async def status(self, r: dict[str, Any]) -> dict[str, Any]:
        st = self.store.status()
        return {
            "ok": True,
            "id": st.id,
            "role": st.role.name.lower(),
            "term": st.term,
            "leader": st.lead,
            "commit": st.commit,
            "applied": self.store.applied_index,
            "last_index": st.last_index,
            "revision": self.store.state.revision,
        }


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGKILL when the process that started us exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # it exited before the prctl
        os._exit(1)


async def serve(args: argparse.Namespace) -> None:
    import structlog

    from shoal.leader.raft_transport import SERVER_OPTIONS, TransportConfig
    from shoal.leader.replicated import RaftStore, RaftStoreConfig

    level = getattr(logging, args.log_level.upper())
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S.%f"),  # ms: elections take a few hundred
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    peers = parse_peers(args.peers)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    for address in dict.fromkeys([peers[args.id], *args.listen]):
        if server.add_insecure_port(address) == 0:
            raise SystemExit(f"raft_kv: cannot listen on {address}")
    config = RaftStoreConfig(
        request_timeout=args.request_timeout,
        transport=TransportConfig(backoff_max=args.backoff_max),
    )
    store = RaftStore(
        node_id=args.id, cluster_id=args.cluster, peers=peers, data_dir=args.data_dir, config=config, server=server
    )
    server.add_generic_rpc_handlers((KvService(store).handler(),))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    await store.start()
    print("ready", flush=True)
    await stop.wait()
    await store.close()
    await server.stop(None)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.raft_kv", description="One Raft KV server (tests, benchmarks).")
    p.add_argument("--id", type=int, required=True)
    p.add_argument("--peers", required=True, help="ID=HOST:PORT,... (this server listens on its own)")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--listen", action="append", default=[], help="another address to listen on (repeatable)")
    p.add_argument("--cluster", default="kv")
    p.add_argument("--request-timeout", type=float, default=5.0, help="RaftStoreConfig.request_timeout (s)")
    p.add_argument("--backoff-max", type=float, default=1.0, help="TransportConfig.backoff_max (s)")
    p.add_argument("--log-level", default="warning")
    p.add_argument("--parent-pid", type=int, default=0, help="exit when this process (our parent) exits")
    p.add_argument("--uvloop", action="store_true", help="run on uvloop when installed")
    args = p.parse_args(argv)
    if args.parent_pid:
        _die_with_parent(args.parent_pid)
    if args.uvloop:
        with contextlib.suppress(ImportError):
            import uvloop  # type: ignore[import-not-found]

            uvloop.install()
    asyncio.run(serve(args))


# -- the client ------------------------------------------------------------------------------


class Status(enum.Enum):
    """What a client may assume about an operation."""

    OK = "ok"
    FAIL = "fail"  # it did not, and never will, take effect
    UNKNOWN = "unknown"  # it may or may not take effect (a write that timed out)


@dataclass(frozen=True, slots=True)
class Reply:
    """The outcome of one client operation (after its retries)."""

    status: Status
    value: Any = None
    """get: the value (None: absent); cas: swapped or not; put: the revision."""
    server: int = 0
    """The server that gave the final answer (0: none did)."""
    error: str = ""
    sent: float = 0.0
    """When the attempt that got the final answer was sent (time.monotonic())."""
    term: int = 0
    """Writes: the answering server's Raft term when it answered."""
    from_leader: bool = False
    """Writes: whether the answering server was the leader (a retry of an applied write
    is answered by any server)."""
    forwarded: bool = False
    """Puts sent with `forward_via`: the answering server forwarded the write (to the
    leader, or proposed it, being the leader) and saw it applied."""

    @property
    def ok(self) -> bool:
        return self.status is Status.OK


CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.enable_http_proxy", 0),
    ("grpc.enable_retries", 0),
    # A killed server comes back within a second or two: reconnect promptly.
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
]


class KvConnection:
    """Channels to every server, and the shared guess of who leads."""

    def __init__(self, addresses: Mapping[int, str], *, rpc_timeout: float = 1.0) -> None:
        self.addresses = dict(addresses)
        self.ids = sorted(self.addresses)
        self.rpc_timeout = rpc_timeout
        self.leader = 0
        self._failed_at: dict[int, float] = {}
        self._channels = {i: grpc.aio.insecure_channel(a, options=CHANNEL_OPTIONS) for i, a in self.addresses.items()}

    async def call(
        self, server: int, method: str, request: dict[str, Any], timeout: float | None = None
    ) -> dict[str, Any]:
        """One RPC; raises `grpc.aio.AioRpcError` on a transport error or deadline."""
        stub = self._channels[server].unary_unary(f"/{SERVICE}/{method}")
        try:
            raw = await stub(_dumps(request), timeout=timeout if timeout is not None else self.rpc_timeout)
        except grpc.aio.AioRpcError:
            self._failed_at[server] = time.monotonic()
            raise
        return dict(json.loads(raw))

    def recently_failed(self, server: int, window: float = 0.25) -> bool:
        at = self._failed_at.get(server)
        return at is not None and time.monotonic() - at < window

    async def status(self, server: int, timeout: float = 0.5) -> dict[str, Any] | None:
        try:
            reply = await self.call(server, "Status", {}, timeout=timeout)
        except grpc.aio.AioRpcError:
            return None
        return None if "error" in reply else reply

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()


class KvClient:
    """One client session: its own client id and sequence numbers (one op at a time).

    Writes go to the leader: a "not_leader" reply redirects to the hint, a transport
    error or a reply without a hint moves to the next server, with a short back-off once
    every server was tried. With `forward_via=i`, Puts go to server i instead, which
    forwards them to the leader (`RaftStore.commit(forward=True)`) and answers once they
    applied there; on a failure they move to the next server, forwarding still. A Put is retried with the same seq until it is acknowledged
    or `op_timeout` passes (exactly once by the store's sessions); a CAS is retried only
    after definite failures. Reads go to any server (`server=` pins one).
    """

    RETRY_BACKOFF = 0.01
    """Seconds between two rounds over every server: short, since a failover is timed
    from the client's side."""

    def __init__(self, conn: KvConnection, client_id: str, *, op_timeout: float = 5.0,
                 rng: random.Random | None = None, forward_via: int = 0) -> None:
        self.conn = conn
        self.client_id = client_id
        self.forward_via = forward_via
        self.op_timeout = op_timeout
        self._seq = itertools.count(1)
        self._rng = rng or random.Random()

    def _next_server(self, current: int) -> int:
        ids = self.conn.ids
        return ids[(ids.index(current) + 1) % len(ids)] if current in ids else ids[0]

    async def _write(self, method: str, body: dict[str, Any], *, retry_unknown: bool,
                     timeout: float | None) -> Reply:
        conn = self.conn
        deadline = time.monotonic() + (timeout if timeout is not None else self.op_timeout)
        uncertain = False
        last_error = ""
        forward = bool(body.get("forward"))
        target = self.forward_via if forward else conn.leader or self._rng.choice(conn.ids)
        tried: set[int] = set()
        while (remaining := deadline - time.monotonic()) > 0:
            if len(tried) >= len(conn.ids):
                tried.clear()
                await asyncio.sleep(min(self.RETRY_BACKOFF, remaining))
                continue
            tried.add(target)
            sent = time.monotonic()
            try:
                reply = await conn.call(target, method, body, timeout=min(conn.rpc_timeout, remaining))
            except grpc.aio.AioRpcError as exc:
                uncertain, last_error = True, f"server {target}: {exc.code().name}"
                if not retry_unknown:
                    break
                if conn.leader == target:
                    conn.leader = 0
                target = self._next_server(target)
                continue
            error = reply.get("error")
            if error is None:
                if not forward:
                    conn.leader = target
                return Reply(Status.OK, reply.get("swapped", reply.get("revision")), target, sent=sent,
                             term=int(reply.get("term", 0)), from_leader=bool(reply.get("leader")),
                             forwarded=bool(reply.get("forwarded")))
            last_error = f"server {target}: {error} {reply.get('message', '')}".strip()
            if error == "unknown":
                uncertain = True
                if not retry_unknown:
                    break
                target = self._next_server(target)
            elif error == "not_leader":
                hint = int(reply.get("leader", 0))
                if hint and hint != target and hint in conn.addresses and not conn.recently_failed(hint):
                    conn.leader = target = hint
                    tried.discard(hint)
                else:
                    target = self._next_server(target)
            else:  # refused: nothing applied; the leader is probably changing
                target = self._next_server(target)
        return Reply(Status.UNKNOWN if uncertain else Status.FAIL, None, 0, last_error or "timed out")

    async def put(self, key: str, value: str, *, timeout: float | None = None) -> Reply:
        body: dict[str, Any] = {"key": key, "value": value, "client": self.client_id, "seq": next(self._seq)}
        if self.forward_via:
            body["forward"] = True
        return await self._write("Put", body, retry_unknown=True, timeout=timeout)

    async def cas(self, key: str, expected: str | None, value: str, *, timeout: float | None = None) -> Reply:
        body = {"key": key, "expected": expected, "value": value, "client": self.client_id, "seq": next(self._seq)}
        return await self._write("Cas", body, retry_unknown=False, timeout=timeout)

    async def _read(self, method: str, body: dict[str, Any], field_name: str, server: int | None,
                    timeout: float | None) -> Reply:
        conn = self.conn
        deadline = time.monotonic() + (timeout if timeout is not None else self.op_timeout)
        last_error = "timed out"
        target = server or self._rng.choice(conn.ids)
        while (remaining := deadline - time.monotonic()) > 0:
            sent = time.monotonic()
            try:
                reply = await conn.call(target, method, body, timeout=min(conn.rpc_timeout, remaining))
            except grpc.aio.AioRpcError as exc:
                last_error = f"server {target}: {exc.code().name}"
            else:
                if reply.get("error") is None:
                    return Reply(Status.OK, reply[field_name], target, sent=sent)
                last_error = f"server {target}: {reply['error']} {reply.get('message', '')}".strip()
                if reply["error"] == "not_leader" and not reply.get("leader"):
                    await asyncio.sleep(min(self.RETRY_BACKOFF, max(0.0, deadline - time.monotonic())))
            if server is None:
                target = self._next_server(target)
        return Reply(Status.FAIL, None, 0, last_error)

    async def get(self, key: str, *, server: int | None = None, timeout: float | None = None) -> Reply:
        return await self._read("Get", {"key": key}, "value", server, timeout)

    async def scan(self, prefix: str, *, server: int | None = None, timeout: float | None = None) -> Reply:
        return await self._read("Scan", {"prefix": prefix}, "items", server, timeout)


# -- a cluster of server processes -------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports free on 127.0.0.1 right now (held together while chosen)."""
    import socket

    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _proc_state(pid: int) -> str | None:
    try:
        raw = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()[0]


@dataclass
class _Server:
    id: int
    port: int
    log_path: pathlib.Path
    proc: subprocess.Popen[bytes] | None = None
    stopped: bool = False


@dataclass
class KvCluster:
    """`n` KV server processes on loopback, started, crashed and paused on demand.

    Every server has one port. Clients reach server i at 127.0.0.1:port. With
    `per_link=True` server i dials server j's Raft service at 127.<net>.i.j:port_j (and
    j listens there too), so the packets of each directed link carry an address of
    their own that a firewall rule can match (`link_addresses`); otherwise every Raft
    address is 127.0.0.1:port. (Each server bootstraps its log from its own table of
    addresses, so the links stay apart as long as no server installs a snapshot made by
    another, whose table it would adopt; the tests stay far below `snapshot_every`.)
    Data and logs go under `root`; `close()` kills whatever still runs. Only the main
    thread may start servers (they die with the thread that forked them: `--parent-pid`).
    """

    root: pathlib.Path
    n: int = 3
    per_link: bool = False
    server_args: Sequence[str] = ()
    net: int = field(default_factory=lambda: random.randrange(16, 250))
    servers: dict[int, _Server] = field(init=False)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        ports = free_ports(self.n)
        self.servers = {
            i: _Server(i, ports[i - 1], self.root / f"s{i}.log") for i in range(1, self.n + 1)
        }

    @property
    def ids(self) -> list[int]:
        return sorted(self.servers)

    @property
    def client_addresses(self) -> dict[int, str]:
        return {i: f"127.0.0.1:{s.port}" for i, s in self.servers.items()}

    def _link(self, frm: int, to: int) -> str:
        return f"127.{self.net}.{frm}.{to}"

    def link_addresses(self, i: int) -> set[str]:
        """The addresses of every Raft link to and from server `i` (per_link only)."""
        assert self.per_link, "links have their own addresses only with per_link=True"
        return {self._link(i, j) for j in self.ids if j != i} | {self._link(j, i) for j in self.ids if j != i}

    def _argv(self, i: int) -> list[str]:
        s = self.servers[i]
        peers = {
            j: (f"127.0.0.1:{o.port}" if j == i or not self.per_link else f"{self._link(i, j)}:{o.port}")
            for j, o in self.servers.items()
        }
        argv = [
            sys.executable, "-m", "tests.raft_kv", "--id", str(i),
            "--peers", ",".join(f"{j}={a}" for j, a in sorted(peers.items())),
            "--data-dir", str(self.root / f"s{i}"), "--parent-pid", str(os.getpid()),
        ]
        if self.per_link:
            for j in self.ids:
                if j != i:
                    argv += ["--listen", f"{self._link(j, i)}:{s.port}"]
        return argv + list(self.server_args)

    def start(self, i: int) -> None:
        """Start server `i` (not waiting for it); its data dir survives restarts."""
        s = self.servers[i]
        if self.alive(i):
            raise RuntimeError(f"server {i} is already running")
        with open(s.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} starting server {i}\n".encode())
            log.flush()
            s.proc = subprocess.Popen(
                self._argv(i), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=ROOT, start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )
        s.stopped = False

    def start_all(self) -> None:
        for i in self.ids:
            self.start(i)

    def alive(self, i: int) -> bool:
        p = self.servers[i].proc
        return p is not None and p.poll() is None

    def pid(self, i: int) -> int:
        p = self.servers[i].proc
        assert p is not None
        return p.pid

    def kill(self, i: int) -> None:
        """SIGKILL server `i` and reap it: a crash (no leadership hand-over, no flush)."""
        s = self.servers[i]
        if s.proc is not None and s.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(s.proc.pid, signal.SIGKILL)
            s.proc.wait(timeout=10)
        s.stopped = False

    def terminate(self, i: int) -> None:
        """SIGTERM server `i` (a graceful stop: a leader hands over first) and reap it."""
        s = self.servers[i]
        if s.proc is not None and s.proc.poll() is None:
            s.proc.send_signal(signal.SIGTERM)
            s.proc.wait(timeout=20)
        s.stopped = False

    def _signal(self, i: int, sig: signal.Signals, stopped: bool) -> None:
        from tests.helpers import wait_until

        pid = self.pid(i)
        os.kill(pid, sig)
        # Delivery is asynchronous: "T" once every thread has stopped.
        wait_until(lambda: (_proc_state(pid) == "T") == stopped, 5.0, 0.002,
                   what=f"server {i} to be {'stopped' if stopped else 'running'}")
        self.servers[i].stopped = stopped

    def stop(self, i: int) -> None:
        """SIGSTOP server `i` (a long GC pause, a frozen VM); returns once it is stopped."""
        self._signal(i, signal.SIGSTOP, True)

    def cont(self, i: int) -> None:
        """SIGCONT server `i`; returns once it runs again."""
        self._signal(i, signal.SIGCONT, False)

    def running(self) -> list[int]:
        """Servers alive and not paused."""
        return [i for i in self.ids if self.alive(i) and not self.servers[i].stopped]

    def log(self, i: int, tail: int = 30) -> str:
        try:
            lines = self.servers[i].log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-tail:])

    def diagnose(self, tail: int = 15) -> str:
        parts = []
        for i in self.ids:
            state = "running" if self.alive(i) else "not running"
            if self.servers[i].stopped:
                state = "stopped (SIGSTOP)"
            parts.append(f"--- server {i} ({state}), last log lines:\n{self.log(i, tail)}")
        return "\n".join(parts)

    def close(self) -> None:
        """Kill every server and reap it; safe to call twice."""
        for i in self.ids:
            self.kill(i)

    async def leader(self, conn: KvConnection, timeout: float = 10.0, among: Iterable[int] | None = None,
                     *, settled: bool = False) -> int:
        """The id of the leader that every server in `among` (default: the running ones)
        reports; with `settled`, once it has also applied its whole log (so with no load
        it has committed its term's first entry and serves at once)."""
        from tests.helpers import eventually

        async def agreed() -> int:
            ids = list(among) if among is not None else self.running()
            statuses = await asyncio.gather(*(conn.status(i) for i in ids))
            if any(st is None for st in statuses):
                return 0
            leads = [st for st in statuses if st is not None and st["role"] == "leader"]
            if len(leads) != 1:
                return 0
            lead = leads[0]
            if settled and lead["applied"] < lead["last_index"]:
                return 0
            if all(st is not None and st["leader"] == lead["id"] for st in statuses):
                conn.leader = int(lead["id"])
                return int(lead["id"])
            return 0

        return int(await eventually(agreed, timeout, 0.02, what=f"one leader agreed by servers {among or 'running'}"))

    async def caught_up(self, conn: KvConnection, i: int, timeout: float = 10.0) -> None:
        """Wait until server `i` has applied everything the leader had committed when
        this was called (a restarted server has caught up)."""
        from tests.helpers import eventually

        async def leader_commit() -> int | None:
            st = await conn.status(await self.leader(conn, timeout))
            return None if st is None else int(st["commit"]) or None

        target = int(await eventually(leader_commit, timeout, 0.02, what="the leader's commit index"))

        async def applied() -> bool:
            mine = await conn.status(i)
            return mine is not None and int(mine["applied"]) >= target

        await eventually(applied, timeout, 0.02, what=f"server {i} to apply up to {target}")


if __name__ == "__main__":
    main()
