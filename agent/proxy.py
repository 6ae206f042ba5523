"""The service proxy: every agent listens on each Service port and forwards TCP
connections to an endpoint chosen by the service's balancing algorithm.

Rules:
- One listener per (service, port) and one per nodePort; listeners follow the tables:
  a new service port opens one, a removed one closes it (open connections finish).
- Each connection picks one endpoint. A refused or timed-out connect is retried on
  another endpoint (the failed one excluded) until every endpoint was tried; only then is
  the client's connection closed.
- An endpoint that accepts and then closes or resets before sending a single byte is a
  failed connect too: that is what a host-port publisher does when its container has
  just died. What the client sent so far (up to `replay_limit`) is replayed to the next
  endpoint. Once the endpoint has answered, nothing is ever replayed.
- A port that cannot be bound is reported once through `on_event` (and retried when the
  tables next change); the other listeners keep working.
- Table updates never reset a listener's picker state, so round robin keeps counting.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from shoal.agent.dataplane import KernelDataPlane
from shoal.agent.metrics import AgentMetrics
from shoal.balancing import Endpoint, OutlierEjector, Picker, RetryBudget, make_picker
from shoal.model import Algorithm

__all__ = ["ProxyConfig", "ServiceProxy", "Route"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyConfig:
    """Timeouts in seconds; sizes in bytes."""

    bind_host: str = "0.0.0.0"
    # Connect timeout: a LAN connect takes well under a millisecond; 1 s tolerates a
    # loaded host while bounding how long a dead endpoint delays a client.
    connect_timeout: float = 1.0
    # Read chunk: 64 KiB keeps syscalls few without holding much memory per connection.
    chunk: int = 65536
    # A bound on simultaneous client connections per listener, so a flood costs file
    # descriptors up to a limit, not the agent.
    max_connections: int = 10000
    # What the client sent before the endpoint's first answer is kept (up to this many
    # bytes) so that an endpoint that closes without answering can be replaced by
    # another one transparently. Requests are small; 64 KiB covers them.
    replay_limit: int = 65536


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
        self.config = config
        # Kernel-mode services go to the kernel data plane first; what it does not take
        # (nftables unusable, a port it lost) the proxy carries.
        self.dataplane = dataplane
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._on_event = on_event or (lambda *_: None)
        self._log = logger or structlog.get_logger("shoal.proxy")
        self.routes: dict[int, Route] = {}  # by listening port
        self._failed_ports: dict[int, str] = {}
        # Connections waiting for an endpoint's first answer, by endpoint: when the
        # endpoint is known to be gone they are moved to another one at once instead of
        # waiting on a peer that died mid-request and will never answer or reset.
        self._waiting: dict[str, set[asyncio.Future[None]]] = {}
        self._metered: set[str] = set()  # services with metric series

    def endpoint_down(self, replica_id: str) -> None:
        """An endpoint is gone: connections still waiting on its answer go elsewhere."""
        self._log.debug("proxy.endpoint_down", replica=replica_id, waiting=len(self._waiting.get(replica_id, ())))
        for fut in self._waiting.pop(replica_id, set()):
            if not fut.done():
                fut.set_result(None)

    async def update(self, tables: Iterable[Any]) -> None:
        """Follow a full set of tables (shoal.v1.Table messages)."""
        wanted: dict[int, tuple[str, Algorithm, list[Endpoint]]] = {}
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
                for port in (p.port, p.node_port):
                    if not port or port in kernel:
                        continue
                    if port in wanted and wanted[port][0] != t.service:
                        self._report_once(port, t.service, f"port {port} is already used by service {wanted[port][0]}")
                        continue
                    wanted[port] = (t.service, algorithm, endpoints)
        for port in list(self.routes):
            route = self.routes[port]
            if port not in wanted or wanted[port][0] != route.service or wanted[port][1] != route.algorithm:
                await self._close(port)
        for port, (service, algorithm, endpoints) in sorted(wanted.items()):
            route = self.routes.get(port)
            if route is None:
                route = Route(service=service, port=port, algorithm=algorithm,
                              picker=make_picker(algorithm, endpoints, self._rng))
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
        try:
            route.server = await asyncio.start_server(
                lambda r, w: self._handle(route, r, w),
                host=self.config.bind_host,
                port=route.port,
                reuse_address=True,
                backlog=1024,
            )
        except OSError as exc:
            self._report_once(route.port, route.service, f"cannot listen on {self.config.bind_host}:{route.port}: {exc.strerror or exc}")
            return False
        self._failed_ports.pop(route.port, None)
        self._log.info("proxy.listening", service=route.service, port=route.port, algorithm=route.algorithm.value)
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
        for port in list(self.routes):
            await self._close(port)

    async def _handle(self, route: Route, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        m = self._metrics.service(route.service) if self._metrics is not None else None
        if route.active >= self.config.max_connections:
            if m is not None:
                m.error("limit")
            writer.close()
            return
        route.active += 1
        route.budget.request()
        started = time.monotonic()
        if m is not None:
            m.active.inc()
        failed: set[str] = set()
        sent = bytearray()  # what the client sent before the endpoint answered
        client_done = False
        key = None
        if route.algorithm is Algorithm.CONSISTENT_HASH:  # by client address (a syscall: only here)
            peer = writer.get_extra_info("peername")
            key = str(peer[0]).encode() if peer else None
        try:
            while True:
                upstream = await self._connect(route, failed, key)
                if upstream is None:
                    return
                ur, uw, ep = upstream
                connected = time.monotonic()
                latency: float | None = None  # to the first byte; None: no answer
                route.picker.started(ep.replica_id)
                if sent:
                    uw.write(sent)
                if client_done and uw.can_write_eof():
                    uw.write_eof()
                gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._waiting.setdefault(ep.replica_id, set()).add(gone)
                try:
                    first, client_done = await self._first_answer(reader, ur, uw, sent, client_done, gone)
                    if first is None:
                        # Closed, reset or known gone before a single byte came back:
                        # nothing reached the client, so this counts as a failed connect
                        # (what a stopped container's port publisher looks like) and the
                        # bytes go to another endpoint.
                        uw.close()
                        failed.add(ep.replica_id)
                        self._failure(route, ep.replica_id)
                        if m is not None:
                            m.error("dropped")
                        if len(sent) > self.config.replay_limit:
                            return
                        continue
                    route.served[ep.replica_id] = route.served.get(ep.replica_id, 0) + 1
                    latency = time.monotonic() - connected
                    route.ejector.record(ep.replica_id, True, time.monotonic(), len(route.picker.endpoints))
                    count_in = count_out = None
                    if m is not None:
                        m.connection(ep.replica_id)
                        m.first_byte.observe(time.monotonic() - started)
                        count_in, count_out = m.bytes_in, m.bytes_out
                        count_in(len(sent))
                        count_out(len(first))
                    writer.write(first)
                    await writer.drain()
                    sent.clear()
                    pipes = [_pipe(ur, writer, self.config.chunk, count_out)]
                    if not client_done:
                        pipes.append(_pipe(reader, uw, self.config.chunk, count_in))
                    splice = asyncio.ensure_future(asyncio.gather(*pipes))
                    try:
                        await asyncio.wait({splice, gone}, return_when=asyncio.FIRST_COMPLETED)
                        if not splice.done():
                            # The endpoint died mid-connection; a peer that vanished with
                            # its network namespace never closes, so close for it.
                            uw.close()
                            await splice
                    finally:
                        if not splice.done():
                            splice.cancel()  # the listener is shutting down
                        # Retrieve the outcome so a cancelled splice is not reported as a
                        # lost exception.
                        splice.add_done_callback(lambda f: f.cancelled() or f.exception())
                    return
                finally:
                    uw.close()
                    route.picker.finished(ep.replica_id, latency)
                    waiting = self._waiting.get(ep.replica_id)
                    if waiting is not None:
                        waiting.discard(gone)
                        if not waiting:
                            del self._waiting[ep.replica_id]
        except (ConnectionError, OSError):
            return
        finally:
            route.active -= 1
            if m is not None:
                m.active.dec()
            if not writer.is_closing():
                writer.close()

    async def _first_answer(
        self,
        reader: asyncio.StreamReader,
        ur: asyncio.StreamReader,
        uw: asyncio.StreamWriter,
        sent: bytearray,
        client_done: bool,
        gone: asyncio.Future[None],
    ) -> tuple[bytes | None, bool]:
        """Forward client bytes (keeping a copy) until the endpoint's first bytes arrive.

        Returns (first bytes or None if the endpoint closed without answering, whether
        the client has finished sending).
        """
        answer: asyncio.Task[bytes] = asyncio.ensure_future(ur.read(self.config.chunk))
        ask: asyncio.Task[bytes] | None = None if client_done else asyncio.ensure_future(reader.read(self.config.chunk))
        try:
            while True:
                waiting: set[asyncio.Future[Any]] = {answer, gone} if ask is None else {answer, ask, gone}
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                # Client bytes first: a read that completed must never be dropped, even
                # when the endpoint's answer (or its end) arrived in the same round.
                if ask is not None and ask in done:
                    data = ask.result()
                    ask = None
                    if not data:
                        client_done = True
                        if uw.can_write_eof():
                            uw.write_eof()
                    else:
                        if len(sent) <= self.config.replay_limit:
                            sent.extend(data)
                        uw.write(data)
                        ask = asyncio.ensure_future(reader.read(self.config.chunk))
                if answer in done:
                    try:
                        first = answer.result()
                    except (ConnectionError, OSError):
                        return None, client_done
                    return (first or None), client_done
                if gone in done:
                    return None, client_done
                await uw.drain()
        finally:
            # A pending read is cancelled without losing data: unread bytes stay buffered.
            for t in (answer, ask):
                if t is not None and not t.done():
                    t.cancel()

    async def _connect(self, route: Route, failed: set[str],
                       key: bytes | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Endpoint] | None:
        while True:
            if failed and not route.budget.try_retry():
                # Retries are capped to a share of requests: under overload, a wave of
                # retries would only add to the load that caused the failures.
                if self._metrics is not None:
                    self._metrics.service(route.service).error("retry_budget")
                return None
            ejected = route.ejector.ejected(time.monotonic())
            ep = route.picker.pick(exclude=frozenset(failed) | ejected, key=key) if ejected else None
            if ep is None:
                ep = route.picker.pick(exclude=frozenset(failed), key=key)
            if ep is None:
                if failed:
                    self._log.warning("proxy.no_endpoint_answered", service=route.service, tried=len(failed))
                if self._metrics is not None:
                    self._metrics.service(route.service).error("no_endpoint")
                return None
            if failed and self._metrics is not None:
                self._metrics.service(route.service).retries.inc()  # another endpoint, after a failure
            try:
                ur, uw = await asyncio.wait_for(asyncio.open_connection(ep.address, ep.port), self.config.connect_timeout)
            except (OSError, TimeoutError):
                failed.add(ep.replica_id)
                self._failure(route, ep.replica_id)
                if self._metrics is not None:
                    self._metrics.service(route.service).error("connect")
                continue
            return ur, uw, ep


    def _failure(self, route: Route, replica_id: str) -> None:
        if route.ejector.record(replica_id, False, time.monotonic(), len(route.picker.endpoints)):
            self._log.warning("proxy.endpoint_ejected", service=route.service, replica=replica_id)
            self._on_event("Warning", "EndpointEjected", f"pod/{replica_id}",
                           f"ejected from service {route.service} after repeated failed connections")
            if self._metrics is not None:
                self._metrics.service(route.service).ejections.inc()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, chunk: int,
                count: Callable[[int], None] | None = None) -> None:
    try:
        while data := await src.read(chunk):
            if count is not None:
                count(len(data))
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (ConnectionError, OSError):
        dst.close()
