"""The service proxy's `http` mode: HTTP/1.1 parsed with httptools, balanced per request.

A service port whose table says `app_protocol: http` is served here instead of by the
byte-forwarding path of `shoal.agent.proxy`; `ServiceProxy` creates the listener with
`http_protocol_factory(proxy, route)` and keeps owning the route's picker, ejector and
retry budget.

Rules
- Clients keep their connection between requests (HTTP/1.1 by default, HTTP/1.0 with
  `Connection: keep-alive`). Pipelined requests are parsed ahead (at most `max_pipeline`,
  then the proxy stops reading) and answered strictly in order, one at a time.
- Every request picks its endpoint. Backend connections are pooled per endpoint: one
  goes back to the pool only when its response ended, its request was sent whole and the
  endpoint did not ask to close; at most `pool_size` idle ones are kept per endpoint, each
  for at most `pool_idle_timeout`. One the endpoint closes while idle is dropped when the
  close arrives, and one the endpoint left the table with is dropped at the next sweep.
- Retries go to another endpoint (the failed one excluded and charged a failure, so the
  ejector sees it) within the route's retry budget:
  * a connect that fails (refused, timed out): any method, nothing was sent;
  * a connection that closes, resets or whose endpoint is reported gone
    (`endpoint_down`) before the first byte of the response: idempotent methods (GET,
    HEAD, OPTIONS, TRACE, PUT, DELETE) only, and only while every byte of the request is
    still kept (`replay_limit`). Other requests get 502: the endpoint may have acted;
  * a pooled connection found closed when reused (the endpoint's idle timeout beat the
    pool's): an idempotent request goes once to a fresh connection to the same endpoint,
    not charged to it.
  Once a response byte has reached the client nothing is retried.
- Answers of the proxy itself: 400 (malformed request; then close), 408 (head not
  complete within `header_timeout`; then close), 431 (head over `max_header_bytes`; then
  close), 501 (CONNECT), 502 (no endpoint answered, or its answer was not HTTP), 503 (no
  endpoint, or too many connections), 504 (no response byte within the proxy config's
  `answer_timeout`), 505 (not HTTP/1.x).
- Upgrade (websocket): the request goes to a fresh connection; a 101 answer turns the
  pair into a byte tunnel (closed after the proxy's `idle_timeout` without traffic); any
  other answer is forwarded and the client's connection closed after it.
- Heads: a read that is exactly one HTTP/1.1 head with no body and none of the headers
  the proxy acts on (hop-by-hop, framing, the hash header) goes as received, once
  httptools (a parser without callbacks) accepted it: the usual request costs no Python
  per header. Any other request's head is rebuilt from the parsed fields (httptools
  reports no offsets, and the framing must be the parser's, never a second guess of it):
  request line, then the headers in order as received minus the hop-by-hop ones
  (Connection, Keep-Alive, Proxy-Connection, TE, Trailer, Upgrade and those Connection
  names), plus `Connection: keep-alive` for HTTP/1.0. Bodies keep their framing:
  Content-Length pieces go unchanged, chunked bodies are re-framed chunk by chunk with
  the same payload (chunk extensions and trailers are dropped). A response is forwarded as received; its head is
  rewritten only when the client's connection needs other hop-by-hop headers than the
  endpoint sent (the client asked to close, speaks HTTP/1.0, or the endpoint closes).
- Timeouts, enforced by one sweep per listener (no timer per request): a request head
  must arrive within `header_timeout` of its first byte; a connection idle between
  requests is closed after `keepalive_timeout`; an endpoint gets `answer_timeout` (the
  proxy config's) for its first response byte and then between reads; a connect gets
  `connect_timeout`.
- Bounds: `max_connections` clients per listener (the proxy config's); the parser reads
  at most `max_header_bytes` of head; per direction at most `chunk` bytes wait in the
  proxy before it stops reading the sender.
- Metrics per request: a count by endpoint and status class ("none" for the proxy's own
  answers), and the latency from the request's complete head to the last byte of its
  response (what a client waits: connects and retries included); errors by kind and
  retries as in tcp mode. Requests, open connections and bytes are counted in plain
  integers and added to the metrics at every sweep (`ServiceMeters.add_requests`), so
  they lag by at most a second: a metric's lock per request would cost more than the
  rest of the request.
- `endpoint_down` (through `ServiceProxy.watch_endpoint`, one watch per endpoint
  connection): an idle pooled connection to the endpoint is closed; one waiting for a
  response counts as failed before the first byte (retried as above); one in the middle
  of a response is cut, and so is the client's connection.

How it works: a `_Listener` per route holds the pool, the clients and the sweep (one
timer, running while anything is open). A `_Client` protocol per client connection owns an
`httptools.HttpRequestParser` whose callbacks queue `_Request`s; a `_Backend` protocol
per endpoint connection owns an `httptools.HttpResponseParser` and hands what it reads
to the client it is lent to. Nothing awaits per request: a pooled connection is written
to directly from the parser callback; only opening a new endpoint connection is a task.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left as _bisect_left
import collections
import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import httptools

from shoal.agent.metrics import LATENCY_BUCKETS
from shoal.balancing import Endpoint
from shoal.errors import ConfigError
from shoal.model import Algorithm

if TYPE_CHECKING:
    from shoal.agent.metrics import ServiceMeters
    from shoal.agent.proxy import Route, ServiceProxy

__all__ = ["HttpConfig", "IDEMPOTENT", "http_protocol_factory"]

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
"""Methods RFC 9110 calls idempotent: sending one twice does what sending it once does."""

# Request headers that belong to one connection, not to the request (RFC 9110 §7.6.1).
_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"})
_RESPONSE_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection"})
# Header names a request head goes to the request parser for, searched for after a line
# break in the lowercased head: the hop-by-hop ones, which are taken out, and the framing
# ones, which mean a body. Prefixes, so longer names (te -> tea...) only take the slower
# path. One regular expression: a dozen `bytes.find` calls cost three times as much.
_SLOW_NAMES = (b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade", b"content-length",
               b"transfer-encoding")
_NO_CALLBACKS = object()  # what the fast path's parser calls back: nothing

_REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large",
            501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
            505: "HTTP Version Not Supported"}


def _canned(status: int, close: bool) -> bytes:
    body = f"{status} {_REASONS[status]}\n".encode()
    return (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            + ("Connection: close\r\n" if close else "") + "\r\n").encode() + body


_ANSWERS = {(status, close): _canned(status, close) for status in _REASONS for close in (False, True)}


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpConfig:
    """What http mode adds to `ProxyConfig` (seconds; bytes)."""

    # A request head must be complete this long after its first byte: a slowloris client
    # trickling a head holds a connection at most this long. HAProxy users set 5-10 s
    # (`timeout http-request`); a real client sends a head in one packet.
    header_timeout: float = 10.0
    # A client connection idle between requests is closed after this: browsers reuse
    # theirs within seconds, and an idle connection costs a descriptor. nginx's
    # keepalive_timeout is 75 s; 60 s is below most client-side idle timeouts.
    keepalive_timeout: float = 60.0
    # Largest request head read: nginx answers 400 past 4 x 8 KiB, HAProxy past its
    # 16 KiB buffer; 32 KiB takes big cookies and refuses floods of headers.
    max_header_bytes: int = 32768
    # Idle endpoint connections kept per endpoint: enough for the concurrency of a busy
    # service on one agent, so steady load opens none; beyond it they are closed.
    pool_size: int = 256
    # An idle endpoint connection is closed after this, below the 5 s idle timeout of
    # Node.js and Apache servers, so the endpoint rarely closes one just as it is reused.
    pool_idle_timeout: float = 4.0
    # Requests parsed ahead of the one in flight on one client connection before the
    # proxy stops reading it: pipelining clients send a few; this bounds the memory.
    max_pipeline: int = 16

    def validate(self) -> HttpConfig:
        """Raise `ConfigError` if these settings cannot work; return self."""
        problems = [f"{name} must be a positive number of seconds (got {getattr(self, name)!r})"
                    for name in ("header_timeout", "keepalive_timeout", "pool_idle_timeout")
                    if not getattr(self, name) > 0]
        problems += [f"{name} must be at least 1 (got {getattr(self, name)!r})"
                     for name in ("max_header_bytes", "max_pipeline") if getattr(self, name) < 1]
        if self.pool_size < 0:
            problems.append(f"pool_size must not be negative (got {self.pool_size!r})")
        if problems:
            raise ConfigError("http proxy settings: " + "; ".join(problems))
        return self


def http_protocol_factory(proxy: ServiceProxy, route: Route, config: HttpConfig | None = None, *,
                          hash_header: str | None = None) -> _Listener:
    """A zero-argument factory of client protocols for `loop.create_server`, serving
    `route` in http mode. Call it from within the running loop.

    `hash_header` is the header consistent_hash keys on (default: the route's
    `hash_header`, from the table); requests without it, or with no header named, key on
    the client's address."""
    if hash_header is None:
        hash_header = getattr(route, "hash_header", "")
    return _Listener(proxy, route, (config or HttpConfig()).validate(), hash_header or "")


