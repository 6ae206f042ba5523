"""The gossip shell: sockets, clock and subscribers around one sans-I/O `Swim` member.

Rules:
- This is the only gossip code that touches sockets or reads the clock. `now` is
  `time.monotonic()`, read at every call into the core (the wall clock never enters).
  The core is driven by `step` (every decoded datagram or frame), `tick` (a timer armed
  at `next_deadline()`, re-armed after every call) and `ready()`, whose effects are
  carried out in the order `Ready` states: datagrams, then streams, then events.
- One port number for both transports: UDP for probes and gossip, TCP for push-pull
  (default 7421). Bound to `bind`, announced to others as `advertise` (an IP literal:
  other hosts must reach it without resolving names).
- Hostile input never crashes the agent and never reaches the core: every datagram and
  frame goes through `gossip_wire` first; what it refuses is dropped and counted by
  `DropReason` (`stats.dropped` for datagrams, `stats.stream_dropped` for frames).
- Push-pull: a `PushPullRequest` in `ready().streams` opens a TCP connection, sends one
  frame, reads one frame back and steps it. An accepted connection reads one request,
  steps it with the connection's peer address as `src`, and writes back, on the same
  connection, the `PushPullResponse` the core addresses to that `src`. Every exchange
  has a deadline (`stream_timeout`) and a size bound (`max_frame`), and at most
  `max_inbound_streams` are served at once.
- Reachability checks (`Ready.checks`): a non-blocking TCP connect from the bound
  address to the member's gossip address, closed as soon as it completes, sending
  nothing; the outcome (`reach_outcome`, the one mapping of connect errors) goes back
  to the core. The listener counts a connection closed before any byte as a check it
  served, not as a failed exchange.
- `join(seeds)` retries with exponential back-off and jitter until a seed answers (or a
  member reaches us), returns whether that happened within its timeout, and keeps
  retrying in the background after that, logging each attempt.
- `leave()` announces the departure and keeps the member running until its broadcasts
  have gone out (or `leave_timeout`); `close()` stops everything at once and says
  nothing to anyone (what a crash looks like to the others).
- Events go to every `subscribe()` queue and `add_callback` callback, after the
  datagrams of the same change were handed to the socket. A subscriber that reads
  `members()` and subscribes with no `await` in between misses nothing.

How it works: everything hangs off one `GossipShell`; the UDP protocol and the TCP
handler call back into it; one timer handle is rescheduled whenever the core's next
deadline moves; background work (push-pull exchanges, the join loop) runs as tasks the
shell owns and cancels on `close()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import re
import socket
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from shoal.agent import gossip_wire as wire
from shoal.agent.gossip_wire import DropReason, MalformedPacket, TruncatedPacket, WireError
from shoal.agent.swim import (
    Address,
    Config,
    EventKind,
    Member,
    MemberEvent,
    Meta,
    Outbound,
    Reach,
    ReachCheck,
    Stream,
    Swim,
)
from shoal.agent.swim.messages import Compound, Message, PushPull, PushPullRequest, PushPullResponse
from shoal.errors import ConfigError

__all__ = [
    "DEFAULT_PORT",
    "GossipConfig",
    "GossipStats",
    "GossipShell",
    "parse_seed",
    "reach",
    "reach_outcome",
]

DEFAULT_PORT = 7421

_CLUSTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# At most one warning per drop reason this often; every drop is still counted.
_DROP_WARNING_EVERY = 10.0
# Binding port 0 picks a free UDP port; TCP may have it taken: try another this often.
_BIND_ATTEMPTS = 8
# Floor on the timer delay: guards against a busy loop if a deadline stays in the past.
_MIN_TIMER_DELAY = 0.001
# Pending connections the push-pull listener's kernel queues. While this agent is stopped
# (SIGSTOP, swap) its kernel keeps completing handshakes into this queue, and probers
# that see them stay patient; a full queue drops SYNs and probers fall back to silence.
# A prober that excuses a stopped agent checks it every probe interval (about 3 a
# second): asyncio's default of 100 would fill within host_up_patience once seven
# probers do, 1024 lasts that long for sixty.
_ACCEPT_BACKLOG = 1024
# Floor on a reachability check's timeout: a check asked for late (a busy loop) still
# gets the time a LAN handshake takes.
_MIN_CHECK_TIMEOUT = 0.01

# What a failed connect says about the member's host (the first class in an error's MRO
# that is listed here wins). Only a refusal is evidence: ECONNREFUSED is the host's RST
# (or an ICMP port-unreachable, which a REJECT firewall rule also sends: the core gives a
# refused member a short chance to refute for that reason). A timeout, a host or network
# unreachable, a reset or a local error say nothing about the agent.
_REACH_BY_ERROR: dict[type[BaseException], Reach] = {
    ConnectionRefusedError: Reach.REFUSED,
    TimeoutError: Reach.NO_ANSWER,
    OSError: Reach.NO_ANSWER,
}


def reach_outcome(exc: BaseException | None) -> Reach:
    """The `Reach` of a connect attempt that raised `exc` (None: it connected)."""
    if exc is None:
        return Reach.ACCEPTED
    for cls in type(exc).__mro__:
        outcome = _REACH_BY_ERROR.get(cls)
        if outcome is not None:
            return outcome
    raise TypeError(f"not a connect error: {exc!r}")


async def reach(address: Address, timeout: float, local_addr: tuple[str, int] | None = None) -> Reach:
    """Open a TCP connection to `address` and close it at once: what its host answers."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    error: BaseException | None = None
    try:
        if local_addr is not None:
            sock.bind(local_addr)
        async with asyncio.timeout(max(timeout, _MIN_CHECK_TIMEOUT)):
            await loop.sock_connect(sock, address)
    except (OSError, TimeoutError) as exc:
        error = exc
    finally:
        sock.close()
    return reach_outcome(error)


