"""The proxy's http mode (`shoal.agent.httpproxy`) against in-process HTTP backends on
loopback: keep-alive and pooling, per-request balancing, bodies, retries, errors,
timeouts, consistent hash by header and metrics."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from shoal.agent.httpproxy import HttpConfig, http_protocol_factory
from shoal.agent.metrics import AgentMetrics
from shoal.agent.proxy import ProxyConfig, Route, ServiceProxy
from shoal.balancing import Endpoint, make_picker
from shoal.model import Algorithm
from shoal.v1 import types_pb2

from helpers import eventually, free_port


# --- backends ---------------------------------------------------------------------------


class Backend:
    """A small HTTP/1.1 server: answers `name` (and what it was sent), counts connections
    and requests. `mode`: "ok", "drop" (read a request, close without a byte), "stale"
    (answer the first request of a connection, drop the second: an idle timeout that
    struck just as the connection was reused)."""

    def __init__(self, name: str, mode: str = "ok") -> None:
        self.name = name
        self.mode = mode
        self.connections = 0
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []  # method, path, headers, body
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.writers: set[asyncio.StreamWriter] = set()
        self.hold: asyncio.Event | None = None  # when set up, answers wait for it

    async def start(self) -> Backend:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening and cut every open connection (a killed process)."""
        if self.server is not None:
            self.server.close()
        for w in list(self.writers):
            w.transport.abort()

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(replica_id=self.name, address="127.0.0.1", port=self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.add(writer)
        served = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, version = lines[0].split(" ")
                headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ln)}
                body = b""
                if headers.get("expect", "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                if "content-length" in headers:
                    body = await reader.readexactly(int(headers["content-length"]))
                elif headers.get("transfer-encoding", "").lower() == "chunked":
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                        data = await reader.readexactly(size + 2)
                        if size == 0:
                            break
                        body += data[:-2]
                self.requests.append((method, path, headers, body))
                served += 1
                if self.mode == "drop" or (self.mode == "stale" and served > 1):
                    writer.transport.abort()
                    return
                if self.hold is not None:
                    await self.hold.wait()
                reply = f"{self.name} {method} {path}".encode() + (b" " + body if body else b"")
                if path.startswith("/chunked"):
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    for i in range(0, len(reply), 7):
                        part = reply[i:i + 7]
                        writer.write(b"%x\r\n%b\r\n" % (len(part), part))
                    writer.write(b"0\r\n\r\n")
                else:
                    extra = b"Connection: keep-alive\r\n" if version == "HTTP/1.0" else b""
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%b\r\n" % (len(reply), extra)
                                 + (reply if method != "HEAD" else b""))
                await writer.drain()
                closing = headers.get("connection", "").lower() == "close" or (
                    version == "HTTP/1.0" and headers.get("connection", "").lower() != "keep-alive")
                if closing:
                    return
        finally:
            self.writers.discard(writer)
            writer.close()


# --- a client -----------------------------------------------------------------------------


