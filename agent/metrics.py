"""Prometheus metrics of one agent, served at `/metrics` (HTTP, default port 7422).

Rules:
- One `CollectorRegistry` per agent (not the process-global one), so several agents in
  one test process do not mix their figures.
- Scrapes are answered on the agent's event loop (a small HTTP/1.x responder), so the
  collectors read the agent's state without racing it; psutil is sampled at scrape time.
- Names follow Prometheus conventions: `shoal_` prefix, base units (seconds, bytes),
  `_total` on counters; label values are service, endpoint (replica id) and kinds from
  small fixed sets, never client addresses.

What is exported:
- node: CPU, memory, disk (the data directory's filesystem), network bytes (psutil);
- proxy, per service: connections per endpoint, active connections, bytes in and out,
  errors by kind, retries (a connection replayed to another endpoint), ejections, time to the
  endpoint's first byte, and the balancing table's version; on `http` ports also requests
  by endpoint and status class and each request's latency to its response's last byte;
- replicas this agent runs, by state; on servers, Raft term, commit and applied index
  and whether this server leads; gossip members by state;
- per running replica (labels deployment, replica): CPU seconds used and working-set
  memory, read from the runtimes at scrape time (`add_replica_usage`), so a replica
  that is gone leaves no series.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psutil
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from shoal.errors import ConfigError

__all__ = ["AgentMetrics", "DEFAULT_METRICS_PORT", "LATENCY_BUCKETS", "ReplicaUsage"]

DEFAULT_METRICS_PORT = 7422

# Time to first byte through the proxy: a local connect is ~0.1 ms, a slow backend
# seconds; these buckets cover both with a few per decade.
# Error kinds only http ports produce (see `shoal.agent.httpproxy`).
HTTP_ERROR_KINDS = ("bad_request", "header_too_large", "header_timeout", "answer_timeout", "bad_response")
_STATUS_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LATENCY_BUCKETS = _LATENCY_BUCKETS  # the latency histograms' bounds, for `ServiceMeters.add_requests`


class AgentMetrics:
    """Every metric one agent exports, and the HTTP endpoint that serves them."""

    def __init__(self, data_dir: pathlib.Path, *, logger: Any = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.proxy_connections = Counter(
            "shoal_proxy_connections", "Client connections forwarded, by service and endpoint.",
            ["service", "endpoint"], registry=r)
        self.proxy_active = Gauge(
            "shoal_proxy_active_connections", "Client connections open through the proxy.", ["service"], registry=r)
        self.proxy_bytes = Counter(
            "shoal_proxy_bytes", "Bytes forwarded; direction in is client to endpoint, out the reverse.",
            ["service", "direction"], registry=r)
        self.proxy_errors = Counter(
            "shoal_proxy_errors", "Proxy failures by kind: connect (endpoint refused or timed out), "
            "dropped (endpoint closed before answering), no_endpoint (nobody answered), limit (too many "
            "connections), retry_budget (a retry refused under overload); on http ports also bad_request (400), "
            "header_too_large (431), header_timeout (408), answer_timeout (504), bad_response (an endpoint's "
            "answer was not HTTP).", ["service", "kind"], registry=r)
        self.proxy_retries = Counter(
            "shoal_proxy_retries", "Connections replayed to another endpoint after one failed.", ["service"], registry=r)
        self.proxy_ejections = Counter(
            "shoal_proxy_ejections", "Endpoints taken out of rotation after repeated failures.", ["service"],
            registry=r)
        self.proxy_requests = Counter(
            "shoal_proxy_requests", "HTTP requests answered (http ports), by service, endpoint and status class "
            "(2xx...5xx); endpoint is \"none\" for answers of the proxy itself (502, 503...).",
            ["service", "endpoint", "code"], registry=r)
        self.proxy_request_seconds = Histogram(
            "shoal_proxy_request_seconds", "HTTP requests (http ports): from the request's head to the last byte "
            "of its response.", ["service"], buckets=_LATENCY_BUCKETS, registry=r)
        self.proxy_first_byte = Histogram(
            "shoal_proxy_first_byte_seconds", "Time from a client's connection to its endpoint's first byte.",
            ["service"], buckets=_LATENCY_BUCKETS, registry=r)
        self.table_version = Gauge(
            "shoal_service_table_version", "Version of the balancing table the proxy follows.", ["service"], registry=r)
        self.table_endpoints = Gauge(
            "shoal_service_endpoints", "Ready endpoints in the service's balancing table.", ["service"], registry=r)
        self._node = _NodeCollector(data_dir)
        r.register(self._node)
        self._extra = _CallbackCollector()
        r.register(self._extra)
        self._server: asyncio.AbstractServer | None = None
        self._log = logger or structlog.get_logger("shoal.metrics")
        self._services: dict[str, ServiceMeters] = {}

    def service(self, name: str) -> ServiceMeters:
        """The proxy's meters for one service, labelled once: `labels()` costs more
        than the increment itself, and the proxy counts on every request."""
        meters = self._services.get(name)
        if meters is None:
            meters = self._services[name] = ServiceMeters(self, name)
        return meters

    # --- what others add -----------------------------------------------------------------

    def add_gauges(self, name: str, doc: str, labels: tuple[str, ...],
                   read: Callable[[], list[tuple[tuple[str, ...], float]]]) -> None:
        """A gauge family read at scrape time: `read()` returns (label values, value) pairs."""
        self._extra.add(name, doc, labels, read)

    def add_replica_usage(self, read: Callable[[], list[ReplicaUsage]]) -> None:
        """Per-replica CPU and memory, read at scrape time: `read()` returns one
        `ReplicaUsage` per running replica."""
        self.registry.register(_ReplicaUsageCollector(read))

    def forget_service(self, service: str) -> None:
        """Drop the per-service series of a service that is gone (no stale series)."""
        meters = self._services.pop(service, None)
        for endpoint in meters.endpoints if meters is not None else ():
            with contextlib.suppress(KeyError):
                self.proxy_connections.remove(service, endpoint)
        for endpoint, code in meters.requests if meters is not None else ():
            with contextlib.suppress(KeyError):
                self.proxy_requests.remove(service, endpoint, code)
        for metric in (self.proxy_active, self.table_version, self.table_endpoints, self.proxy_first_byte,
                       self.proxy_retries, self.proxy_request_seconds):
            with contextlib.suppress(KeyError):
                metric.remove(service)
        for direction in ("in", "out"):
            with contextlib.suppress(KeyError):
                self.proxy_bytes.remove(service, direction)
        with contextlib.suppress(KeyError):
            self.proxy_ejections.remove(service)
        for kind in ("connect", "dropped", "no_endpoint", "limit", "retry_budget", *HTTP_ERROR_KINDS):
            with contextlib.suppress(KeyError):
                self.proxy_errors.remove(service, kind)

    # --- serving -------------------------------------------------------------------------

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def serve(self, host: str, port: int) -> None:
        try:
            self._server = await asyncio.start_server(self._handle, host=host, port=port, reuse_address=True)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} for metrics: {exc.strerror or exc}") from exc
        self._log.info("metrics.listening", address=f"{host}:{port}")

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            method, path, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            if method not in ("GET", "HEAD"):
                status, body, ctype = "405 Method Not Allowed", b"GET only\n", "text/plain"
            elif path.split("?", 1)[0] == "/metrics":
                status, body, ctype = "200 OK", self.render(), CONTENT_TYPE_LATEST
            else:
                status, body, ctype = "404 Not Found", b"metrics are at /metrics\n", "text/plain"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode() + (body if method != "HEAD" else b""))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError, ConnectionError):
            pass
        finally:
            writer.close()


class ServiceMeters:
    """One service's labelled children of the proxy metrics."""

    def __init__(self, m: AgentMetrics, service: str) -> None:
        self._m = m
        self.service = service
        self.active = m.proxy_active.labels(service)
        self.first_byte = m.proxy_first_byte.labels(service)
        self.bytes_in = m.proxy_bytes.labels(service, "in").inc
        self.bytes_out = m.proxy_bytes.labels(service, "out").inc
        self.retries = m.proxy_retries.labels(service)
        self.ejections = m.proxy_ejections.labels(service)
        self._errors: dict[str, Any] = {}
        self._connections: dict[str, Any] = {}
        self._requests: dict[tuple[str, str], Any] = {}
        self.request_seconds = m.proxy_request_seconds.labels(service)

    def error(self, kind: str) -> None:
        child = self._errors.get(kind)
        if child is None:
            child = self._errors[kind] = self._m.proxy_errors.labels(self.service, kind)
        child.inc()

    def connection(self, endpoint: str) -> None:
        child = self._connections.get(endpoint)
        if child is None:
            child = self._connections[endpoint] = self._m.proxy_connections.labels(self.service, endpoint)
        child.inc()

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        """One HTTP request answered with `status` by `endpoint` ("none": by the proxy)."""
        key = (endpoint, _STATUS_CLASS[status // 100] if 1 <= status // 100 <= 5 else "other")
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self._m.proxy_requests.labels(self.service, *key)
        child.inc()
        self.request_seconds.observe(seconds)

    def add_requests(self, counts: dict[tuple[str, int], int], buckets: list[int], seconds: float) -> None:
        """Many HTTP requests at once: the http proxy counts in plain integers on its hot
        path and adds them here every sweep. `counts` by (endpoint, status // 100);
        `buckets`: how many latencies fell at or under each bound of `LATENCY_BUCKETS`
        and not under the one before, plus one count past the last; `seconds`: their sum.

        prometheus_client has no bulk observe; its histogram child keeps per-bucket (not
        cumulative) values in `_buckets` and the sum in `_sum`, which this adds to
        (tests/test_http_proxy.py checks the exported count against the requests)."""
        for (endpoint, klass), n in counts.items():
            key = (endpoint, _STATUS_CLASS.get(klass, "other"))
            child = self._requests.get(key)
            if child is None:
                child = self._requests[key] = self._m.proxy_requests.labels(self.service, *key)
            child.inc(n)
        histogram: Any = self.request_seconds
        histogram._sum.inc(seconds)
        for i, n in enumerate(buckets):
            if n:
                histogram._buckets[i].inc(n)

    @property
    def requests(self) -> list[tuple[str, str]]:
        """The (endpoint, status class) series this service has."""
        return list(self._requests)

    @property
    def endpoints(self) -> list[str]:
        return list(self._connections)


class _NodeCollector(Collector):
    """The host's CPU, memory, disk and network, sampled at scrape time."""

    def __init__(self, data_dir: pathlib.Path) -> None:
        self._data_dir = data_dir
        psutil.cpu_percent(interval=None)  # prime: the next call measures since now

    def collect(self) -> Iterator[Any]:
        yield GaugeMetricFamily("shoal_node_cpu_percent", "CPU use of the whole host since the last scrape, 0-100.",
                                value=psutil.cpu_percent(interval=None))
        yield GaugeMetricFamily("shoal_node_cpu_cores", "Logical CPUs.", value=psutil.cpu_count() or 1)
        mem = psutil.virtual_memory()
        yield GaugeMetricFamily("shoal_node_memory_used_bytes", "Memory in use.", value=mem.used)
        yield GaugeMetricFamily("shoal_node_memory_total_bytes", "Physical memory.", value=mem.total)
        try:
            disk = psutil.disk_usage(str(self._data_dir))
        except OSError:
            disk = None
        if disk is not None:
            yield GaugeMetricFamily("shoal_node_disk_used_bytes", "Used bytes of the data directory's filesystem.",
                                    value=disk.used)
            yield GaugeMetricFamily("shoal_node_disk_total_bytes", "Size of the data directory's filesystem.",
                                    value=disk.total)
        net = psutil.net_io_counters()
        c = CounterMetricFamily("shoal_node_network_bytes", "Bytes through every network interface.",
                                labels=["direction"])
        c.add_metric(["receive"], net.bytes_recv)
        c.add_metric(["transmit"], net.bytes_sent)
        yield c


class _CallbackCollector(Collector):
    def __init__(self) -> None:
        self._families: list[tuple[str, str, tuple[str, ...], Callable[[], list[tuple[tuple[str, ...], float]]]]] = []

    def add(self, name: str, doc: str, labels: tuple[str, ...],
            read: Callable[[], list[tuple[tuple[str, ...], float]]]) -> None:
        self._families.append((name, doc, labels, read))

    def collect(self) -> Iterator[Any]:
        for name, doc, labels, read in self._families:
            family = GaugeMetricFamily(name, doc, labels=list(labels))
            try:
                values = read()
            except Exception:  # a broken reader must not break the whole scrape
                continue
            for label_values, value in values:
                family.add_metric(list(label_values), value)
            yield family


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaUsage:
    """One running replica's figures for `/metrics`."""

    deployment: str
    replica: str
    cpu_seconds: float  # since the replica (this incarnation) started
    memory_bytes: int


class _ReplicaUsageCollector(Collector):
    def __init__(self, read: Callable[[], list[ReplicaUsage]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Any]:
        cpu = CounterMetricFamily(
            "shoal_replica_cpu_seconds", "CPU time (user + system) a running replica has used since it started.",
            labels=["deployment", "replica"])
        memory = GaugeMetricFamily(
            "shoal_replica_memory_bytes", "A running replica's working-set memory (page cache excluded for "
            "containers; resident sets of its processes for the process driver).", labels=["deployment", "replica"])
        try:
            rows = self._read()
        except Exception:  # a broken reader must not break the whole scrape
            rows = []
        for row in rows:
            cpu.add_metric([row.deployment, row.replica], row.cpu_seconds)
            memory.add_metric([row.deployment, row.replica], float(row.memory_bytes))
        yield cpu
        yield memory