# Reasons a client connection's reading is paused; reading resumes when none is left.
_PAUSE_PIPELINE = 1  # too many requests parsed ahead
_PAUSE_BACKEND = 2  # the endpoint is not reading what the client sends
_PAUSE_PENDING = 4  # body bytes wait for an endpoint connection
_PAUSE_DONE = 8  # nothing more is read: an error answer or a tunnel waiting for its 101

# What a client connection waits for; the sweep enforces the matching timeout.
_IDLE = 0  # between requests (keepalive_timeout)
_HEAD = 1  # a request head has begun (header_timeout)
_WAIT = 2  # an endpoint's response (answer_timeout, also between its reads)
_TUNNEL = 3  # upgraded: bytes both ways (the proxy's idle_timeout)


class _Listener:
    """One http route's shared state: its connection pool, open clients and sweep."""

    __slots__ = ("proxy", "route", "config", "loop", "pools", "clients", "meters", "hash_name", "sweep",
                 "tick", "answer_timeout", "connect_timeout", "idle_timeout", "replay_limit", "chunk",
                 "max_connections", "now", "ejected", "counts", "buckets", "seconds", "max_header_bytes",
                 "max_pipeline", "feedback", "slow_head", "failing",
                 "unearned", "opened", "bytes_in", "bytes_out",
                 "keepalive_timeout", "pool_size")

    def __init__(self, proxy: ServiceProxy, route: Route, config: HttpConfig, hash_header: str) -> None:
        self.proxy = proxy
        self.route = route
        self.config = config
        self.loop = asyncio.get_running_loop()
        pc = proxy.config
        self.answer_timeout: float = getattr(pc, "answer_timeout", 60.0)
        self.idle_timeout: float = getattr(pc, "idle_timeout", 900.0)
        self.connect_timeout = pc.connect_timeout
        self.replay_limit = pc.replay_limit
        self.chunk = pc.chunk
        self.max_connections = pc.max_connections
        self.pools: dict[str, list[_Backend]] = {}  # idle connections by replica id, newest last
        self.clients: set[_Client] = set()
        self.meters: ServiceMeters | None = (proxy._metrics.service(route.service) if proxy._metrics is not None
                                             else None)
        keyed = route.algorithm is Algorithm.CONSISTENT_HASH and hash_header
        self.hash_name: bytes | None = hash_header.lower().encode("latin-1") if keyed else None
        # What sends a read to the request parser instead of the fast path, as searched
        # for in its lowercased bytes: one of those headers (the hash header too: its
        # value is the key), or bytes after the end of a head.
        names = _SLOW_NAMES + ((self.hash_name,) if self.hash_name is not None else ())
        self.slow_head = re.compile(b"\r\n(?:" + b"|".join(re.escape(n) for n in names) + b"|\r\n.)", re.DOTALL)
        self.sweep: asyncio.TimerHandle | None = None
        # The sweep's period: an eighth of the shortest timeout (so each fires at most a
        # quarter late), between 10 ms and 1 s.
        self.tick = min(1.0, max(0.01, min(config.header_timeout, config.keepalive_timeout,
                                           config.pool_idle_timeout, self.answer_timeout) / 8))
        self.now = self.loop.time()
        self.max_header_bytes = config.max_header_bytes
        self.keepalive_timeout = config.keepalive_timeout
        self.pool_size = config.pool_size
        self.max_pipeline = config.max_pipeline
        # Whether the picker uses `started`/`finished` (the others' are no-ops: two calls
        # a request saved).
        self.feedback = route.algorithm in (Algorithm.LEAST_CONN, Algorithm.P2C_EWMA)
        # Ejected endpoints, as of the last sweep or failure: ejections last a second or
        # more, and asking the ejector on every request would cost a set per request.
        self.ejected: frozenset[str] = frozenset()
        # Endpoints charged a failure since their last success: only their successes need
        # telling the ejector (which counts failures in a row), as only this listener
        # charges its route's endpoints.
        self.failing: set[str] = set()
        # Requests not yet credited to the route's retry budget (a call per request
        # saved): they are credited before the budget is next asked for a retry, and at
        # every sweep.
        self.unearned = 0
        # Requests answered since the last sweep, in plain integers (a metric's lock per
        # request would cost more than the rest of the request): by (endpoint, status //
        # 100), latencies per bucket of LATENCY_BUCKETS (+Inf last), and their sum.
        self.counts: dict[tuple[str, int], int] = {}
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.seconds = 0.0
        # Client connections opened less those closed, and bytes each way, since the
        # last flush: added to the metrics with the requests (three metric locks a
        # connection saved).
        self.opened = 0
        self.bytes_in = 0
        self.bytes_out = 0

    def __call__(self) -> _Client:
        return _Client(self)

    # --- pool ------------------------------------------------------------------------------

    def release(self, b: _Backend) -> None:
        """Take back a connection whose exchange ended cleanly."""
        if b.closed:
            return
        pool = self.pools.get(b.replica_id)
        if pool is None:
            pool = self.pools[b.replica_id] = []
        if len(pool) >= self.pool_size:
            b.close()
            return
        b.client = None
        b.idle_since = self.now
        pool.append(b)
        if self.sweep is None:
            self.arm()

    def forget(self, b: _Backend) -> None:
        """An idle connection closed: take it out of its pool."""
        pool = self.pools.get(b.replica_id)
        if pool is not None and b in pool:
            pool.remove(b)

    def connect(self, client: _Client, ep: Endpoint) -> None:
        """Open a new connection to `ep` for `client` (which hears back through
        `_attach` or `_connect_failed`)."""
        loop = self.loop
        task = loop.create_task(loop.create_connection(functools.partial(_Backend, self, ep.replica_id),
                                                       ep.address, ep.port))
        timer = loop.call_later(self.connect_timeout, task.cancel)
        client.connecting = task
        task.add_done_callback(functools.partial(self._connected, client, ep, timer))

    def _connected(self, client: _Client, ep: Endpoint, timer: asyncio.TimerHandle,
                   task: asyncio.Task[tuple[asyncio.BaseTransport, _Backend]]) -> None:
        timer.cancel()
        mine = client.connecting is task
        if mine:
            client.connecting = None
        if task.cancelled():
            if mine:  # the connect timed out (a client that left cancels and moves on)
                client._connect_failed(ep)
            return
        if task.exception() is not None:
            if mine:
                client._connect_failed(ep)
            return
        b = task.result()[1]
        if mine:
            client._attach(b, ep, False)
        else:
            self.release(b)  # the client left: the connection serves the next one

    # --- failures and metrics ------------------------------------------------------------------

    def failure(self, replica_id: str) -> None:
        """`replica_id` failed a request: charge it (it may be ejected)."""
        self.failing.add(replica_id)
        self.proxy._failure(self.route, replica_id)
        self.ejected = self.route.ejector.ejected(self.loop.time())

    def earn(self) -> None:
        """Credit the requests counted in `unearned` to the route's retry budget: as if
        each had been credited when it came, since nothing asked the budget since. Each
        request earns a share of a retry up to a cap, so past reserve / ratio of them
        the budget is full whatever it held, and more need not be credited."""
        n = self.unearned
        if n:
            self.unearned = 0
            budget = self.route.budget
            n = min(n, int(budget.reserve / budget.ratio) + 2 if budget.ratio > 0 else 1)
            for _ in range(n):
                budget.request()

    def count(self, endpoint: str, status: int, seconds: float) -> None:
        """One request answered, for the metrics (added at the next sweep)."""
        key = (endpoint, status // 100)
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        self.buckets[_bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.seconds += seconds
        if self.sweep is None:
            self.arm()

    def flush(self) -> None:
        """Add the requests, connections and bytes counted since the last flush to the
        metrics."""
        m = self.meters
        if m is not None:
            if self.counts:
                m.add_requests(self.counts, self.buckets, self.seconds)
            if self.opened:
                m.active.inc(self.opened)  # connections opened less those closed: may be negative
            if self.bytes_in:
                m.bytes_in(self.bytes_in)
            if self.bytes_out:
                m.bytes_out(self.bytes_out)
        self.opened = self.bytes_in = self.bytes_out = 0
        self.counts = {}
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.seconds = 0.0

    # --- sweep -----------------------------------------------------------------------------

    def arm(self) -> None:
        if self.sweep is None:
            self.sweep = self.loop.call_later(self.tick, self._sweep)

    def _sweep(self) -> None:
        """Timeouts of clients and idle connections, metrics of bytes; again while
        anything is open."""
        self.sweep = None
        now = self.now = self.loop.time()
        self.ejected = self.route.ejector.ejected(now)
        self.earn()
        for client in list(self.clients):
            client.check(now)
        self.flush()
        oldest = now - self.config.pool_idle_timeout
        live = {e.replica_id for e in self.route.picker.endpoints}
        for rid, pool in list(self.pools.items()):
            gone = rid not in live
            for b in [b for b in pool if gone or b.idle_since < oldest]:
                b.close()  # connection_lost takes it out of the pool
            if not pool:
                del self.pools[rid]
        if self.clients or self.pools:
            self.arm()


class _Request:
    """One request parsed from a client: what is sent of it and what is kept to resend.

    Slotted, with every field set here: Python 3.11 reads a slot with one specialized
    instruction, but a class-level default through an instance's dictionary the slow,
    generic way, and a request's fields are read a dozen times."""

    __slots__ = ("method", "started", "kept", "kept_bytes", "pending", "idempotent", "keep_alive", "http10",
                 "upgrade", "chunked", "key", "pending_bytes", "complete", "stale_retried", "refuse", "deferred")

    def __init__(self, method: bytes, head: bytes, started: float, *, complete: bool = False) -> None:
        self.method = method
        self.started = started
        self.kept: list[bytes] | None = [head]  # everything sent so far; None once over replay_limit
        self.kept_bytes = len(head)
        self.pending: list[bytes] = [head]  # not yet written to the current endpoint connection
        self.idempotent = method in IDEMPOTENT
        self.keep_alive = True
        self.http10 = False
        self.upgrade = False
        self.chunked = False
        self.key: bytes | None = None
        self.pending_bytes = 0
        self.complete = complete  # the whole request has been read from the client
        self.stale_retried = False
        self.refuse = 0  # a status to answer without asking any endpoint, then close
        self.deferred = 0  # a status to answer once the body is read (and dropped)


class _Backend(asyncio.Protocol):
    """One connection to an endpoint: idle in its listener's pool, or lent to a client."""

    __slots__ = ("listener", "replica_id", "transport", "client", "parser", "reused", "idle_since", "closed",
                 "watch", "held", "interim", "final", "keep", "done", "head_sent", "head_request", "eof_ends",
                 "tunnel")

    def __init__(self, listener: _Listener, replica_id: str) -> None:
        self.listener = listener
        self.replica_id = replica_id
        self.transport: asyncio.Transport | None = None
        self.client: _Client | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.reused = False
        self.idle_since = 0.0
        self.closed = False
        self.watch: Any = None
        self.tunnel = False
        self.reset()

    def reset(self) -> None:
        """Ready for the next response."""
        self.held = b""  # the start of a response head not complete yet
        self.interim = 0  # 1xx heads completed in the current read
        self.final = 0  # the final response's status, once its head is complete
        self.keep = False  # the endpoint keeps the connection after this response
        self.done = False  # the final response is complete
        self.head_sent = False
        self.head_request = False  # the request was HEAD: the response has no body
        self.eof_ends = False  # the response's body ends with the connection

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True  # never lent again, though connection_lost comes later
            self.transport.close()

    # --- asyncio -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        transport.set_write_buffer_limits(high=self.listener.chunk)
        watch = getattr(self.listener.proxy, "watch_endpoint", None)
        if watch is not None:
            self.watch = watch(self.replica_id, self._gone)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            self.close()  # bytes nobody asked for: this connection's framing is lost
        elif self.head_sent:
            client.response_data(self, data)
        else:
            client.response_start(self, data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        if self.watch is not None:
            self.listener.proxy.unwatch(self.watch)
            self.watch = None
        client = self.client
        if client is not None:
            self.client = None
            client.backend_lost(self, "closed")
        else:
            self.listener.forget(self)

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.pause(_PAUSE_BACKEND)

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.resume(_PAUSE_BACKEND)

    def _gone(self) -> None:
        """`endpoint_down`: the endpoint left; a peer that vanished may never reset."""
        self.watch = None
        client = self.client
        if client is not None:
            self.client = None
            client.backend_lost(self, "gone")
        self.close()

    # --- httptools -----------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.interim += 1
            return
        self.final = status
        self.keep = self.parser.should_keep_alive()
        if self.head_request:
            self.done = True  # httptools cannot be told to expect no body: the head ends it

    def on_message_complete(self) -> None:
        if self.final:
            self.done = True


class _Client(asyncio.Protocol):
    """One client connection in http mode."""

    __slots__ = ("listener", "route", "transport", "parser", "queue", "parsing", "url", "headers",
                 "conn_tokens", "upgrade_value", "hash_value", "backend", "ep", "connecting", "failed",
                 "answered", "sent_at", "keep_after", "phase", "deadline", "paused", "closed", "error",
                 "head_bytes", "peer_key", "bytes_in", "bytes_out", "tunnel_buf", "meters", "counted",
                 "write_paused", "due", "boundary", "head_check")

    def __init__(self, listener: _Listener) -> None:
        self.listener = listener
        self.route = listener.route
        self.meters = listener.meters
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.queue: collections.deque[_Request] = collections.deque()  # [0] is the one in flight
        self.parsing: _Request | None = None  # the request whose body the parser reads
        self.url = b""
        self.headers: list[bytes] = []  # name, b": ", value, b"\r\n", ... as forwarded
        self.conn_tokens: list[bytes] = []
        self.upgrade_value = b""
        self.hash_value: bytes | None = None
        self.backend: _Backend | None = None
        self.ep: Endpoint | None = None
        self.connecting: asyncio.Task[Any] | None = None
        self.failed: set[str] = set()  # endpoints that failed the request in flight
        self.answered = False  # a byte of the response in flight reached the client
        self.sent_at = 0.0
        self.keep_after = True  # the client's connection stays open after this response
        self.phase = _IDLE
        self.deadline = 0.0
        self.paused = 0
        self.closed = False
        self.error = 0  # an error answer owed once the requests before it are answered
        self.head_bytes = 0
        self.peer_key: bytes | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.tunnel_buf: list[bytes] | None = None  # client bytes after an upgrade request
        self.counted = False  # in the route's active count and the listener's clients
        self.write_paused = False  # the client reads slower than its endpoint answers
        self.due = False  # the request at the head of the queue waits for the read to be parsed
        # The request parser is between messages (fed nothing since its last complete
        # one): a read holding exactly one bodiless request may take the fast path.
        self.boundary = True
        self.head_check: httptools.HttpRequestParser | None = None  # the fast path's parser, made on first use

    # --- asyncio: the client's side --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        listener = self.listener
        route = self.route
        if route.active >= listener.max_connections:
            if self.meters is not None:
                self.meters.error("limit")
            self.closed = True
            transport.write(_ANSWERS[503, True])
            transport.close()
            return
        self.counted = True
        route.active += 1
        listener.opened += 1
        transport.set_write_buffer_limits(high=listener.chunk)
        if route.algorithm is Algorithm.CONSISTENT_HASH:  # by client address (a syscall: only here)
            peer = transport.get_extra_info("peername")
            self.peer_key = str(peer[0]).encode() if peer else None
        listener.clients.add(self)
        self.phase = _HEAD
        self.deadline = listener.loop.time() + listener.config.header_timeout
        listener.arm()

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        # (`boundary` is never set with a tunnel or without a request parser.)
        if self.boundary and not self.queue and data[-4:] == b"\r\n\r\n" and self._fast_request(data):
            return
        if self.phase == _TUNNEL:
            b = self.backend
            if b is not None and b.transport is not None:
                b.transport.write(data)
            self.deadline = self.listener.now + self.listener.idle_timeout
            return
        parser = self.parser
        if parser is None:  # after an upgrade request: kept for the tunnel, or ignored
            if self.tunnel_buf is not None:
                self.tunnel_buf.append(data)
                self.pause(_PAUSE_DONE)
            return
        if self.phase == _IDLE:
            self.phase = _HEAD
            self.deadline = self.listener.loop.time() + self.listener.config.header_timeout
        # Bytes since the last head or body piece the parser finished: what a head in
        # progress has taken (a read's worth too many at most).
        self.head_bytes += len(data)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.parser = None
            self.boundary = False
            self.tunnel_buf = [data[upgrade.args[0]:]] if len(data) > upgrade.args[0] else []
            self.pause(_PAUSE_DONE)
        except httptools.HttpParserError:
            self._fail_parse(400, "bad_request")  # after the requests before it
        if self.due:
            # Sent once the read is parsed, so a head and the body that came with it
            # leave in one write.
            self.due = False
            self._dispatch()
        if self.head_bytes > self.listener.max_header_bytes and self.parser is not None:
            self._fail_parse(431, "header_too_large")
            return
        if len(self.queue) > self.listener.max_pipeline:
            self.pause(_PAUSE_PIPELINE)

    def eof_received(self) -> bool:
        # A client that half-closes after its request still gets the answer: keep the
        # connection until then, and close after it.
        if self.queue:
            self.keep_after = False
            for req in self.queue:
                req.keep_alive = False
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.counted:
            self.counted = False
            self.listener.clients.discard(self)
            self.route.active -= 1
            self.listener.opened -= 1
        self._flush_bytes()
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        b = self.backend
        if b is not None:
            self.backend = None
            b.client = None
            b.close()
            if self.ep is not None:
                self.route.picker.finished(self.ep.replica_id, self.listener.loop.time() - self.sent_at)
        self.transport = None
        # A parser refers back to its protocol: without this, every closed connection
        # would wait for the cyclic garbage collector.
        self.parser = self.head_check = None
        self.boundary = False

    def pause_writing(self) -> None:
        self.write_paused = True
        b = self.backend
        if b is not None and b.transport is not None:
            b.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        b = self.backend
        if b is not None and b.transport is not None and not b.closed:
            b.transport.resume_reading()

    def pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    # --- the fast path: one whole bodiless request per read ----------------------------------

    def _fast_request(self, data: bytes) -> bool:
        """Take `data` (which ends with an empty line) as one request and send its head
        as received, if it is the usual shape: one HTTP/1.1 head and nothing after it
        (nothing pipelined), no body, none of the headers the proxy acts on (hop-by-hop,
        framing; the hash header of a route keyed on one). Returns False, having changed
        nothing, for anything else, which the request parser then reads.

        httptools still checks the head, with a parser that has no callbacks (so no
        Python runs per header): what it accepts has strict CRLF lines, no folded
        values and no space before a colon, so a search for "\r\nname" in the
        lowercased head finds every header of that name, and an endpoint reads the
        forwarded head as the proxy did."""
        listener = self.listener
        if len(data) > listener.max_header_bytes or listener.slow_head.search(data.lower()) is not None:
            return False
        check = self.head_check
        if check is None:
            check = self.head_check = httptools.HttpRequestParser(_NO_CALLBACKS)
        try:
            check.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            # The request parser gives the answer: 400, or 501 for CONNECT (which
            # httptools reports as an upgrade).
            self.head_check = None
            return False
        if not check.should_keep_alive():
            # Without a Connection header, only HTTP/1.1 keeps the connection: HTTP/1.0
            # gets its head rebuilt, other versions a 505, by the request parser. (RTSP/1.1,
            # which httptools also parses, goes as received.)
            self.head_check = None  # it now expects the connection to close
            return False
        req = _Request(check.get_method(), data, listener.loop.time(), complete=True)
        listener.now = req.started
        if self.peer_key is not None:
            req.key = self.peer_key
        self.head_bytes = 0
        listener.unearned += 1
        self.queue.append(req)
        self._dispatch()
        return True

    # --- httptools: the request parser's callbacks ------------------------------------------

    def on_message_begin(self) -> None:
        self.boundary = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # Only names as long as one the proxy acts on are lowered: most headers pass by
        # with no work beyond the append.
        n = len(name)
        if n in (2, 7, 10, 16) or (self.listener.hash_name is not None and n == len(self.listener.hash_name)):
            low = name.lower()
            if low in _HOP:
                if low == b"connection":
                    self.conn_tokens += [t.strip() for t in value.lower().split(b",")]
                elif low == b"upgrade":
                    self.upgrade_value = value
                return
            if low == self.listener.hash_name and self.hash_value is None:
                self.hash_value = value
        self.headers += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None
        listener = self.listener
        method = parser.get_method()
        version = parser.get_http_version()
        http10 = version == "1.0"
        upgrade = parser.should_upgrade()
        headers = self.headers
        if self.conn_tokens:
            extra = [t for t in self.conn_tokens if t not in (b"close", b"keep-alive", b"upgrade")]
            if extra:  # headers the client marked as hop-by-hop by naming them in Connection
                headers = [x for i in range(0, len(headers), 4) if headers[i].lower() not in extra
                           for x in headers[i:i + 4]]
            self.conn_tokens = []
        if upgrade:
            headers += (b"Connection: upgrade\r\nUpgrade: ", self.upgrade_value, b"\r\n")
            self.upgrade_value = b""
        elif http10:
            headers.append(b"Connection: keep-alive\r\n")
        headers.append(b"\r\n")
        head = b"%b %b %b%b" % (method, self.url, b"HTTP/1.0\r\n" if http10 else b"HTTP/1.1\r\n", b"".join(headers))
        req = _Request(method, head, listener.loop.time())
        listener.now = req.started
        if not parser.should_keep_alive():
            req.keep_alive = False
        if http10:
            req.http10 = True
        if version != "1.1" and not http10:
            req.refuse = 505
        elif method == b"CONNECT":
            req.refuse = 501
        elif upgrade:
            req.upgrade = True
        if self.peer_key is not None:
            req.key = self.hash_value if self.hash_value is not None else self.peer_key
            self.hash_value = None
        if b"chunked" in head and _is_chunked(self.headers):
            req.chunked = True
        self.url = b""
        self.headers = []
        self.head_bytes = 0
        self.parsing = req
        listener.unearned += 1
        queue = self.queue
        queue.append(req)
        if len(queue) == 1:
            self.due = True

    def on_body(self, body: bytes) -> None:
        self.head_bytes = 0
        req = self.parsing
        if req is None:
            return
        piece = b"%x\r\n%b\r\n" % (len(body), body) if req.chunked else body
        self._send(req, piece)

    def on_message_complete(self) -> None:
        self.boundary = True
        req = self.parsing
        if req is None:
            return
        self.parsing = None
        if req.chunked:
            self._send(req, b"0\r\n\r\n")
        req.complete = True
        if req.deferred and self.queue and self.queue[0] is req:
            self._answer(req.deferred, close=False)

    def _send(self, req: _Request, piece: bytes) -> None:
        """Body bytes of `req`: to its endpoint connection if it has one, else kept."""
        if req.deferred:
            return
        kept = req.kept
        if kept is not None:
            req.kept_bytes += len(piece)
            if req.kept_bytes > self.listener.replay_limit:
                req.kept = None
            else:
                kept.append(piece)
        b = self.backend
        if b is not None and self.queue and self.queue[0] is req and b.transport is not None:
            b.transport.write(piece)
            if self.phase == _WAIT and not self.answered:
                self.deadline = self.listener.loop.time() + self.listener.answer_timeout
            return
        req.pending.append(piece)
        req.pending_bytes += len(piece)
        if req.pending_bytes > self.listener.chunk:
            self.pause(_PAUSE_PENDING)

    # --- requests to endpoints ---------------------------------------------------------------

    def _dispatch(self) -> None:
        """Send the request at the head of the queue to an endpoint (or answer it)."""
        req = self.queue[0]
        if req.refuse:
            self._answer(req.refuse, close=True)
            return
        listener = self.listener
        if self.failed or listener.ejected:
            ep = self._pick(req.key)
        else:  # the usual: a first attempt with every endpoint in rotation
            ep = self.route.picker.pick(key=req.key)
            if ep is None and self.meters is not None:
                self.meters.error("no_endpoint")
        if ep is None:
            status = 502 if self.failed else 503
            if not req.complete and req is self.parsing:
                # Read the rest of the body and drop it, so the connection stays usable.
                req.deferred = status
                req.kept = None
                req.pending = []
                return
            self._answer(status, close=not req.complete)
            return
        self.phase = _WAIT
        self.deadline = listener.now + listener.answer_timeout
        if not req.upgrade:
            pool = listener.pools.get(ep.replica_id)
            while pool:  # the most recently used idle connection: the likeliest to be open still
                b = pool.pop()
                if not b.closed:
                    self._attach(b, ep, True)
                    return
        listener.connect(self, ep)

    def _pick(self, key: bytes | None) -> Endpoint | None:
        """The endpoint for the request's next attempt, or None: ejected endpoints only
        when nothing else is left, the failed ones never, retries within the budget."""
        route = self.route
        listener = self.listener
        picker = route.picker
        ejected = listener.ejected
        failed = self.failed
        ep: Endpoint | None = None
        if not failed:
            if ejected:
                ep = picker.pick(exclude=ejected, key=key)
            if ep is None:
                ep = picker.pick(key=key)
            if ep is None and listener.meters is not None:
                listener.meters.error("no_endpoint")
            return ep
        m = listener.meters
        listener.earn()
        if not route.budget.try_retry():
            # Retries are capped to a share of requests: under overload, a wave of
            # retries would only add to the load that caused the failures.
            if m is not None:
                m.error("retry_budget")
            return None
        exclude = frozenset(failed)
        if ejected:
            ep = picker.pick(exclude=exclude | ejected, key=key)
        if ep is None:
            ep = picker.pick(exclude=exclude, key=key)
        if ep is None:
            listener.proxy._log.warning("proxy.no_endpoint_answered", service=route.service, tried=len(failed))
            if m is not None:
                m.error("no_endpoint")
        elif m is not None:
            m.retries.inc()  # another endpoint, after a failure
        return ep

    def _attach(self, b: _Backend, ep: Endpoint, reused: bool) -> None:
        """Lend `b` to the request in flight and send it what there is of the request."""
        if self.closed:
            self.listener.release(b)
            return
        req = self.queue[0]
        b.client = self
        b.reused = reused
        if req.method == b"HEAD":
            b.head_request = True  # (reset to False with the rest after every response)
        self.backend = b
        self.ep = ep
        self.answered = False
        self.keep_after = req.keep_alive
        if self.listener.feedback:  # (the other pickers ignore what `sent_at` measures)
            self.route.picker.started(ep.replica_id)
            self.sent_at = self.listener.loop.time()
        transport = b.transport
        assert transport is not None
        if self.write_paused:
            transport.pause_reading()
        pending = req.pending
        if pending:
            transport.write(b"".join(pending) if len(pending) > 1 else pending[0])
            req.pending = []
            if req.pending_bytes:
                req.pending_bytes = 0
                self.resume(_PAUSE_PENDING)

    def _connect_failed(self, ep: Endpoint) -> None:
        """A new connection to `ep` was refused or timed out: nothing was sent, so any
        method goes to the next endpoint."""
        if self.closed or not self.queue:
            return
        self.failed.add(ep.replica_id)
        self.listener.failure(ep.replica_id)
        if self.meters is not None:
            self.meters.error("connect")
        self._dispatch()

    def backend_lost(self, b: _Backend, kind: str) -> None:
        """The endpoint connection lent to the request in flight closed ("closed") or its
        endpoint is gone ("gone")."""
        if b is not self.backend or self.closed:
            return
        self.backend = None
        ep = self.ep
        assert ep is not None
        rid = ep.replica_id
        if b.tunnel:
            self.route.picker.finished(rid, self.listener.loop.time() - self.sent_at)
            self._close()
            return
        if self.answered:
            if b.eof_ends and b.head_sent and kind == "closed":
                b.done = True
                self._finish(b)  # the body was delimited by the close: that was its end
                return
            # Cut mid-response: nothing can be resent; the client sees its connection end.
            self.route.picker.finished(rid, None)
            self.listener.failure(rid)
            if self.meters is not None:
                self.meters.error("dropped")
            self._close()
            return
        req = self.queue[0]
        kept = req.kept if req.idempotent else None  # what may be sent again
        if b.reused and kept is not None and kind == "closed" and not req.stale_retried:
            # The endpoint closed an idle pooled connection as it was being reused: not
            # its fault, and the request may go again on a fresh connection.
            self.route.picker.finished(rid, self.listener.loop.time() - self.sent_at)
            req.stale_retried = True
            req.pending = list(kept)
            if self.meters is not None:
                self.meters.retries.inc()
            self.listener.connect(self, ep)
            return
        self.route.picker.finished(rid, None)
        self.failed.add(rid)
        self.listener.failure(rid)
        if self.meters is not None:
            self.meters.error("dropped")
        if kept is not None:
            req.pending = list(kept)
            self._dispatch()
        else:
            self._answer(502, close=not req.complete)

    def response_data(self, b: _Backend, data: bytes) -> None:
        """Bytes from the endpoint connection lent to the request in flight, after the
        response's head went to the client."""
        self.bytes_out += len(data)
        transport = self.transport
        assert transport is not None
        if b.tunnel:
            transport.write(data)
            self.deadline = self.listener.now + self.listener.idle_timeout
            return
        try:
            b.parser.feed_data(data)
        except httptools.HttpParserError:
            b.done = True  # framing lost: forward what came, close both after it
            b.keep = False
            self.keep_after = False
        transport.write(data)
        self.deadline = self.listener.now + self.listener.answer_timeout
        if b.done:
            self._finish(b)

    def response_start(self, b: _Backend, data: bytes) -> None:
        """The first bytes of a response: interim heads, then the final head (kept back
        until complete, so it can be rewritten), then whatever body followed it."""
        self.bytes_out += len(data)
        transport = self.transport
        assert transport is not None
        if b.interim:
            b.interim = 0
        upgraded = -1
        try:
            b.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            upgraded = upgrade.args[0]
        except httptools.HttpParserError:
            if self.meters is not None:
                self.meters.error("bad_response")
            if not self.answered:
                self.listener.failure(b.replica_id)
                self.route.picker.finished(b.replica_id, None)
                self.backend = None
                b.client = None
                b.close()
                self._answer(502, close=True)
            else:
                self._close()
            return
        else:
            if b.done and not b.held and not b.interim:
                req = self.queue[0]
                if b.keep and req.keep_alive and req.complete and not req.http10 and not req.upgrade:
                    # The usual: a whole response in one read, its head as the endpoint
                    # wrote it, as the client's connection stays open like the endpoint's.
                    b.head_sent = True
                    self.answered = True
                    self.keep_after = True
                    transport.write(data)
                    self._finish(b)
                    return
        if b.held:
            data = b.held + data
            b.held = b""
        pos = 0
        if b.interim:
            for _ in range(b.interim):  # 1xx heads: forwarded as they are
                pos = data.index(b"\r\n\r\n", pos) + 4
        if not b.final:
            if pos:
                self.answered = True
                transport.write(data[:pos])
            b.held = data[pos:]
            if len(b.held) > self.listener.max_header_bytes:
                b.held = b""
                if self.meters is not None:
                    self.meters.error("bad_response")
                self._close()
            return
        req = self.queue[0]
        if b.final == 101 and upgraded >= 0:
            b.tunnel = True
            b.head_sent = True
            self.phase = _TUNNEL
            self.deadline = self.listener.now + self.listener.idle_timeout
            self.answered = True
            transport.write(data)
            buf = self.tunnel_buf or []
            self.tunnel_buf = None
            if buf and b.transport is not None:
                b.transport.write(b"".join(buf))
            self.resume(_PAUSE_DONE)
            self._count(req, 101, b.replica_id)
            return
        close = not req.keep_alive or req.upgrade or not req.complete
        if not close and b.keep and not req.http10:
            out = data  # the usual case: the head goes as the endpoint wrote it
        else:
            end = data.index(b"\r\n\r\n", pos) + 4
            head, b.eof_ends = _rewrite_head(data[pos:end], close=close, http10=req.http10,
                                             bodiless=b.head_request or b.final in (204, 304))
            close = close or b.eof_ends
            out = data[:pos] + head + data[end:] if pos or end < len(data) else head
        self.keep_after = not close
        b.head_sent = True
        self.answered = True
        transport.write(out)
        self.deadline = self.listener.now + self.listener.answer_timeout
        if b.done:
            self._finish(b)

    def _finish(self, b: _Backend) -> None:
        """The response in flight is complete: count it, give the connection back, go on
        with the next request."""
        req = self.queue.popleft()
        self.backend = None
        listener = self.listener
        now = listener.now = listener.loop.time()
        rid = b.replica_id
        route = self.route
        if listener.feedback:
            route.picker.finished(rid, now - self.sent_at)
        if rid in listener.failing:  # a success ends its run of failures
            listener.failing.discard(rid)
            route.ejector.record(rid, True, now, len(route.picker.endpoints))
        served = route.served
        served[rid] = served.get(rid, 0) + 1
        if self.meters is not None:  # `_Listener.count`, inlined: this runs on every request
            seconds = now - req.started
            key = (rid, b.final // 100)
            counts = listener.counts
            counts[key] = counts.get(key, 0) + 1
            listener.buckets[_bisect_left(LATENCY_BUCKETS, seconds)] += 1
            listener.seconds += seconds
            if listener.sweep is None:
                listener.arm()
        if b.keep and req.complete and not b.eof_ends:
            if b.head_request:
                b.parser = httptools.HttpResponseParser(b)
            b.reset()
            if self.write_paused and b.transport is not None:
                b.transport.resume_reading()  # an idle connection must be heard closing
            listener.release(b)
        else:
            b.client = None
            b.close()
        if self.failed:
            self.failed.clear()
        if (self.keep_after and not self.queue and not self.paused and self.parsing is None and not self.head_bytes
                and not self.error):
            # `_next`'s usual case: the client's connection waits for its next request.
            self.phase = _IDLE
            self.deadline = now + listener.keepalive_timeout
            return
        self._next(now)

    def _count(self, req: _Request, status: int, endpoint: str) -> None:
        if self.meters is not None:
            self.listener.count(endpoint, status, self.listener.loop.time() - req.started)

    def _next(self, now: float) -> None:
        """The request at the head of the queue has been answered."""
        if not self.keep_after:
            self._close()
            return
        if self.paused:  # neither reason outlives the request: the endpoint is not ours now
            self.resume(_PAUSE_PIPELINE | _PAUSE_BACKEND)
        if self.queue:
            self._dispatch()
            return
        if self.error:
            self._answer_now(self.error)
            return
        if self.parsing is not None or self.head_bytes:
            self.phase = _HEAD
            self.deadline = now + self.listener.config.header_timeout
        else:
            self.phase = _IDLE
            self.deadline = now + self.listener.config.keepalive_timeout

    # --- answers of the proxy itself -----------------------------------------------------------

    def _answer(self, status: int, *, close: bool) -> None:
        """Answer the request at the head of the queue with `status`."""
        req = self.queue.popleft()
        self.backend = None
        self.failed.clear()
        close = close or not req.keep_alive or req.upgrade
        transport = self.transport
        if transport is not None:
            transport.write(_ANSWERS[status, close])
        self._count(req, status, "none")
        self.keep_after = not close
        self._next(self.listener.loop.time())

    def _answer_now(self, status: int) -> None:
        """An error answer for the connection itself (a bad request, a timeout): sent
        once what came before it is answered, then the connection closes."""
        if self.queue:
            self.error = status
            return
        if self.transport is not None:
            self.transport.write(_ANSWERS[status, True])
        if self.meters is not None:
            self.listener.count("none", status, 0.0)
        self._close()

    def _fail_parse(self, status: int, kind: str) -> None:
        self.parser = None
        self.boundary = False
        self.parsing = None
        self.pause(_PAUSE_DONE)
        if self.meters is not None:
            self.meters.error(kind)
        self._answer_now(status)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()  # after the buffered bytes are written
        b = self.backend
        if b is not None:
            self.backend = None
            b.client = None
            b.close()

    # --- the sweep ---------------------------------------------------------------------------

    def check(self, now: float) -> None:
        """Enforce this connection's timeout; called by the listener's sweep."""
        self._flush_bytes()
        if self.closed or now < self.deadline:
            return
        phase = self.phase
        if phase == _IDLE:
            self._close()
        elif phase == _HEAD:
            if self.queue:  # a request is in flight: its own timeout applies
                self.deadline = now + self.listener.answer_timeout
                return
            if self.meters is not None:
                self.meters.error("header_timeout")
            self.parser = None
            self.boundary = False
            self._answer_now(408)
        elif phase == _TUNNEL:
            self._close()
        else:  # _WAIT: the endpoint has not answered, or stopped in the middle
            if self.meters is not None:
                self.meters.error("answer_timeout")
            b = self.backend
            ep = self.ep
            if b is None or ep is None:  # still connecting: connect_timeout handles it
                self.deadline = now + self.listener.answer_timeout
                return
            self.listener.failure(ep.replica_id)
            self.route.picker.finished(ep.replica_id, None)
            self.backend = None
            b.client = None
            b.close()
            if self.answered:
                self._close()
            else:
                self._answer(504, close=not self.queue[0].complete)

    def _flush_bytes(self) -> None:
        """Hand the bytes counted since the last time to the listener's totals."""
        listener = self.listener
        listener.bytes_in += self.bytes_in
        listener.bytes_out += self.bytes_out
        self.bytes_in = self.bytes_out = 0


def _is_chunked(headers: list[bytes]) -> bool:
    """Whether the last transfer coding of a request is chunked (its framing)."""
    for i in range(0, len(headers), 4):
        if len(headers[i]) == 17 and headers[i].lower() == b"transfer-encoding":
            return headers[i + 2].lower().rstrip().endswith(b"chunked")
    return False


def _rewrite_head(head: bytes, *, close: bool, http10: bool, bodiless: bool) -> tuple[bytes, bool]:
    """A response head with the endpoint's hop-by-hop headers replaced by the client's:
    `Connection: close` when the client's connection ends after it, `keep-alive` for an
    HTTP/1.0 client that keeps it. Returns the head and whether the body is delimited by
    the connection's end (no length, not chunked): then the client's connection must end
    too."""
    lines = head[:-4].split(b"\r\n")
    out = [lines[0]]
    framed = bodiless
    for line in lines[1:]:
        name = line.split(b":", 1)[0].lower()
        if name in _RESPONSE_HOP:
            continue
        if name == b"content-length" or name == b"transfer-encoding":
            framed = True
        out.append(line)
    eof_ends = not framed
    if close or eof_ends:
        out.append(b"Connection: close")
    elif http10:
        out.append(b"Connection: keep-alive")
    out.append(b"\r\n")
    return b"\r\n".join(out), eof_ends