class Client:
    """One client connection speaking HTTP/1.1 to the proxy."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def request(self, method: str = "GET", path: str = "/", body: bytes = b"",
                      headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        hdrs = {"Host": "svc", **(headers or {})}
        if body and "Transfer-Encoding" not in hdrs:
            hdrs["Content-Length"] = str(len(body))
        self.send(f"{method} {path} HTTP/1.1\r\n".encode()
                  + b"".join(f"{k}: {v}\r\n".encode() for k, v in hdrs.items()) + b"\r\n" + body)
        return await self.response(head=method == "HEAD")

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def response(self, head: bool = False) -> tuple[int, dict[str, str], bytes]:
        while True:
            raw = await self.reader.readuntil(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ln)}
            if status >= 200:
                break
        if head:
            return status, headers, b""
        if "content-length" in headers:
            return status, headers, await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size = int(await self.reader.readuntil(b"\r\n"), 16)
                data = await self.reader.readexactly(size + 2)
                if size == 0:
                    return status, headers, body
                body += data[:-2]
        return status, headers, await self.reader.read()

    async def closed(self) -> bool:
        return await self.reader.read() == b""

    def close(self) -> None:
        self.writer.close()


# --- fixtures -------------------------------------------------------------------------------


Serve = Callable[..., "asyncio.Future[tuple[int, Route]]"]


@pytest.fixture
async def backends() -> AsyncIterator[list[Backend]]:
    made = [await Backend(f"b{i}").start() for i in range(3)]
    yield made
    for b in made:
        await b.stop()


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[ServiceProxy, list[tuple[str, str, str, str]], list]]:
    events: list[tuple[str, str, str, str]] = []
    proxy = ServiceProxy(ProxyConfig(bind_host="127.0.0.1", answer_timeout=5.0), rng=random.Random(7),
                         on_event=lambda *e: events.append(e), metrics=AgentMetrics(tmp_path))
    servers: list[asyncio.AbstractServer] = []
    yield proxy, events, servers
    for s in servers:
        s.close()
    await proxy.close()


async def serve(setup: tuple[ServiceProxy, list, list], endpoints: list[Endpoint],
                algorithm: Algorithm = Algorithm.ROUND_ROBIN, config: HttpConfig | None = None,
                hash_header: str | None = None) -> tuple[int, Route]:
    """A route served by the http factory on a loopback port of its own."""
    proxy, _, servers = setup
    route = Route(service="web", port=0, algorithm=algorithm,
                  picker=make_picker(algorithm, endpoints, random.Random(3)))
    server = await asyncio.get_running_loop().create_server(
        http_protocol_factory(proxy, route, config, hash_header=hash_header), "127.0.0.1", 0)
    servers.append(server)
    route.port = server.sockets[0].getsockname()[1]
    return route.port, route


def metric(proxy: ServiceProxy, name: str, **labels: str) -> float:
    assert proxy._metrics is not None
    value = proxy._metrics.registry.get_sample_value(name, labels)
    return value or 0.0


# --- keep-alive and balancing ---------------------------------------------------------------


async def test_keep_alive_reuses_one_backend_connection_for_many_requests(backends: list[Backend], setup) -> None:
    port, route = await serve(setup, [backends[0].endpoint])
    client = await Client.open(port)
    for i in range(50):
        status, _, body = await client.request(path=f"/r{i}")
        assert (status, body) == (200, f"b0 GET /r{i}".encode())
    client.close()
    assert backends[0].connections == 1
    assert len(backends[0].requests) == 50
    assert route.active == 1 or await eventually(lambda: route.active == 0)


async def test_new_client_connections_reuse_pooled_backend_connections(backends: list[Backend], setup) -> None:
    port, _ = await serve(setup, [backends[0].endpoint])
    for i in range(10):
        client = await Client.open(port)
        status, headers, _ = await client.request(headers={"Connection": "close"})
        assert status == 200 and headers.get("connection") == "close"
        assert await client.closed()
    assert backends[0].connections == 1  # the client's Connection: close is not the backend's
    assert all("connection" not in h for _, _, h, _ in backends[0].requests)


async def test_round_robin_per_request_on_one_client_connection(backends: list[Backend], setup) -> None:
    port, route = await serve(setup, [b.endpoint for b in backends])
    client = await Client.open(port)
    answers = [(await client.request())[2].split()[0] for _ in range(30)]
    assert answers == [b"b0", b"b1", b"b2"] * 10
    assert route.served == {"b0": 10, "b1": 10, "b2": 10}
    assert [b.connections for b in backends] == [1, 1, 1]


async def test_pipelined_requests_are_answered_in_order(backends: list[Backend], setup) -> None:
    port, _ = await serve(setup, [b.endpoint for b in backends])
    client = await Client.open(port)
    client.send(b"".join(f"GET /p{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(8)))
    bodies = [(await client.response())[2] for _ in range(8)]
    assert bodies == [f"b{i % 3} GET /p{i}".encode() for i in range(8)]


async def test_http10_keep_alive_and_close(backends: list[Backend], setup) -> None:
    port, _ = await serve(setup, [backends[0].endpoint])
    client = await Client.open(port)
    client.send(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    status, headers, body = await client.response()
    assert (status, body, headers.get("connection")) == (200, b"b0 GET /a", "keep-alive")
    client.send(b"GET /b HTTP/1.0\r\n\r\n")
    status, headers, body = await client.response()
    assert (status, body, headers.get("connection")) == (200, b"b0 GET /b", "close")
    assert await client.closed()
    assert backends[0].connections == 1


# --- bodies ------------------------------------------------------------------------------------


async def test_content_length_and_chunked_bodies_both_ways(backends: list[Backend], setup) -> None:
    port, _ = await serve(setup, [backends[0].endpoint])
    client = await Client.open(port)
    big = bytes(range(256)) * 1000
    status, _, body = await client.request("POST", "/up", big)
    assert (status, body) == (200, b"b0 POST /up " + big)
    chunked = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
    status, _, body = await client.request("PUT", "/chunks", chunked, headers={"Transfer-Encoding": "chunked"})
    assert (status, body) == (200, b"b0 PUT /chunks hello world")
    status, headers, body = await client.request("POST", "/chunked-reply", b"abc")
    assert headers.get("transfer-encoding") == "chunked"
    assert (status, body) == (200, b"b0 POST /chunked-reply abc")
    status, headers, body = await client.request("HEAD", "/")
    assert (status, body, headers["content-length"]) == (200, b"", str(len(b"b0 HEAD /")))
    status, _, body = await client.request("GET", "/after-head")
    assert (status, body) == (200, b"b0 GET /after-head")
    assert backends[0].connections == 1


async def test_expect_100_continue_passes_through(backends: list[Backend], setup) -> None:
    port, _ = await serve(setup, [backends[0].endpoint])
    client = await Client.open(port)
    client.send(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    interim = await client.reader.readuntil(b"\r\n\r\n")
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    client.send(b"data")
    status, _, body = await client.response()
    assert (status, body) == (200, b"b0 POST /e data")


async def test_hop_by_hop_headers_stay_with_their_connection(backends: list[Backend], setup) -> None:
    port, _ = await serve(setup, [backends[0].endpoint])
    client = await Client.open(port)
    status, _, _ = await client.request(headers={"Connection": "keep-alive, X-Secret", "X-Secret": "1",
                                                 "Keep-Alive": "timeout=5", "TE": "trailers", "X-Kept": "yes"})
    assert status == 200
    (_, _, headers, _), = backends[0].requests
    assert headers == {"host": "svc", "x-kept": "yes"}


# --- failures and retries ----------------------------------------------------------------------


async def test_a_pooled_connection_closed_by_its_endpoint_is_retried_once_fresh(setup) -> None:
    stale = await Backend("s", mode="stale").start()
    try:
        proxy = setup[0]
        port, route = await serve(setup, [stale.endpoint])
        client = await Client.open(port)
        assert (await client.request(path="/1"))[2] == b"s GET /1"
        assert (await client.request(path="/2"))[2] == b"s GET /2"  # reused, dropped, sent again fresh
        assert stale.connections == 2
        assert metric(proxy, "shoal_proxy_errors_total", service="web", kind="dropped") == 0  # not its fault
        assert (await client.request("POST", "/3", b"x"))[0] == 502  # a POST may have been acted on
    finally:
        await stale.stop()



async def test_get_is_retried_on_another_endpoint_and_post_gets_502(setup) -> None:
    dropper = await Backend("a-drop", mode="drop").start()
    good = await Backend("b-good").start()
    try:
        port, route = await serve(setup, [dropper.endpoint, good.endpoint])
        client = await Client.open(port)
        status, _, body = await client.request("GET", "/g")  # round robin: the dropper first
        assert (status, body) == (200, b"b-good GET /g")
        status, _, _ = await client.request("POST", "/p", b"x")  # round robin: the dropper again
        assert status == 502
        assert [m for m, *_ in dropper.requests] == ["GET", "POST"]
        assert [m for m, *_ in good.requests] == ["GET"]
        proxy = setup[0]
        assert metric(proxy, "shoal_proxy_retries_total", service="web") == 1
        # Request counts reach the metrics at the listener's next sweep.
        await eventually(lambda: metric(proxy, "shoal_proxy_requests_total", service="web", endpoint="none",
                                        code="5xx") == 1, what="the 502 counted")
    finally:
        await dropper.stop()
        await good.stop()


async def test_a_refused_connect_is_retried_for_any_method(backends: list[Backend], setup) -> None:
    dead = Endpoint(replica_id="a-dead", address="127.0.0.1", port=free_port())
    port, _ = await serve(setup, [dead, backends[1].endpoint])
    client = await Client.open(port)
    status, _, body = await client.request("POST", "/p", b"x")
    assert (status, body) == (200, b"b1 POST /p x")


async def test_no_endpoint_is_503_and_none_answering_is_502(setup) -> None:
    port, _ = await serve(setup, [])
    client = await Client.open(port)
    assert (await client.request())[0] == 503
    assert (await client.request())[0] == 503  # the connection stays usable
    dead = [Endpoint(replica_id=f"d{i}", address="127.0.0.1", port=free_port()) for i in range(2)]
    port, _ = await serve(setup, dead)
    client = await Client.open(port)
    assert (await client.request())[0] == 502


async def test_a_backend_killed_mid_run_fails_no_get(setup) -> None:
    backends = [await Backend(f"k{i}").start() for i in range(3)]
    try:
        port, route = await serve(setup, [b.endpoint for b in backends])
        clients = [await Client.open(port) for _ in range(4)]
        results: list[int] = []
        killed = asyncio.Event()

        async def loop(c: Client) -> None:
            for i in range(150):
                if i == 50 and not killed.is_set():
                    killed.set()
                    await backends[1].stop()  # mid-run: open pooled connections are cut
                results.append((await c.request(path=f"/{i}"))[0])

        await asyncio.gather(*(loop(c) for c in clients))
        assert len(results) == 600
        assert results.count(200) == 600
        proxy = setup[0]
        assert metric(proxy, "shoal_proxy_errors_total", service="web", kind="connect") >= 1  # it did fail
        after = len(backends[1].requests)
        assert after < 600 // 3 + 10  # the killed one stopped taking requests
    finally:
        for b in backends:
            await b.stop()


async def test_endpoint_down_moves_a_waiting_get_elsewhere(setup) -> None:
    stuck = await Backend("a-stuck").start()
    stuck.hold = asyncio.Event()  # takes the request, never answers
    good = await Backend("b-good").start()
    try:
        proxy = setup[0]
        port, _ = await serve(setup, [stuck.endpoint, good.endpoint])
        client = await Client.open(port)
        pending = asyncio.ensure_future(client.request(path="/w"))
        await eventually(lambda: stuck.requests, what="the stuck backend to get the request")
        proxy.endpoint_down("a-stuck")
        status, _, body = await asyncio.wait_for(pending, 5)
        assert (status, body) == (200, b"b-good GET /w")
    finally:
        stuck.hold.set()
        await stuck.stop()
        await good.stop()


async def test_no_answer_within_the_answer_timeout_is_504(setup) -> None:
    proxy, events, servers = setup
    slow = await Backend("slow").start()
    slow.hold = asyncio.Event()
    try:
        proxy.config = ProxyConfig(bind_host="127.0.0.1", answer_timeout=0.2)
        port, _ = await serve(setup, [slow.endpoint])
        client = await Client.open(port)
        assert (await client.request())[0] == 504
        assert metric(proxy, "shoal_proxy_errors_total", service="web", kind="answer_timeout") == 1
    finally:
        slow.hold.set()
        await slow.stop()


# --- malformed and slow clients ----------------------------------------------------------------


async def test_a_malformed_request_gets_400_and_the_connection_closes(backends: list[Backend], setup) -> None:
    port, _ = await serve(setup, [backends[0].endpoint])
    client = await Client.open(port)
    client.send(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n")
    status, headers, _ = await client.response()
    assert (status, headers.get("connection")) == (400, "close")
    assert await client.closed()
    client = await Client.open(port)
    client.send(b"NOT HTTP AT ALL\r\n\r\n")
    assert (await client.response())[0] == 400
    assert backends[0].requests == []


async def test_oversized_headers_get_431(backends: list[Backend], setup) -> None:
    port, _ = await serve(setup, [backends[0].endpoint], config=HttpConfig(max_header_bytes=4096))
    client = await Client.open(port)
    client.send(b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(100)))
    status, _, _ = await client.response()
    assert status == 431
    assert await client.closed()


async def test_a_silent_client_is_closed_after_the_header_timeout(backends: list[Backend], setup) -> None:
    port, route = await serve(setup, [backends[0].endpoint], config=HttpConfig(header_timeout=0.2))
    client = await Client.open(port)
    client.send(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and nothing more
    status, _, _ = await asyncio.wait_for(client.response(), 5)
    assert status == 408
    assert await client.closed()
    await eventually(lambda: route.active == 0, what="the connection to be released")


async def test_the_connection_limit_answers_503(backends: list[Backend], setup) -> None:
    proxy = setup[0]
    proxy.config = ProxyConfig(bind_host="127.0.0.1", max_connections=2)
    port, _ = await serve(setup, [backends[0].endpoint])
    kept = [await Client.open(port) for _ in range(2)]
    for c in kept:
        assert (await c.request())[0] == 200
    extra = await Client.open(port)
    status, _, _ = await extra.response()
    assert status == 503 and await extra.closed()
    assert metric(proxy, "shoal_proxy_errors_total", service="web", kind="limit") == 1


async def test_a_response_ended_by_its_connection_closes_the_client_after_it(setup) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        ep = Endpoint(replica_id="eof", address="127.0.0.1", port=server.sockets[0].getsockname()[1])
        port, _ = await serve(setup, [ep])
        client = await Client.open(port)
        status, headers, body = await client.request()
        assert (status, headers.get("connection"), body) == (200, "close", b"until the end")
        assert await client.closed()
    finally:
        server.close()


# --- upgrade ---------------------------------------------------------------------------------------


async def test_upgrade_becomes_a_tunnel_after_101(setup) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"upgrade: websocket" in head.lower()
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        while data := await reader.read(100):
            writer.write(data.upper())
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        ep = Endpoint(replica_id="ws", address="127.0.0.1", port=server.sockets[0].getsockname()[1])
        port, _ = await serve(setup, [ep])
        client = await Client.open(port)
        client.send(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nearly")
        head = await client.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        assert await client.reader.readexactly(5) == b"EARLY"
        client.send(b"ping")
        assert await client.reader.readexactly(4) == b"PING"
    finally:
        server.close()


# --- consistent hash, metrics, the table ----------------------------------------------------------


async def test_consistent_hash_by_header_sticks_per_header_value(backends: list[Backend], setup) -> None:
    port, _ = await serve(setup, [b.endpoint for b in backends], algorithm=Algorithm.CONSISTENT_HASH,
                          hash_header="X-User")
    client = await Client.open(port)
    seen: dict[str, set[bytes]] = {}
    for i in range(60):
        user = f"user-{i % 12}"
        body = (await client.request(headers={"x-user": user}))[2]
        seen.setdefault(user, set()).add(body.split()[0])
    assert all(len(s) == 1 for s in seen.values())
    assert len(set().union(*seen.values())) > 1  # 12 users do not all hash to one endpoint


async def test_least_conn_counts_requests_in_flight(setup) -> None:
    busy = await Backend("a-busy").start()
    busy.hold = asyncio.Event()
    idle = await Backend("b-idle").start()
    try:
        port, route = await serve(setup, [busy.endpoint, idle.endpoint], algorithm=Algorithm.LEAST_CONN)
        waiting = await Client.open(port)
        pending = asyncio.ensure_future(waiting.request(path="/slow"))  # the tie goes to a-busy
        await eventually(lambda: busy.requests, what="a-busy to hold a request")
        client = await Client.open(port)
        bodies = [(await client.request(path=f"/{i}"))[2] for i in range(5)]
        assert all(b.startswith(b"b-idle") for b in bodies)  # a-busy has one outstanding
        busy.hold.set()
        assert (await pending)[2] == b"a-busy GET /slow"
        assert route.picker.outstanding == {}  # type: ignore[attr-defined]
    finally:
        busy.hold.set()
        await busy.stop()
        await idle.stop()


async def test_metrics_count_every_request_by_endpoint(backends: list[Backend], setup) -> None:
    proxy = setup[0]
    port, _ = await serve(setup, [b.endpoint for b in backends])
    clients = [await Client.open(port) for _ in range(3)]
    for _ in range(10):
        for c in clients:
            assert (await c.request())[0] == 200
    # Request counts reach the metrics at the listener's next sweep.
    await eventually(lambda: metric(proxy, "shoal_proxy_request_seconds_count", service="web") == 30,
                     what="30 requests in the latency histogram")
    by_endpoint = {b.name: metric(proxy, "shoal_proxy_requests_total", service="web", endpoint=b.name, code="2xx")
                   for b in backends}
    assert by_endpoint == {b.name: float(len(b.requests)) for b in backends}
    assert sum(by_endpoint.values()) == 30
    assert metric(proxy, "shoal_proxy_request_seconds_bucket", service="web", le="+Inf") == 30
    assert 0 < metric(proxy, "shoal_proxy_request_seconds_sum", service="web") < 30 * 5.0
    assert metric(proxy, "shoal_proxy_active_connections", service="web") == 3


async def test_a_table_port_with_app_protocol_http_is_served_in_http_mode(backends: list[Backend], setup) -> None:
    proxy = setup[0]
    port = free_port()
    table = types_pb2.Table(
        service="web", algorithm="round_robin", version=1,
        endpoints=[types_pb2.Endpoint(pod=b.name, address="127.0.0.1", port=b.port, weight=1) for b in backends],
        ports=[types_pb2.ServicePort(port=port, target_port="8080", protocol="TCP", app_protocol="http")])
    await proxy.update([table])
    assert proxy.routes[port].protocol == "http"
    client = await Client.open(port)
    answers = [(await client.request())[2].split()[0] for _ in range(6)]
    assert answers == [b"b0", b"b1", b"b2"] * 2  # per request, on one client connection
    table.ports[0].app_protocol = "tcp"
    table.version = 2
    await proxy.update([table])
    assert proxy.routes[port].protocol == "tcp"


def test_tables_carry_the_app_protocol_and_the_hash_header() -> None:
    from shoal.leader.convert import table_pb
    from shoal.leader.records import TableRecord

    record = TableRecord(service="web", algorithm="consistent_hash", version=3, hash_header="X-User",
                         ports=[{"name": "", "port": 80, "target_port": 8080, "node_port": 0, "protocol": "TCP",
                                 "app_protocol": "http"},
                                {"name": "old", "port": 81, "target_port": 8081, "node_port": 0, "protocol": "TCP"}])
    msg = table_pb(TableRecord.from_dict(record.to_dict()))
    assert [p.app_protocol for p in msg.ports] == ["http", "tcp"]  # a record from before the field: tcp
    assert msg.hash_header == "X-User"


def test_http_mode_on_uvloop(tmp_path: Path) -> None:
    """The agent runs on uvloop where it is installed; its transports are not asyncio's."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> list[tuple[int, bytes]]:
        backends = [await Backend(f"u{i}").start() for i in range(2)]
        proxy = ServiceProxy(ProxyConfig(bind_host="127.0.0.1"), metrics=AgentMetrics(tmp_path))
        servers: list[asyncio.AbstractServer] = []
        try:
            port, _ = await serve((proxy, [], servers), [b.endpoint for b in backends])
            client = await Client.open(port)
            got = [(s, b) for s, _, b in [await client.request(path="/a"), await client.request("POST", "/b", b"xy"),
                                          await client.request("GET", "/chunked")]]
            client.close()
            return got
        finally:
            for s in servers:
                s.close()
            for b in backends:
                await b.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        got = runner.run(scenario())
    assert got == [(200, b"u0 GET /a"), (200, b"u1 POST /b xy"), (200, b"u0 GET /chunked")]