@dataclass(frozen=True, slots=True, kw_only=True)
class GossipConfig:
    """Settings of one gossip member's transports. Times in seconds, sizes in bytes."""

    # This member's name: unique in the cluster and stable across restarts (a restarted
    # member with the same name refutes its old death with a higher incarnation).
    name: str
    # Sent in every packet; a packet of another cluster is dropped. Up to 32 characters
    # of [A-Za-z0-9._-] so a full datagram stays below the IPv6 MTU (gossip_wire).
    cluster: str = "shoal"
    # Address to listen on (UDP and TCP). Loopback by default, like `shoal agent`: a
    # host is exposed only when asked.
    bind: str = "127.0.0.1"
    # UDP and TCP port; 0 picks a free one (tests). 7421 is shoal's gossip port.
    port: int = DEFAULT_PORT
    # Address other members use; defaults to `bind`. Required when binding 0.0.0.0/::.
    advertise: str = ""
    # Port other members use; 0 means the bound port (set it behind a port mapping).
    advertise_port: int = 0
    # role, gRPC address, labels, version: spread with this member's Alive.
    meta: Meta | Mapping[str, str] = ()
    # The protocol's tuning (probe interval, suspicion, gossip); LAN defaults.
    swim: Config = field(default_factory=Config.lan)
    # Deadline of one push-pull exchange (connect, send, receive). A LAN exchange takes
    # milliseconds; 5 s tolerates a loaded peer and still frees a hung connection.
    stream_timeout: float = 5.0
    # Largest push-pull frame accepted (gossip_wire.MAX_FRAME: 10,000 members fit).
    max_frame: int = wire.MAX_FRAME
    # Largest datagram accepted; no legitimate sender goes above the MTU.
    max_datagram: int = wire.MAX_DATAGRAM
    # Push-pull connections served at once; beyond it a connection is closed at once.
    # Each member syncs every push_pull_interval, so 64 absorbs a join storm.
    max_inbound_streams: int = 64
    # First join retry after this, doubling up to join_backoff_max (with +-25 % jitter,
    # so agents started together do not knock on the seed in step).
    join_backoff: float = 0.5
    join_backoff_max: float = 30.0
    # How long `leave()` waits for the departure to be gossiped. The first round goes out
    # at once; 1 s is many gossip intervals.
    leave_timeout: float = 1.0

    @property
    def advertise_host(self) -> str:
        """The host others reach: `advertise`, or `bind` when not set."""
        return self.advertise or self.bind

    def validate(self) -> GossipConfig:
        """Raise `ConfigError` if these settings cannot work; return self."""
        problems: list[str] = []
        if not self.name:
            problems.append("the member name must not be empty")
        if len(self.cluster) > wire.MAX_CLUSTER_NAME or not _CLUSTER_NAME.fullmatch(self.cluster):
            problems.append(
                f"cluster name {self.cluster!r} must be 1 to {wire.MAX_CLUSTER_NAME} characters "
                "of letters, digits, '.', '_' and '-'"
            )
        bind_ip = _ip(self.bind)
        if bind_ip is None:
            problems.append(f"bind address {self.bind!r} must be an IP address")
        for label, port in (("port", self.port), ("advertise_port", self.advertise_port)):
            if not 0 <= port < 65536:
                problems.append(f"{label} must be between 0 and 65535 (got {port})")
        if self.advertise:
            adv = _ip(self.advertise)
            if adv is None:
                problems.append(f"advertise address {self.advertise!r} must be an IP address")
            elif adv.is_unspecified:
                problems.append(f"advertise address {self.advertise} is not reachable; give this host's IP")
        elif bind_ip is not None and bind_ip.is_unspecified:
            problems.append(
                f"binding {self.bind} needs an advertise address: the IP other hosts reach this one at"
            )
        if not self.stream_timeout > 0:
            problems.append(f"stream_timeout must be greater than 0 (got {self.stream_timeout})")
        if self.max_frame < 1024:
            problems.append(f"max_frame must be at least 1024 bytes (got {self.max_frame})")
        floor = self.swim.udp_buffer_size + wire.packet_overhead(self.cluster)
        if not floor <= self.max_datagram <= wire.MAX_DATAGRAM:
            problems.append(
                f"max_datagram must be between {floor} (what this member sends) and "
                f"{wire.MAX_DATAGRAM} (got {self.max_datagram})"
            )
        if self.max_inbound_streams < 1:
            problems.append(f"max_inbound_streams must be at least 1 (got {self.max_inbound_streams})")
        if not 0 < self.join_backoff <= self.join_backoff_max:
            problems.append(
                f"join_backoff ({self.join_backoff}) must be greater than 0 and at most "
                f"join_backoff_max ({self.join_backoff_max})"
            )
        if self.leave_timeout < 0:
            problems.append(f"leave_timeout must not be negative (got {self.leave_timeout})")
        if problems:
            raise ConfigError("invalid gossip settings: " + "; ".join(problems))
        self.swim.validate()
        return self


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def parse_seed(seed: str | Address, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """(host, port) of a `--join` value: `HOST`, `HOST:PORT`, `[IPv6]:PORT` or an IPv6 literal.

    The host may be a name; the shell resolves it on every join attempt.
    """
    if isinstance(seed, tuple):
        return (seed[0], int(seed[1]))
    text = seed.strip()
    host, port = text, default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"seed {seed!r}: missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"seed {seed!r}: expected ':PORT' after ']'")
            port = _port(rest[1:], seed)
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = _port(p, seed)
    if not host:
        raise ConfigError(f"seed {seed!r} has no host")
    return (host, port)


def _port(text: str, seed: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ConfigError(f"seed {seed!r}: port {text!r} is not a number") from None
    if not 0 < port < 65536:
        raise ConfigError(f"seed {seed!r}: port {port} is out of range")
    return port


@dataclass(slots=True)
class GossipStats:
    """Counters since start, for /metrics and tests. Only the shell changes them."""

    packets_received: int = 0  # datagrams accepted (decoded)
    packets_sent: int = 0
    bytes_received: int = 0  # of every datagram, accepted or not
    bytes_sent: int = 0
    # Incoming datagrams dropped, by reason.
    dropped: dict[DropReason, int] = field(default_factory=lambda: dict.fromkeys(DropReason, 0))
    # Incoming push-pull frames (requests or responses) dropped, by reason.
    stream_dropped: dict[DropReason, int] = field(default_factory=lambda: dict.fromkeys(DropReason, 0))
    too_large: int = 0  # outgoing messages too large for any datagram (not sent)
    send_errors: int = 0  # UDP send failures reported by the OS
    streams_opened: int = 0  # push-pull exchanges started by this member
    streams_accepted: int = 0  # push-pull connections served
    streams_refused: int = 0  # connections closed because max_inbound_streams were busy
    stream_errors: int = 0  # exchanges that failed: refused, timed out, closed early
    # Outcomes of this member's reachability checks of members that missed a ping.
    checks: dict[Reach, int] = field(default_factory=lambda: dict.fromkeys(Reach, 0))
    checks_served: int = 0  # connections closed before any byte: other members' checks
    core_errors: int = 0  # exceptions raised by the core (bugs; logged with a traceback)
    events_dropped: int = 0  # events not delivered to a full bounded subscriber queue


class _Udp(asyncio.DatagramProtocol):
    """Hands datagrams to the shell; notes when the socket is gone."""

    def __init__(self, shell: GossipShell) -> None:
        self._shell = shell
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self._shell._on_datagram(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        self._shell._on_udp_error(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class GossipShell:
    """One gossip member on the network: an asyncio UDP endpoint and TCP server around a `Swim`.

    Lifecycle: `await start()`, `await join(seeds)`, ..., `await leave()`, `await close()`
    (or `async with GossipShell(...)`, which starts and closes).
    """

    def __init__(
        self,
        config: GossipConfig,
        *,
        rng: random.Random | None = None,
        logger: Any = None,
    ) -> None:
        """`rng` seeds the core and the join jitter (default: from the OS); `logger` is a
        structlog logger (default: `structlog.get_logger()` bound to this member)."""
        self.config = config.validate()
        self._rng = rng if rng is not None else random.Random()
        self._log: Any = logger if logger is not None else structlog.get_logger().bind(node=config.name)
        self.stats = GossipStats()
        self._swim: Swim | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._udp_protocol: _Udp | None = None
        self._tcp: asyncio.Server | None = None
        self._address: Address | None = None
        self._max_out = config.swim.udp_buffer_size + wire.packet_overhead(config.cluster)
        bind_ip = _ip(config.bind)
        # Outgoing push-pull connections leave from the bound address (not whatever the
        # routing table picks), so firewalls and peers see one address per member.
        self._tcp_local: tuple[str, int] | None = (
            None if bind_ip is None or bind_ip.is_unspecified else (config.bind, 0)
        )
        self._closed = False
        self._left = False
        self._flushing = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pending: dict[Address, asyncio.Future[PushPull]] = {}
        self._inbound = 0
        self._queues: list[asyncio.Queue[MemberEvent]] = []
        self._callbacks: list[Callable[[MemberEvent], object]] = []
        self._changed: asyncio.Event | None = None
        self._joined = asyncio.Event()
        self._join_task: asyncio.Task[None] | None = None
        self._heard: dict[Address, float] = {}
        self._drop_warned: dict[DropReason, float] = {}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind UDP and TCP on one port, then start the member (alone until it joins)."""
        if self._swim is not None:
            return
        cfg = self.config
        port = await self._bind(cfg.bind, cfg.port)
        self._address = (cfg.advertise_host, cfg.advertise_port or port)
        self._swim = Swim(
            cfg.swim,
            cfg.name,
            self._address,
            cfg.meta,
            self._rng,
            time.monotonic(),
            logger=self._log,
            size_of=wire.message_size,
        )
        self._log.info(
            "gossip.started",
            bind=f"{_fmt(cfg.bind)}:{port}",
            advertise=_fmt_addr(self._address),
            cluster=cfg.cluster,
        )
        self._flush()

    async def _bind(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        last: OSError | None = None
        for _ in range(_BIND_ATTEMPTS if port == 0 else 1):
            try:
                udp, proto = await loop.create_datagram_endpoint(lambda: _Udp(self), local_addr=(host, port))
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen for gossip on UDP {_fmt(host)}:{port}: {exc.strerror or exc}; "
                    "choose another address or port"
                ) from exc
            bound = int(udp.get_extra_info("sockname")[1])
            try:
                self._tcp = await asyncio.start_server(
                    self._on_connection, host=host, port=bound, reuse_address=True, backlog=_ACCEPT_BACKLOG
                )
            except OSError as exc:
                last = exc
                udp.close()
                await _wait(proto.closed, 1.0)
                continue
            self._udp, self._udp_protocol = udp, proto
            return bound
        assert last is not None
        raise ConfigError(
            f"cannot listen for gossip on TCP {_fmt(host)}:{port}: {last.strerror or last}; "
            "choose another address or port"
        ) from last

    async def close(self) -> None:
        """Stop at once: no leave, no goodbye (to the others, this is a crash)."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        for fut in self._pending.values():
            fut.cancel()
        self._pending.clear()
        if self._tcp is not None:
            self._tcp.close()
        if self._udp is not None:
            self._udp.close()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._udp_protocol is not None:
            # The socket is closed on the next loop iteration: wait, so the port is free
            # for a restart on return.
            await _wait(self._udp_protocol.closed, 1.0)
        if self._tcp is not None:
            await _wait(asyncio.ensure_future(self._tcp.wait_closed()), 1.0)
        self._pulse()
        self._log.info("gossip.closed")

    async def __aenter__(self) -> GossipShell:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ membership API

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def address(self) -> Address:
        """The advertised (host, port); known once started."""
        if self._address is None:
            raise RuntimeError("the gossip shell is not started")
        return self._address

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def joined(self) -> bool:
        """A seed answered a join, or another member reached this one."""
        return self._joined.is_set()

    def members(self) -> tuple[Member, ...]:
        """Every known member, this one included, tombstones (DEAD, LEFT) too."""
        return self._core().members()

    def member(self, name: str) -> Member | None:
        """One member by name, or None."""
        return self._core().member(name)

    @property
    def local(self) -> Member:
        """This member as it announces itself."""
        return self._core().local

    @property
    def health_score(self) -> int:
        """Lifeguard local health: 0 is healthy, higher means this member is struggling."""
        return self._core().health_score

    def heard_ago(self, name: str) -> float | None:
        """Seconds since a valid packet from `name` arrived (0 for this member), or None."""
        m = self._core().member(name)
        if m is None:
            return None
        if name == self.config.name:
            return 0.0
        t = self._heard.get(m.address)
        return None if t is None else max(0.0, time.monotonic() - t)

    def update_meta(self, meta: Meta | Mapping[str, str]) -> None:
        """Announce new metadata (raises `ConfigError` if it is too large)."""
        self._core().update_meta(meta, time.monotonic())
        self._flush()

    def subscribe(self, maxsize: int = 0) -> asyncio.Queue[MemberEvent]:
        """A queue that receives every membership event from now on.

        Unbounded by default; with `maxsize`, events that do not fit are dropped and
        counted (`stats.events_dropped`) — a slow reader can always catch up from
        `members()`, a blocked gossip loop could not.
        """
        q: asyncio.Queue[MemberEvent] = asyncio.Queue(maxsize)
        self._queues.append(q)
        return q

    def unsubscribe(self, queue: asyncio.Queue[MemberEvent]) -> None:
        with contextlib.suppress(ValueError):
            self._queues.remove(queue)

    def add_callback(self, callback: Callable[[MemberEvent], object]) -> Callable[[], None]:
        """Call `callback(event)` for every event (synchronously: keep it short). Returns
        a function that removes it. An exception in a callback is logged, not raised."""
        self._callbacks.append(callback)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(callback)

        return remove

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until `predicate()` holds, re-checked after every change; False at the timeout."""
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0 or self._closed:
                return predicate()
            if self._changed is None:
                self._changed = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return True

    # ------------------------------------------------------------------ join and leave

    async def join(self, seeds: Iterable[str | Address], *, timeout: float = 10.0) -> bool:
        """Join through `seeds` (`HOST[:PORT]` or (host, port)); True once one answered.

        Tries every seed at once, then again with exponential back-off. Returns False if
        none answered within `timeout`, but keeps trying in the background (logging
        each attempt) until one does, `leave()` or `close()`. Seeds that are this member
        are skipped; with no other seed this is the first member and returns True.
        """
        parsed = [parse_seed(s) for s in seeds]
        swim = self._core()
        if self._join_task is not None:
            self._join_task.cancel()
            self._join_task = None
        self._joined = asyncio.Event()
        if swim.live_count > 1:
            self._joined.set()
        if not parsed or await self._only_self(parsed):
            self._joined.set()
            self._log.info("gossip.join_skipped", reason="no seed but this member")
            return True
        self._join_task = self._spawn(self._join_loop(parsed))
        try:
            await asyncio.wait_for(asyncio.shield(self._joined.wait()), timeout)
        except TimeoutError:
            self._log.warning(
                "gossip.join_pending", seeds=[_fmt_addr(s) for s in parsed], waited=timeout,
                detail="no seed answered yet; retrying in the background",
            )
            return False
        return True

    async def _only_self(self, seeds: list[tuple[str, int]]) -> bool:
        resolved = await self._resolve(seeds)
        return bool(resolved) and len(resolved) == len(seeds) and all(a == self.address for a in resolved)

    async def _join_loop(self, seeds: list[tuple[str, int]]) -> None:
        backoff = self.config.join_backoff
        attempt = 0
        while not (self._closed or self._left):
            attempt += 1
            targets = [a for a in await self._resolve(seeds) if a != self.address]
            if targets and not self._closed:
                self._core().join(targets, time.monotonic())
                self._flush()
            wait = backoff * self._rng.uniform(0.75, 1.25)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._joined.wait(), wait)
                self._log.info("gossip.joined", attempt=attempt, members=self._core().live_count)
                return
            self._log.info(
                "gossip.join_retry", attempt=attempt, seeds=[_fmt_addr(s) for s in seeds],
                next_in=round(wait, 2),
            )
            backoff = min(backoff * 2, self.config.join_backoff_max)

    async def _resolve(self, seeds: list[tuple[str, int]]) -> list[Address]:
        """IP addresses of the seeds; a name that does not resolve is logged and skipped."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET
        out: list[Address] = []
        for host, port in seeds:
            if _ip(host) is not None:
                out.append((host, port))
                continue
            try:
                infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
            except OSError as exc:
                self._log.warning("gossip.seed_unresolved", seed=f"{host}:{port}", error=str(exc))
                continue
            if infos:
                out.append((str(infos[0][4][0]), port))
        return out

    async def leave(self, timeout: float | None = None) -> None:
        """Announce a graceful departure, then keep running until it has been gossiped.

        Waits until the broadcast queue is empty or `timeout` (default `leave_timeout`)
        passes. Call `close()` afterwards.
        """
        swim = self._core()
        if self._join_task is not None:
            self._join_task.cancel()
        self._left = True
        swim.leave(time.monotonic())
        self._flush()
        wait = self.config.leave_timeout if timeout is None else timeout
        drained = await self.wait_until(lambda: swim.pending_broadcasts == 0, wait)
        self._log.info("gossip.left", drained=drained, incarnation=swim.local.incarnation)

    # ------------------------------------------------------------------ driving the core

    def _core(self) -> Swim:
        if self._swim is None:
            raise RuntimeError("the gossip shell is not started")
        return self._swim

    def _step(self, src: Address, message: Message) -> None:
        if self._closed or self._swim is None:
            return
        try:
            self._swim.step(src, message, time.monotonic())
        except Exception:  # noqa: BLE001 - a core bug must not take the transports down
            self.stats.core_errors += 1
            self._log.exception("gossip.core_error", src=_fmt_addr(src), message=type(message).__name__)
        self._flush()

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed or self._swim is None:
            return
        try:
            self._swim.tick(time.monotonic())
        except Exception:  # noqa: BLE001 - as in _step
            self.stats.core_errors += 1
            self._log.exception("gossip.core_error", during="tick")
        self._flush()

    def _flush(self) -> None:
        """Carry out what the core asks, in `Ready`'s order, then re-arm the timer."""
        swim = self._swim
        if swim is None or self._closed:
            return
        if self._flushing:
            return  # a callback called back into the core: the outer loop takes it
        self._flushing = True
        try:
            while swim.has_ready():
                ready = swim.ready()
                for out in ready.packets:
                    self._send_packet(out)
                for s in ready.streams:
                    self._send_stream(s)
                for c in ready.checks:
                    self._spawn(self._check(c))
                for ev in ready.events:
                    self._deliver(ev)
        finally:
            self._flushing = False
        if not self._joined.is_set() and swim.live_count > 1:
            self._joined.set()
        self._schedule()
        self._pulse()

    def _schedule(self) -> None:
        if self._closed or self._swim is None:
            return
        deadline = self._swim.next_deadline()
        if self._timer is not None:
            if self._timer_at == deadline:
                return
            self._timer.cancel()
        delay = max(_MIN_TIMER_DELAY, deadline - time.monotonic())
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)
        self._timer_at = deadline

    def _pulse(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    # ------------------------------------------------------------------ UDP

    def _send_packet(self, out: Outbound) -> None:
        enc = wire.encode_packets(out.messages, self.config.cluster, self._max_out)
        if enc.too_large:
            self.stats.too_large += enc.too_large
            self._log.warning("gossip.message_too_large", dest=_fmt_addr(out.dest), count=enc.too_large)
        udp = self._udp
        if udp is None or udp.is_closing():
            return
        for d in enc.datagrams:
            try:
                udp.sendto(d, out.dest)
            except (OSError, ValueError, TypeError) as exc:
                self.stats.send_errors += 1
                self._log.debug("gossip.send_failed", dest=_fmt_addr(out.dest), error=str(exc))
                continue
            self.stats.packets_sent += 1
            self.stats.bytes_sent += len(d)

    def _on_datagram(self, data: bytes, src: Address) -> None:
        if self._closed or self._swim is None:
            return
        self.stats.bytes_received += len(data)
        try:
            messages = wire.decode(data, self.config.cluster, max_bytes=self.config.max_datagram)
        except WireError as exc:
            self._dropped(exc, src, self.stats.dropped)
            return
        self.stats.packets_received += 1
        if not messages:
            return
        self._heard_from(src)
        self._step(src, messages[0] if len(messages) == 1 else Compound(messages=tuple(messages)))

    def _on_udp_error(self, exc: Exception) -> None:
        # ICMP errors (port unreachable from a dead member) surface here: expected.
        self.stats.send_errors += 1
        self._log.debug("gossip.udp_error", error=str(exc))

    def _dropped(self, exc: WireError, src: Address, counters: dict[DropReason, int]) -> None:
        counters[exc.reason] += 1
        now = time.monotonic()
        last = self._drop_warned.get(exc.reason)
        if last is None or now - last >= _DROP_WARNING_EVERY:
            self._drop_warned[exc.reason] = now
            self._log.warning(
                "gossip.packet_dropped", reason=exc.reason.value, src=_fmt_addr(src), detail=exc.detail,
                total=counters[exc.reason],
            )
        else:
            self._log.debug("gossip.packet_dropped", reason=exc.reason.value, src=_fmt_addr(src))

    def _heard_from(self, address: Address) -> None:
        heard = self._heard
        heard[address] = time.monotonic()
        swim = self._swim
        if swim is not None and len(heard) > 4 * len(swim.members()) + 64:
            known = {m.address for m in swim.members()}
            self._heard = {a: t for a, t in heard.items() if a in known}

    # ------------------------------------------------------------------ TCP push-pull

    def _send_stream(self, s: Stream) -> None:
        if isinstance(s.message, PushPullRequest):
            self._spawn(self._push_pull(s.dest, s.message))
            return
        fut = self._pending.pop(s.dest, None)
        if fut is None or fut.done():
            self._log.debug("gossip.push_pull_orphan", dest=_fmt_addr(s.dest))
            return
        fut.set_result(s.message)

    async def _push_pull(self, dest: Address, request: PushPullRequest) -> None:
        """One exchange started by this member: send the request, step the response."""
        self.stats.streams_opened += 1
        writer: asyncio.StreamWriter | None = None
        cfg = self.config
        try:
            async with asyncio.timeout(cfg.stream_timeout):
                reader, writer = await asyncio.open_connection(dest[0], dest[1], local_addr=self._tcp_local)
                writer.write(wire.encode_frame(request, cfg.cluster))
                await writer.drain()
                response = await self._read_frame(reader)
            if not isinstance(response, PushPullResponse):
                raise MalformedPacket("a push-pull request came back instead of a response")
        except WireError as exc:
            self._dropped(exc, dest, self.stats.stream_dropped)
            return
        except (OSError, TimeoutError, EOFError) as exc:
            self.stats.stream_errors += 1
            log = self._log.info if request.join else self._log.debug
            log("gossip.push_pull_failed", dest=_fmt_addr(dest), join=request.join, error=_describe(exc))
            return
        finally:
            if writer is not None:
                writer.close()
        self._heard_from(dest)
        self._step(dest, response)
        if request.join:
            self._joined.set()

    async def _check(self, check: ReachCheck) -> None:
        """One reachability check the core asked for; its outcome goes back to the core."""
        outcome = await reach(check.address, check.timeout, self._tcp_local)
        self.stats.checks[outcome] += 1
        self._log.debug("gossip.reach", member=check.name, address=_fmt_addr(check.address), outcome=outcome.value)
        if self._closed or self._swim is None:
            return
        try:
            self._swim.reachability(check, outcome, time.monotonic())
        except Exception:  # noqa: BLE001 - as in _step
            self.stats.core_errors += 1
            self._log.exception("gossip.core_error", during="reachability", member=check.name)
        self._flush()

    async def _read_frame(self, reader: asyncio.StreamReader) -> PushPull:
        try:
            header = await reader.readexactly(wire.FRAME_HEADER)
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise EOFError("the peer closed the connection without a frame") from None
            raise TruncatedPacket(f"{len(exc.partial)} bytes of a {wire.FRAME_HEADER}-byte frame header") from None
        length = wire.frame_length(header, max_bytes=self.config.max_frame)
        try:
            payload = await reader.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            raise TruncatedPacket(f"{len(exc.partial)} of {length} frame bytes") from None
        return wire.decode_frame(payload, self.config.cluster)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One push-pull exchange started by a peer: read its request, answer on the connection."""
        peer = writer.get_extra_info("peername")
        src: Address = (str(peer[0]), int(peer[1])) if peer else ("", 0)
        if self._closed or self._swim is None or self._inbound >= self.config.max_inbound_streams:
            self.stats.streams_refused += 1
            writer.close()
            return
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._inbound += 1
        self.stats.streams_accepted += 1
        try:
            async with asyncio.timeout(self.config.stream_timeout):
                request = await self._read_frame(reader)
                if not isinstance(request, PushPullRequest):
                    raise MalformedPacket("a push-pull response arrived as a request")
                fut: asyncio.Future[PushPull] = asyncio.get_running_loop().create_future()
                self._pending[src] = fut
                sender = self._core().member(request.sender)
                self._step(src, request)
                if sender is not None:
                    self._heard_from(sender.address)
                response = await fut
                writer.write(wire.encode_frame(response, self.config.cluster))
                await writer.drain()
        except WireError as exc:
            self._dropped(exc, src, self.stats.stream_dropped)
        except EOFError:
            self.stats.checks_served += 1  # connected and closed: a reachability check
        except (OSError, TimeoutError) as exc:
            self.stats.stream_errors += 1
            self._log.debug("gossip.push_pull_failed", src=_fmt_addr(src), error=_describe(exc))
        except asyncio.CancelledError:
            pass  # closing: the connection goes with the member
        finally:
            self._inbound -= 1
            self._pending.pop(src, None)
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    # ------------------------------------------------------------------ events and tasks

    def _deliver(self, ev: MemberEvent) -> None:
        m = ev.member
        # A suspicion is routine (most are refuted); a death is what an operator looks for.
        log = self._log.warning if ev.kind is EventKind.DEAD else self._log.info
        log(
            f"gossip.member_{ev.kind.value}", name=m.name, incarnation=m.incarnation,
            address=_fmt_addr(m.address), state=m.state.value,
        )
        for q in self._queues:
            try:
                q.put_nowait(ev)
            except asyncio.QueueFull:
                self.stats.events_dropped += 1
        for cb in list(self._callbacks):
            try:
                cb(ev)
            except Exception:  # noqa: BLE001 - a subscriber's bug is its own
                self._log.exception("gossip.callback_failed", event=ev.kind.value, name=m.name)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log.error("gossip.task_failed", error=repr(task.exception()))


async def _wait(fut: asyncio.Future[Any], timeout: float) -> None:
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(fut), timeout)


def _fmt(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _fmt_addr(address: tuple[str, int]) -> str:
    return f"{_fmt(address[0])}:{address[1]}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
