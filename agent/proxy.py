"""The service proxy: every agent listens on each Service port and forwards TCP
connections to an endpoint chosen by the service's balancing algorithm.

Rules:
- One listener per (service, port) and one per nodePort; listeners follow the tables:
  a new service port opens one, a removed one closes it (open connections finish). A
  port whose algorithm or application protocol (`app_protocol`: `http` is served by
  `shoal.agent.httpproxy`, anything else as plain TCP) changes gets a new listener.
- Each connection picks one endpoint. A refused or timed-out connect is retried on
  another endpoint (the failed one excluded) until every endpoint was tried; only then is
  the client's connection closed.
- An endpoint that accepts and then closes or resets before sending a single byte is a
  failed connect too: that is what a host-port publisher does when its container has
  just died. What the client sent so far (up to `replay_limit`) is replayed to the next
  endpoint. Once the endpoint has answered, nothing is ever replayed. A client that
  closed without sending a byte (a TCP health check) was owed no answer: the endpoint's
  close is passed on, not charged.
- `endpoint_down()` (the endpoint left the table, or lost readiness): connections still
  waiting for its first answer move to another endpoint at once, spliced ones to it are
  cut. A peer that vanished with its network namespace never resets, so waiting on it
  would hold the client until a timeout.
- Half-close is forwarded both ways: a side that finished sending (EOF) leaves the other
  direction open until it finishes too.
- Flow control: at most `chunk` bytes wait in the proxy per direction of a connection;
  beyond that the proxy stops reading from the sender until the receiver catches up, so
  a slow reader costs the proxy bounded memory and slows its writer down.
- Stuck peers are bounded: `connect_timeout` for a connect, `answer_timeout` for an
  endpoint that was sent bytes and answers none (it counts as a failure, for ejection,
  and as error kind `answer_timeout`), `idle_timeout` for a connection with no byte
  either way (no error: idle connections end).
- A port that cannot be bound is reported once through `on_event` (and retried when the
  tables next change); the other listeners keep working.
- Table updates never reset a listener's picker state, so round robin keeps counting.

How it works: the data path is asyncio protocols, not streams. A client connection is
a `_Client` protocol; each attempt at an endpoint is one task (the connect, bounded by
`connect_timeout`) and then an `_Upstream` protocol. Once the endpoint has answered,
each chunk is one `data_received` callback writing straight into the other side's
transport: no coroutine, task or future per chunk. Flow control is the transports'
`pause_writing`/`resume_writing` driving `pause_reading`/`resume_reading` of the other
side. Bytes are counted per connection in plain integers and added to the metrics when
the connection ends and on every sweep: one timer per proxy (running while there are
connections) that also enforces the answer and idle timeouts, so no chunk ever touches
a timer or a metric lock. The open connections are also what `endpoint_down` looks
through: no per-connection registration for an event that rare.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from shoal.agent.dataplane import KernelDataPlane
from shoal.agent.metrics import AgentMetrics, ServiceMeters
from shoal.balancing import Endpoint, OutlierEjector, Picker, RetryBudget, make_picker
from shoal.errors import ConfigError
from shoal.model import Algorithm

__all__ = ["ProxyConfig", "ServiceProxy", "Route", "EndpointWatch"]

# The write-buffer high-water mark asyncio's and uvloop's transports start with.
_LOOP_HIGH_WATER = 65536
_NOTHING: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyConfig:
    """Timeouts in seconds; sizes in bytes."""

    bind_host: str = "0.0.0.0"
    # Connect timeout: a LAN connect takes well under a millisecond; 1 s tolerates a
    # loaded host while bounding how long a dead endpoint delays a client.
    connect_timeout: float = 1.0
    # Bytes held per direction of a connection (the transports' write-buffer high-water
    # mark) before the proxy stops reading the sending side. 64 KiB keeps a fast stream
    # moving between two socket buffers while bounding what a slow reader costs:
    # 10,000 connections with a slow reader each hold at most about 1.3 GB in total.
    chunk: int = 65536
    # A bound on simultaneous client connections per listener, so a flood costs file
    # descriptors up to a limit, not the agent.
    max_connections: int = 10000
    # What the client sent before the endpoint's first answer is kept (up to this many
    # bytes) so that an endpoint that closes without answering can be replaced by
    # another one transparently. Requests are small; 64 KiB covers them.
    replay_limit: int = 65536
    # An endpoint that was sent bytes and has answered none for this long is taken as
    # stuck (a paused or wedged process: its kernel accepts, nothing serves): the client's
    # connection is closed and the endpoint is charged a failure toward ejection. 60 s is
    # the upper end of what HAProxy users set as `timeout server`: a slow first answer
    # still gets through.
    answer_timeout: float = 60.0
    # A connection with no byte either way for this long is closed. 900 s is the TCP
    # timeout of IPVS, which carries Swarm's routing mesh: idle database and message
    # broker connections survive, peers that vanished without a reset do not hold
    # descriptors forever.
    idle_timeout: float = 900.0

    def validate(self) -> ProxyConfig:
        """Raise `ConfigError` if these settings cannot work; return self."""
        problems: list[str] = []
        for name in ("connect_timeout", "answer_timeout", "idle_timeout"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be a positive number of seconds (got {getattr(self, name)!r})")
        for name in ("chunk", "max_connections"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1 (got {getattr(self, name)!r})")
        if self.replay_limit < 0:
            problems.append(f"replay_limit must not be negative (got {self.replay_limit!r})")
        if problems:
            raise ConfigError("proxy settings: " + "; ".join(problems))
        return self

    @property
    def sweep_interval(self) -> float:
        """Seconds between sweeps: an eighth of the shorter of the answer and idle
        timeouts (so they fire at most a quarter late), between 10 ms and 5 s (metrics of
        long connections are at most 5 s behind)."""
        return min(5.0, max(0.01, min(self.answer_timeout, self.idle_timeout) / 8))


@dataclass(slots=True)
class Route:
    """One listening port of one service."""

    service: str
    port: int
    algorithm: Algorithm
    picker: Picker
    server: asyncio.AbstractServer | None = None
    active: int = 0
    served: dict[str, int] = field(default_factory=dict)  # endpoint → connections
    ejector: OutlierEjector = field(default_factory=OutlierEjector)
    budget: RetryBudget = field(default_factory=RetryBudget)
    protocol: str = "tcp"  # the table port's app_protocol; "http" is served by shoal.agent.httpproxy


class EndpointWatch:
    """What `ServiceProxy.watch_endpoint` returns: pass it to `unwatch`."""

    __slots__ = ("replica_id", "callback")

    def __init__(self, replica_id: str, callback: Callable[[], None]) -> None:
        self.replica_id = replica_id
        self.callback = callback


class ServiceProxy:
    def __init__(
        self,
        config: ProxyConfig = ProxyConfig(),
        *,
        rng: random.Random | None = None,
        on_event: Callable[[str, str, str, str], None] | None = None,
        logger: Any = None,
        metrics: AgentMetrics | None = None,
        dataplane: KernelDataPlane | None = None,
    ) -> None:
        self.config = config.validate()
        # Kernel-mode services go to the kernel data plane first; what it does not take
        # (nftables unusable, a port it lost) the proxy carries.
        self.dataplane = dataplane
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._on_event = on_event or (lambda *_: None)
        self._log = logger or structlog.get_logger("shoal.proxy")
        self.routes: dict[int, Route] = {}  # by listening port
        self._failed_ports: dict[int, str] = {}
        # What else wants to hear of `endpoint_down` (http connections), by endpoint.
        self._watches: dict[str, set[EndpointWatch]] = {}
        # TCP client connections open: for the sweep, and for `endpoint_down`, which is
        # rare enough to look through them rather than have every connection register.
        self._live: set[_Client] = set()
        self._sweep: asyncio.TimerHandle | None = None
        # The loop the listeners run on, kept: asyncio.get_running_loop() costs a getpid()
        # system call, and a connection would need several.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._metered: set[str] = set()  # services with metric series

    # --- endpoints going away --------------------------------------------------------------

    def watch_endpoint(self, replica_id: str, callback: Callable[[], None]) -> EndpointWatch:
        """Call `callback()` (once) if `endpoint_down(replica_id)` comes before `unwatch`.

        For connections of other listeners (http) while attached to an endpoint: one
        waiting for a first answer moves elsewhere when called, a spliced one closes.
        TCP connections need none: `endpoint_down` finds them among the open ones."""
        watch = EndpointWatch(replica_id, callback)
        watches = self._watches.get(replica_id)
        if watches is None:
            watches = self._watches[replica_id] = set()
        watches.add(watch)
        return watch

    def unwatch(self, handle: EndpointWatch) -> None:
        """Stop watching; harmless after the callback ran or twice."""
        watches = self._watches.get(handle.replica_id)
        if watches is not None:
            watches.discard(handle)
            if not watches:
                del self._watches[handle.replica_id]

    def endpoint_down(self, replica_id: str) -> None:
        """An endpoint is gone: connections still waiting on its answer go elsewhere,
        connections spliced to it are closed."""
        watches = self._watches.pop(replica_id, set())
        attached = [c for c in self._live if c.ep is not None and c.ep.replica_id == replica_id
                    and (c.state is _State.WAITING or c.state is _State.SPLICED)]
        self._log.debug("proxy.endpoint_down", replica=replica_id, attached=len(watches) + len(attached))
        for client in attached:
            client.endpoint_down()
        for watch in watches:
            try:
                watch.callback()
            except Exception as exc:  # one broken connection must not spare the others
                self._log.error("proxy.endpoint_down_failed", replica=replica_id, error=repr(exc))

    # --- listeners --------------------------------------------------------------------------

    async def update(self, tables: Iterable[Any]) -> None:
        """Follow a full set of tables (shoal.v1.Table messages)."""
        wanted: dict[int, tuple[str, Algorithm, str, list[Endpoint]]] = {}
        tables_seen = list(tables)
        # Ports the kernel carries: its DNAT happens before any socket sees a packet, so
        # a listener there would only hide that nothing serves the port.
        kernel = await self.dataplane.update(tables_seen) if self.dataplane is not None else frozenset()
        for t in tables_seen:
            try:
                algorithm = Algorithm(t.algorithm)
            except ValueError:
                algorithm = Algorithm.ROUND_ROBIN
            endpoints = [Endpoint(replica_id=e.pod, address=e.address, port=e.port, weight=e.weight or 1) for e in t.endpoints]
            for p in t.ports:
                protocol = getattr(p, "app_protocol", "") or "tcp"
                for port in (p.port, p.node_port):
                    if not port or port in kernel:
                        continue
                    if port in wanted and wanted[port][0] != t.service:
                        self._report_once(port, t.service, f"port {port} is already used by service {wanted[port][0]}")
                        continue
                    wanted[port] = (t.service, algorithm, protocol, endpoints)
        for port, open_route in list(self.routes.items()):
            want = wanted.get(port)
            if want is None or want[:3] != (open_route.service, open_route.algorithm, open_route.protocol):
                await self._close(port)
        for port, (service, algorithm, protocol, endpoints) in sorted(wanted.items()):
            route = self.routes.get(port)
            if route is None:
                route = Route(service=service, port=port, algorithm=algorithm,
                              picker=make_picker(algorithm, endpoints, self._rng), protocol=protocol)
                if await self._listen(route):
                    self.routes[port] = route
            else:
                gone = {e.replica_id for e in route.picker.endpoints} - {e.replica_id for e in endpoints}
                route.picker.update(endpoints)
                route.ejector.forget(e.replica_id for e in endpoints)
                for rid in gone:
                    self.endpoint_down(rid)
        for port in list(self._failed_ports):
            if port not in wanted:
                del self._failed_ports[port]
        if self._metrics is not None:
            m = self._metrics
            services = {t.service: t for t in tables_seen}
            for name, t in services.items():
                m.table_version.labels(name).set(t.version)
                m.table_endpoints.labels(name).set(len(t.endpoints))
            for name in self._metered - set(services):
                m.forget_service(name)
            self._metered = set(services)

    async def _listen(self, route: Route) -> bool:
        factory: Callable[[], asyncio.BaseProtocol]
        if route.protocol == "http":
            from shoal.agent.httpproxy import http_protocol_factory

            factory = http_protocol_factory(self, route)
        else:
            factory = functools.partial(_Client, self, route)
        self._loop = loop = asyncio.get_running_loop()
        try:
            route.server = await loop.create_server(
                factory, host=self.config.bind_host, port=route.port, reuse_address=True, backlog=1024)
        except OSError as exc:
            self._report_once(route.port, route.service, f"cannot listen on {self.config.bind_host}:{route.port}: {exc.strerror or exc}")
            return False
        self._failed_ports.pop(route.port, None)
        self._log.info("proxy.listening", service=route.service, port=route.port, algorithm=route.algorithm.value,
                       protocol=route.protocol)
        self._on_event("Normal", "Listening", f"service/{route.service}", f"proxy listening on {self.config.bind_host}:{route.port}")
        return True

    def _report_once(self, port: int, service: str, message: str) -> None:
        if self._failed_ports.get(port) == message:
            return
        self._failed_ports[port] = message
        self._log.warning("proxy.port_unavailable", service=service, port=port, error=message)
        self._on_event("Warning", "PortInUse", f"service/{service}", message)

    async def _close(self, port: int) -> None:
        route = self.routes.pop(port, None)
        if route is not None and route.server is not None:
            route.server.close()
            self._log.info("proxy.closed", service=route.service, port=port)

    async def close(self) -> None:
        """Close every listener; open connections finish on their own."""
        for port in list(self.routes):
            await self._close(port)

    # --- what every connection shares ------------------------------------------------------

    def _pick(self, route: Route, failed: set[str] | None, key: bytes | None) -> Endpoint | None:
        """The endpoint for a connection's next attempt, or None (the client is closed):
        ejected endpoints only when nothing else is left, retries within the budget."""
        m = self._metrics
        if failed and not route.budget.try_retry():
            # Retries are capped to a share of requests: under overload, a wave of
            # retries would only add to the load that caused the failures.
            if m is not None:
                m.service(route.service).error("retry_budget")
            return None
        exclude = frozenset(failed) if failed else _NOTHING
        ejected = route.ejector.ejected(time.monotonic())
        ep = route.picker.pick(exclude=exclude | ejected, key=key) if ejected else None
        if ep is None:
            ep = route.picker.pick(exclude=exclude, key=key)
        if ep is None:
            if failed:
                self._log.warning("proxy.no_endpoint_answered", service=route.service, tried=len(failed))
            if m is not None:
                m.service(route.service).error("no_endpoint")
            return None
        if failed and m is not None:
            m.service(route.service).retries.inc()  # another endpoint, after a failure
        return ep

    def _failure(self, route: Route, replica_id: str) -> None:
        if route.ejector.record(replica_id, False, time.monotonic(), len(route.picker.endpoints)):
            self._log.warning("proxy.endpoint_ejected", service=route.service, replica=replica_id)
            self._on_event("Warning", "EndpointEjected", f"pod/{replica_id}",
                           f"ejected from service {route.service} after repeated failed connections")
            if self._metrics is not None:
                self._metrics.service(route.service).ejections.inc()

    def _track(self, client: _Client) -> None:
        self._live.add(client)
        if self._sweep is None:
            assert self._loop is not None
            self._sweep = self._loop.call_later(self.config.sweep_interval, self._sweep_now)

    def _sweep_now(self) -> None:
        """Timeouts and byte counts of every open connection; again while any is open."""
        self._sweep = None
        now = time.monotonic()
        for client in list(self._live):
            client.sweep(now)
        if self._live:
            assert self._loop is not None
            self._sweep = self._loop.call_later(self.config.sweep_interval, self._sweep_now)


class _State(enum.Enum):
    CONNECTING = "connecting"  # no endpoint connected: client bytes are buffered
    WAITING = "waiting"  # connected, no byte back yet: client bytes go on and are kept
    SPLICED = "spliced"  # the endpoint answered: bytes flow both ways, nothing is kept
    CLOSING = "closing"  # one side is gone; the other is being closed
    CLOSED = "closed"  # the client's connection is gone


class _Upstream(asyncio.Protocol):
    """The endpoint side of one attempt. Everything but forwarding goes to its client,
    which ignores attempts it has moved on from."""

    __slots__ = ("client", "transport", "spliced", "to_client")

    to_client: asyncio.Transport  # set when spliced

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.spliced = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.client.up_made(self)

    def data_received(self, data: bytes) -> None:
        if self.spliced:  # the hot path: one write, one addition
            self.client.n_out += len(data)
            self.to_client.write(data)
        else:
            self.client.up_data(self, data)

    def eof_received(self) -> bool:
        return self.client.up_eof(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.up_lost(self)

    def pause_writing(self) -> None:
        self.client.up_full(self, True)

    def resume_writing(self) -> None:
        self.client.up_full(self, False)


class _Client(asyncio.Protocol):
    """One client connection through a TCP route, and its attempts at endpoints."""

    __slots__ = (
        "proxy", "route", "m", "transport", "state", "spliced", "to_up", "up", "ep", "picked", "task", "timer",
        "failed", "key", "sent", "eof", "up_finished", "n_in", "n_out", "counted_in", "counted_out", "accepted",
        "connected", "latency", "counted", "seen", "quiet_since", "paused_buffer", "paused_up",
    )

    to_up: asyncio.Transport  # the endpoint's transport, once spliced

    def __init__(self, proxy: ServiceProxy, route: Route) -> None:
        self.proxy = proxy
        self.route = route
        self.m: ServiceMeters | None = None
        self.transport: asyncio.Transport | None = None
        self.state = _State.CONNECTING
        self.spliced = False
        self.up: _Upstream | None = None  # the current attempt
        self.ep: Endpoint | None = None  # its endpoint
        self.picked = False  # picker.started() was called for the current attempt
        self.task: asyncio.Task[None] | None = None  # the current connect
        self.timer: asyncio.TimerHandle | None = None  # and its timeout
        self.failed: set[str] | None = None  # endpoints that failed this connection
        self.key: bytes | None = None  # consistent hash: the client's address
        # What the client sent before an answer: replayed to the next endpoint if this
        # one fails; None once it outgrew `replay_limit` (or once answered).
        self.sent: bytearray | None = bytearray()
        self.eof = False  # the client has finished sending
        self.up_finished = False  # the endpoint has finished sending
        self.n_in = self.n_out = 0  # bytes from the client, from the endpoint
        self.counted_in = self.counted_out = 0  # of which already added to the metrics
        self.accepted = self.connected = 0.0
        self.latency: float | None = None  # connect to first byte
        self.counted = False  # in route.active
        self.seen = -1  # bytes either way at the last sweep
        self.quiet_since = 0.0
        self.paused_buffer = False  # client reads paused: the buffer before a connect is full
        self.paused_up = False  # client reads paused: the endpoint's write buffer is full

    # --- the client's transport -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport = t
        proxy, route = self.proxy, self.route
        if proxy._metrics is not None:
            self.m = proxy._metrics.service(route.service)
        if route.active >= proxy.config.max_connections:
            if self.m is not None:
                self.m.error("limit")
            self.state = _State.CLOSED
            t.close()
            return
        self.counted = True
        route.active += 1
        route.budget.request()
        self.accepted = time.monotonic()
        if self.m is not None:
            self.m.active.inc()
        if proxy.config.chunk != _LOOP_HIGH_WATER:
            t.set_write_buffer_limits(proxy.config.chunk)
        if route.algorithm is Algorithm.CONSISTENT_HASH:  # by client address (a syscall: only here)
            peer = t.get_extra_info("peername")
            self.key = str(peer[0]).encode() if peer else None
        proxy._track(self)
        self._next_attempt()

    def data_received(self, data: bytes) -> None:
        if self.spliced:  # the hot path: one write, one addition
            self.n_in += len(data)
            self.to_up.write(data)
            return
        state = self.state
        if state is _State.WAITING:
            self.n_in += len(data)
            sent = self.sent
            if sent is not None:
                if len(sent) + len(data) <= self.proxy.config.replay_limit:
                    sent += data
                else:
                    self.sent = None  # too much to replay: this attempt is the only one
            assert self.up is not None and self.up.transport is not None
            self.up.transport.write(data)
        elif state is _State.CONNECTING:
            self.n_in += len(data)
            assert self.sent is not None  # without a replay copy there is no next attempt
            self.sent += data
            if len(self.sent) > self.proxy.config.replay_limit and not self.paused_buffer:
                self.paused_buffer = True
                self._pause_client(True)
        # CLOSING, CLOSED: the endpoint is gone; what comes now has nowhere to go.

    def eof_received(self) -> bool:
        self.eof = True
        up = self.up.transport if self.up is not None else None
        if up is None or up.is_closing():
            return True  # connecting: the EOF follows the replay
        if self.up_finished:
            # Both directions are done: close both rather than half-close the second
            # (uvloop 0.23 has been seen to abort with "double free" on that path).
            up.close()
            return False
        if up.can_write_eof():
            up.write_eof()
        return True  # half-close: the endpoint may still be sending

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = _State.CLOSED
        self.spliced = False
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.timer is not None:
            self.timer.cancel()
        up = self.up
        if up is not None:
            up.spliced = False  # stale from now on: what still comes is dropped
            if up.transport is not None:
                up.transport.close()  # what the client sent before leaving still goes
        self._end_attempt()
        self._finish()

    def pause_writing(self) -> None:
        if self.up is not None and self.up.transport is not None and not self.up.transport.is_closing():
            self.up.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None and self.up.transport is not None and not self.up.transport.is_closing():
            self.up.transport.resume_reading()

    # --- attempts ---------------------------------------------------------------------------

    def _next_attempt(self) -> None:
        ep = self.proxy._pick(self.route, self.failed, self.key)
        if ep is None:
            self._close()
            return
        self.state = _State.CONNECTING
        self.ep = ep
        self.up = up = _Upstream(self)
        loop = self.proxy._loop
        assert loop is not None
        self.task = loop.create_task(self._connect(loop, up, ep))
        # A timer handle rather than asyncio.timeout() around the connect: no Timeout
        # object and no current-task lookup, on every connection.
        self.timer = loop.call_later(self.proxy.config.connect_timeout, self._connect_timed_out, up)

    async def _connect(self, loop: asyncio.AbstractEventLoop, up: _Upstream, ep: Endpoint) -> None:
        try:
            await loop.create_connection(lambda: up, ep.address, ep.port)
        except OSError:
            self._failed(up, "connect")
        # Cancelled: the client left, or the connect timed out; both are dealt with there.

    def _connect_timed_out(self, up: _Upstream) -> None:
        if self.up is up and self.state is _State.CONNECTING:
            assert self.task is not None
            self.task.cancel()
            self._failed(up, "connect")

    def up_made(self, up: _Upstream) -> None:
        """The endpoint accepted: replay what the client sent, then wait for an answer."""
        t = up.transport
        assert t is not None
        if self.up is not up or self.state is not _State.CONNECTING:
            t.abort()  # an attempt given up on (its client left, or it timed out)
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        ep = self.ep
        assert ep is not None
        self.state = _State.WAITING
        self.connected = time.monotonic()
        self.route.picker.started(ep.replica_id)
        self.picked = True
        if self.proxy.config.chunk != _LOOP_HIGH_WATER:
            t.set_write_buffer_limits(self.proxy.config.chunk)
        self.seen, self.quiet_since = -1, self.connected
        sent = self.sent
        if sent:
            t.write(bytes(sent))
            if len(sent) > self.proxy.config.replay_limit:
                self.sent = None
        if self.eof and t.can_write_eof():
            t.write_eof()
        if self.paused_buffer:
            self.paused_buffer = False
            self._pause_client(False)  # unless the replay filled the endpoint's buffer

    def up_data(self, up: _Upstream, data: bytes) -> None:
        """The endpoint's first answer: from now on bytes flow both ways untouched."""
        if self.up is not up or self.state is not _State.WAITING or self.transport is None:
            return
        ep = self.ep
        assert ep is not None and up.transport is not None
        now = time.monotonic()
        self.latency = now - self.connected
        route = self.route
        route.served[ep.replica_id] = route.served.get(ep.replica_id, 0) + 1
        route.ejector.record(ep.replica_id, True, now, len(route.picker.endpoints))
        if self.m is not None:
            self.m.connection(ep.replica_id)
            self.m.first_byte.observe(now - self.accepted)
        self.state = _State.SPLICED
        self.sent = None
        self.to_up = up.transport
        up.to_client = self.transport
        self.spliced = up.spliced = True
        self.n_out += len(data)
        self.transport.write(data)

    def up_eof(self, up: _Upstream) -> bool:
        if self.up is not up:
            return False
        if self.state is not _State.SPLICED:
            self._unanswered(up)
            return False
        self.up_finished = True
        t = self.transport
        assert t is not None
        if self.eof:
            t.close()  # both directions done (see eof_received)
            return False
        if t.can_write_eof():
            t.write_eof()
        return True

    def up_lost(self, up: _Upstream) -> None:
        if self.up is not up:
            return
        if self.state is not _State.SPLICED:
            self._unanswered(up)
            return
        self._end_attempt()
        self._close()  # what the endpoint sent before it went still reaches the client

    def _unanswered(self, up: _Upstream) -> None:
        """The endpoint closed or reset before sending a byte."""
        if self.eof and not self.n_in:
            # The client left without asking anything (a TCP health check, a client
            # giving up): there was nothing to answer, so it is no failure of the
            # endpoint's, and nothing to retry.
            self._end_attempt()
            if up.transport is not None:
                up.transport.abort()
            self._close()
            return
        self._failed(up, "dropped")  # a failed connect: try elsewhere with the replay

    def up_full(self, up: _Upstream, full: bool) -> None:
        if self.up is not up:
            return
        self.paused_up = full
        self._pause_client(full)

    def endpoint_down(self) -> None:
        up = self.up
        if up is None:
            return
        if self.state is _State.WAITING:
            self._failed(up, "dropped")  # it will never answer: replay elsewhere now
        elif self.state is _State.SPLICED and up.transport is not None:
            # A peer that vanished with its network namespace never closes: cut it.
            up.transport.abort()

    def _failed(self, up: _Upstream, kind: str) -> None:
        """The attempt on `up` failed before any answer: try another endpoint."""
        if self.up is not up or self.state in (_State.CLOSING, _State.CLOSED):
            return
        ep = self.ep
        assert ep is not None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._end_attempt()
        if up.transport is not None:
            up.transport.abort()
        if self.failed is None:
            self.failed = set()
        self.failed.add(ep.replica_id)
        self.proxy._failure(self.route, ep.replica_id)
        if self.m is not None:
            self.m.error(kind)
        if self.sent is None:
            self._close()  # more was sent than can be replayed
            return
        self.state = _State.CONNECTING
        self._next_attempt()

    def _end_attempt(self) -> None:
        """Tell the picker; the attempt's callbacks are ignored after."""
        if self.picked:
            assert self.ep is not None
            self.picked = False
            self.route.picker.finished(self.ep.replica_id, self.latency)
        if self.up is not None:
            self.up.spliced = False
            self.up = None
        self.spliced = False
        if self.paused_up:  # that endpoint's buffer is gone with it
            self.paused_up = False
            self._pause_client(False)

    # --- the client's side, and the sweep -----------------------------------------------------

    def _pause_client(self, pause: bool) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        if pause:
            t.pause_reading()
        elif not (self.paused_buffer or self.paused_up):
            t.resume_reading()

    def _close(self) -> None:
        """Close the client's connection, after what is buffered for it."""
        if self.state is not _State.CLOSED:
            self.state = _State.CLOSING
        self.spliced = False
        if self.transport is not None:
            self.transport.close()

    def _abort(self) -> None:
        """Cut both sides: a stuck peer will not take what is buffered for it."""
        up = self.up
        self._end_attempt()
        if up is not None and up.transport is not None:
            up.transport.abort()
        if self.state is not _State.CLOSED:
            self.state = _State.CLOSING
        if self.transport is not None:
            self.transport.abort()

    def sweep(self, now: float) -> None:
        """Add the bytes counted since the last sweep; close a stuck connection."""
        self._count_bytes()
        state = self.state
        if state is _State.CONNECTING or state is _State.CLOSED:
            return  # a connect has its own timeout
        moved = self.n_in + self.n_out
        if moved != self.seen:
            self.seen, self.quiet_since = moved, now
            return
        cfg = self.proxy.config
        quiet = now - self.quiet_since
        if state is _State.WAITING and self.n_in and quiet >= cfg.answer_timeout:
            ep = self.ep
            assert ep is not None
            self.proxy._log.warning("proxy.endpoint_stuck", service=self.route.service, replica=ep.replica_id,
                                    seconds=round(quiet, 3))
            self.proxy._failure(self.route, ep.replica_id)
            if self.m is not None:
                self.m.error("answer_timeout")
            self._abort()
        elif quiet >= cfg.idle_timeout:
            # Spliced, waiting, or closing with bytes for a client that takes none.
            self._abort()

    def _count_bytes(self) -> None:
        m = self.m
        if m is None:
            return
        if self.n_in != self.counted_in:
            m.bytes_in(self.n_in - self.counted_in)
            self.counted_in = self.n_in
        if self.n_out != self.counted_out:
            m.bytes_out(self.n_out - self.counted_out)
            self.counted_out = self.n_out

    def _finish(self) -> None:
        if not self.counted:
            return
        self.counted = False
        self.route.active -= 1
        self._count_bytes()
        if self.m is not None:
            self.m.active.dec()
        self.proxy._live.discard(self)