# --- reads split and joined: the fast path and the request parser -------------------------------
#
# These drive the protocols directly with in-memory transports, so each test decides exactly
# what every `data_received` call holds: a head whole in one read (the fast path, forwarded
# as received), split over two, pipelined behind another, or followed by a body.


class Wire:
    """An in-memory transport: what was written, whether it was closed."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closed = False

    def take(self) -> bytes:
        data, self.out = b"".join(self.out), []
        return data

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


class Bench:
    """One client connection of an http listener whose endpoint connections are pooled
    in-memory ones (one endpoint, `b0`, two connections)."""

    def __init__(self, proxy: ServiceProxy) -> None:
        from shoal.agent.httpproxy import _Backend

        route = Route(service="web", port=0, algorithm=Algorithm.ROUND_ROBIN,
                      picker=make_picker(Algorithm.ROUND_ROBIN, [Endpoint(replica_id="b0", address="127.0.0.1",
                                                                          port=9)], random.Random(1)))
        self.listener = http_protocol_factory(proxy, route)
        self.wires: dict[object, Wire] = {}
        for _ in range(2):
            b = _Backend(self.listener, "b0")
            self.wires[b] = Wire()
            b.connection_made(self.wires[b])  # type: ignore[arg-type]
            self.listener.release(b)
        self.client = self.listener()
        self.wire = Wire()
        self.client.connection_made(self.wire)  # type: ignore[arg-type]

    def send(self, *reads: bytes) -> None:
        for data in reads:
            self.client.data_received(data)

    def sent(self) -> tuple[object, bytes]:
        """The one endpoint connection written to since the last call, and what it got."""
        got = [(b, w.take()) for b, w in self.wires.items() if w.out]
        assert len(got) == 1, f"expected one endpoint connection written to, got {len(got)}"
        return got[0]

    def answer(self, b: object, *reads: bytes) -> bytes:
        """The endpoint connection `b` answers (in these reads); what the client got."""
        for data in reads:
            b.data_received(data)  # type: ignore[attr-defined]
        return self.wire.take()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture
async def bench(setup) -> Bench:
    return Bench(setup[0])


async def test_a_whole_plain_head_goes_as_received(bench: Bench) -> None:
    head = b"GET /a?x=1 HTTP/1.1\r\nhost: svc\r\nX-Trace:  spaced  \r\nAccept: */*\r\n\r\n"
    bench.send(head)
    b, got = bench.sent()
    assert got == head  # byte for byte: case, spacing and order kept
    assert bench.answer(b, OK) == OK
    bench.send(b"HEAD /b HTTP/1.1\r\nHost: svc\r\n\r\n")
    b, got = bench.sent()
    assert got == b"HEAD /b HTTP/1.1\r\nHost: svc\r\n\r\n"
    assert bench.answer(b, b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n") == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n")
    assert not bench.wire.closed and not bench.client.queue


@pytest.mark.parametrize("cut", [1, 10, 17, 30, 36])
async def test_a_head_split_over_two_reads_is_sent_once_whole(bench: Bench, cut: int) -> None:
    head = b"GET /split HTTP/1.1\r\nHost: svc\r\nX-A: 1\r\n\r\n"
    bench.send(head[:cut])
    assert all(not w.out for w in bench.wires.values())  # nothing until the head is complete
    bench.send(head[cut:])
    b, got = bench.sent()
    assert got == head
    assert bench.answer(b, OK) == OK
    bench.send(b"GET /next HTTP/1.1\r\nHost: svc\r\n\r\n")  # and the next one, whole again
    b, got = bench.sent()
    assert got == b"GET /next HTTP/1.1\r\nHost: svc\r\n\r\n"
    assert bench.answer(b, OK) == OK


async def test_pipelined_heads_in_one_read_and_across_reads(bench: Bench) -> None:
    one, two, three = (b"GET /%d HTTP/1.1\r\nHost: svc\r\n\r\n" % i for i in (1, 2, 3))
    bench.send(one + two + three[:9], three[9:])
    answers = []
    for want in (one, two, three):
        b, got = bench.sent()
        assert got == want
        answers.append(bench.answer(b, OK))
    assert answers == [OK] * 3
    assert not bench.client.queue


async def test_bodies_between_whole_heads_keep_their_framing(bench: Bench) -> None:
    bench.send(b"GET /1 HTTP/1.1\r\nHost: svc\r\n\r\n")
    b, _ = bench.sent()
    bench.answer(b, OK)
    bench.send(b"POST /2 HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\nab", b"cde")
    b, got = bench.sent()
    assert got == b"POST /2 HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\nabcde"
    bench.answer(b, OK)
    bench.send(b"PUT /3 HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n", b"3\r\nxyz\r\n0\r\n\r\n")
    b, got = bench.sent()
    assert got == b"PUT /3 HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nxyz\r\n0\r\n\r\n"
    bench.answer(b, OK)
    bench.send(b"GET /4 HTTP/1.1\r\nHost: svc\r\n\r\n")  # whole and plain again: as received
    b, got = bench.sent()
    assert got == b"GET /4 HTTP/1.1\r\nHost: svc\r\n\r\n"
    assert bench.answer(b, OK) == OK


async def test_expect_100_continue_with_a_whole_head(bench: Bench) -> None:
    bench.send(b"POST /up HTTP/1.1\r\nHost: svc\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    b, got = bench.sent()
    assert got.endswith(b"Content-Length: 3\r\n\r\n")
    assert bench.answer(b, b"HTTP/1.1 100 Continue\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    bench.send(b"abc")
    assert bench.sent() == (b, b"abc")
    assert bench.answer(b, OK) == OK


async def test_hop_by_hop_and_http10_heads_are_rebuilt(bench: Bench) -> None:
    bench.send(b"GET /h HTTP/1.1\r\nHost: svc\r\nTE: trailers\r\nKeep-Alive: 5\r\nX-Keep: 1\r\n\r\n")
    b, got = bench.sent()
    assert got == b"GET /h HTTP/1.1\r\nHost: svc\r\nX-Keep: 1\r\n\r\n"
    bench.answer(b, OK)
    bench.send(b"GET /t HTTP/1.1\r\nHost: svc\r\nTest: 1\r\n\r\n")  # like TE, but an ordinary header
    b, got = bench.sent()
    assert got == b"GET /t HTTP/1.1\r\nHost: svc\r\nTest: 1\r\n\r\n"
    bench.answer(b, OK)
    bench.send(b"GET /old HTTP/1.0\r\nHost: svc\r\nConnection: keep-alive\r\n\r\n")
    b, got = bench.sent()
    assert got == b"GET /old HTTP/1.0\r\nHost: svc\r\nConnection: keep-alive\r\n\r\n"
    assert bench.answer(b, OK) == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
    bench.send(b"GET /bye HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
    b, got = bench.sent()
    assert got == b"GET /bye HTTP/1.1\r\nHost: svc\r\n\r\n"  # the client's close is not the endpoint's
    assert bench.answer(b, OK) == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    assert bench.wire.closed


@pytest.mark.parametrize(("head", "status"), [
    (b"GET / HTTP/1.1\r\nHost : svc\r\n\r\n", 400),  # a space before the colon
    (b"GET / HTTP/1.1\r\nHost: svc\r\n folded\r\n\r\n", 400),
    (b"CONNECT svc:443 HTTP/1.1\r\nHost: svc\r\n\r\n", 501),
    (b"GET / HTTP/2.0\r\nHost: svc\r\n\r\n", 505),
])
async def test_whole_heads_the_fast_path_refuses_get_the_parsers_answer(bench: Bench, head: bytes,
                                                                        status: int) -> None:
    bench.send(head)
    assert all(not w.out for w in bench.wires.values())
    assert bench.wire.take().startswith(b"HTTP/1.1 %d " % status)
    assert bench.wire.closed


async def test_a_response_split_over_reads_and_one_that_closes(bench: Bench) -> None:
    bench.send(b"GET /1 HTTP/1.1\r\nHost: svc\r\n\r\n")
    b, _ = bench.sent()
    assert bench.answer(b, b"HTTP/1.1 200 OK\r\nContent-", b"Length: 4\r\n\r\nab", b"cd") == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nabcd")
    assert b in bench.listener.pools["b0"]  # back in the pool, its response complete
    bench.send(b"GET /2 HTTP/1.1\r\nHost: svc\r\n\r\n")
    b, _ = bench.sent()
    assert bench.answer(b, b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok") == OK
    assert bench.wires[b].closed and b not in bench.listener.pools["b0"]  # the endpoint closes it
    assert not bench.wire.closed  # the client's connection is its own


@pytest.mark.parametrize(("spent", "requests"), [(0, 0), (0, 3), (15, 7), (20, 99), (20, 1000), (5, 250)])
async def test_requests_credited_late_leave_the_retry_budget_as_credited_at_once(setup, spent: int,
                                                                                 requests: int) -> None:
    from shoal.balancing import RetryBudget

    listener = Bench(setup[0]).listener
    now = RetryBudget()
    for budget in (listener.route.budget, now):
        for _ in range(spent):
            assert budget.try_retry()
    for _ in range(requests):
        now.request()
    listener.unearned = requests
    listener.earn()

    def retries(budget: RetryBudget) -> int:
        n = 0
        while budget.try_retry():
            n += 1
        return n

    assert retries(listener.route.budget) == retries(now)
