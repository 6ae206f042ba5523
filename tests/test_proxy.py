"""The agent's TCP service proxy, with real asyncio backends on 127.0.0.1."""

from __future__ import annotations

import asyncio
import pathlib
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import SimpleNamespace
from typing import Any

import pytest

from shoal.agent.metrics import AgentMetrics
from shoal.agent.proxy import ProxyConfig, ServiceProxy
from shoal.errors import ConfigError
from shoal.v1 import types_pb2

from helpers import eventually, free_port

TIMEOUT = 5.0


class Server:
    """A backend whose behaviour is one coroutine per connection; it records what it
    received and how many connections it saw."""

    def __init__(self, handle: Callable[[Server, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]) -> None:
        self.handle = handle
        self.server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0
        self.received = bytearray()
        self.taken = 0  # bytes read and not kept
        self.sent = 0
        self.done = asyncio.Event()  # set when a connection's handler has returned

    async def start(self) -> Server:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handle(self, reader, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()
            self.done.set()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


class Backend(Server):
    """Answers every connection with its name and a newline, then echoes until EOF."""

    def __init__(self, name: str, delay: float = 0.0) -> None:
        super().__init__(Backend._greet_and_echo)
        self.name = name
        self.delay = delay  # before the greeting: a slow replica

    async def _greet_and_echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        writer.write(f"{self.name}\n".encode())
        await writer.drain()
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    async def stop(self) -> None:
        await super().stop()
        if self.server is not None:
            await self.server.wait_closed()


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def endpoint(pod: str, port: int, weight: int = 1) -> types_pb2.Endpoint:
    return types_pb2.Endpoint(pod=pod, address="127.0.0.1", port=port, weight=weight)


def table(service: str, ports: Sequence[int], endpoints: Sequence[types_pb2.Endpoint],
          algorithm: str = "round_robin", version: int = 1) -> types_pb2.Table:
    return types_pb2.Table(
        service=service, algorithm=algorithm, version=version, endpoints=list(endpoints),
        ports=[types_pb2.ServicePort(port=p, target_port="8080", protocol="TCP") for p in ports],
    )


async def ask(port: int, payload: bytes = b"ping") -> str:
    """One client connection through the proxy: the backend's name, echo checked."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
    try:
        name = (await asyncio.wait_for(reader.readline(), TIMEOUT)).decode().strip()
        if not name:
            return ""  # closed by the proxy: no endpoint answered
        writer.write(payload)
        await writer.drain()
        echoed = await asyncio.wait_for(reader.readexactly(len(payload)), TIMEOUT)
        assert echoed == payload
        return name
    finally:
        writer.close()


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


@pytest.fixture
async def backends() -> AsyncIterator[list[Backend]]:
    started = [await Backend(name).start() for name in ("a", "b", "c")]
    try:
        yield started
    finally:
        for b in started:
            await b.stop()


@pytest.fixture
async def proxy() -> AsyncIterator[tuple[ServiceProxy, list[tuple[str, str, str, str]]]]:
    events: list[tuple[str, str, str, str]] = []
    p = ServiceProxy(ProxyConfig(bind_host="127.0.0.1", connect_timeout=1.0), rng=random.Random(1),
                     on_event=lambda *e: events.append(e))
    try:
        yield p, events
    finally:
        await p.close()


async def test_round_robin_over_connections(backends: list[Backend], proxy: tuple[ServiceProxy, list]) -> None:
    p, _ = proxy
    port = free_port()
    # Given out of order: the order that counts is the table's (sorted by the leader).
    await p.update([table("web", [port], [endpoint(f"web-{b.name}", b.port) for b in backends])])
    got = [await ask(port) for _ in range(9)]
    assert got == ["a", "b", "c"] * 3
    assert p.routes[port].served == {"web-a": 3, "web-b": 3, "web-c": 3}


async def test_a_dead_endpoint_is_skipped_without_failing_a_client(
    backends: list[Backend], proxy: tuple[ServiceProxy, list]
) -> None:
    p, _ = proxy
    port = free_port()
    a, _, c = backends
    eps = [endpoint("web-a", a.port), endpoint("web-b", closed_port()), endpoint("web-c", c.port)]
    await p.update([table("web", [port], eps)])
    got = [await ask(port) for _ in range(12)]
    assert "" not in got, "no client connection may fail while a live endpoint is left"
    assert set(got) == {"a", "c"}


async def test_no_live_endpoint_closes_the_client_connection(proxy: tuple[ServiceProxy, list]) -> None:
    p, _ = proxy
    port = free_port()
    await p.update([table("web", [port], [endpoint("web-x", closed_port()), endpoint("web-y", closed_port())])])
    assert await ask(port) == ""
    await p.update([table("web", [port], [], version=2)])
    assert await ask(port) == ""


async def test_listeners_follow_table_updates(backends: list[Backend], proxy: tuple[ServiceProxy, list]) -> None:
    p, _ = proxy
    a, b, _ = backends
    p1, p2 = free_port(), free_port()
    await p.update([table("web", [p1], [endpoint("web-a", a.port)])])
    assert await ask(p1) == "a"
    assert await refused(p2)

    # A second port for the service, and a new endpoint: both ports serve, round robin
    # keeps counting on the listener that stayed.
    await p.update([table("web", [p1, p2], [endpoint("web-a", a.port), endpoint("web-b", b.port)], version=2)])
    assert await ask(p1) == "b"
    assert await ask(p2) in {"a", "b"}

    await p.update([table("web", [p2], [endpoint("web-a", a.port)], version=3)])
    assert await refused(p1)
    assert await ask(p2) == "a"
    assert set(p.routes) == {p2}

    await p.update([])
    assert await refused(p2)
    assert p.routes == {}


async def test_a_port_in_use_is_reported_once_and_the_rest_works(
    backends: list[Backend], proxy: tuple[ServiceProxy, list]
) -> None:
    p, events = proxy
    a = backends[0]
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    busy = blocker.getsockname()[1]
    ok = free_port()
    try:
        tables = [table("taken", [busy], [endpoint("taken-a", a.port)]), table("web", [ok], [endpoint("web-a", a.port)])]
        await p.update(tables)
        await p.update(tables)  # retried when the tables change, not reported again
        warnings = [e for e in events if e[0] == "Warning"]
        assert len(warnings) == 1
        type_, reason, obj, message = warnings[0]
        assert (type_, reason, obj) == ("Warning", "PortInUse", "service/taken")
        assert f"127.0.0.1:{busy}" in message
        assert await ask(ok) == "a"
        assert busy not in p.routes
    finally:
        blocker.close()
    # Freed: the next update binds it.
    await p.update(tables)
    assert await ask(busy) == "a"


async def test_two_services_on_one_port_is_reported(backends: list[Backend], proxy: tuple[ServiceProxy, list]) -> None:
    p, events = proxy
    a, b, _ = backends
    port = free_port()
    await p.update([table("first", [port], [endpoint("first-a", a.port)]),
                    table("second", [port], [endpoint("second-b", b.port)])])
    assert [(e[1], e[2]) for e in events if e[0] == "Warning"] == [("PortInUse", "service/second")]
    assert await ask(port) == "a"


# -- algorithms that learn from traffic ------------------------------------------------


async def test_p2c_ewma_sends_a_ten_times_slower_replica_under_a_tenth(proxy: tuple[ServiceProxy, list]) -> None:
    p, _ = proxy
    fast = [await Backend(n, delay=0.004).start() for n in ("a", "b")]
    slow = await Backend("slow", delay=0.040).start()
    try:
        port = free_port()
        eps = [endpoint(f"web-{b.name}", b.port) for b in (*fast, slow)]
        await p.update([table("web", [port], eps, algorithm="p2c_ewma")])
        got = [await ask(port) for _ in range(150)]
        assert got.count("slow") / len(got) < 0.10, got.count("slow")
        assert got.count("slow") > 0, "the slow replica is still tried now and then"
    finally:
        for b in (*fast, slow):
            await b.stop()


async def test_least_conn_sends_a_new_connection_to_the_idle_replica(
    backends: list[Backend], proxy: tuple[ServiceProxy, list]
) -> None:
    p, _ = proxy
    port = free_port()
    await p.update([table("web", [port], [endpoint(f"web-{b.name}", b.port) for b in backends], algorithm="least_conn")])
    held = []
    for _ in range(2):  # two long connections: they go to a and b
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        held.append((await asyncio.wait_for(reader.readline(), TIMEOUT), writer))
    try:
        assert sorted(name for name, _ in held) == [b"a\n", b"b\n"]
        assert await ask(port) == "c", "a and b are busy"
        held[0][1].close()  # a's connection ends; once the proxy has seen it, a is the idle one
        picker = p.routes[port].picker
        await eventually(lambda: picker.outstanding == {"web-b": 1}, TIMEOUT, 0.01, what="a and c idle")
        assert await ask(port) == "a"
    finally:
        for _, w in held:
            w.close()


async def test_consistent_hash_keeps_a_client_on_one_replica(
    backends: list[Backend], proxy: tuple[ServiceProxy, list]
) -> None:
    p, _ = proxy
    port = free_port()
    await p.update([table("web", [port], [endpoint(f"web-{b.name}", b.port) for b in backends],
                          algorithm="consistent_hash")])
    got = {await ask(port) for _ in range(12)}
    assert len(got) == 1, got


async def test_an_endpoint_that_refuses_is_ejected_and_no_client_fails(
    backends: list[Backend], proxy: tuple[ServiceProxy, list]
) -> None:
    p, events = proxy
    port = free_port()
    eps = [endpoint(f"web-{b.name}", b.port) for b in backends] + [endpoint("web-dead", closed_port())]
    await p.update([table("web", [port], eps)])
    got = [await ask(port) for _ in range(24)]
    assert "" not in got, "every client was answered"
    assert got.count("a") + got.count("b") + got.count("c") == 24
    assert p.routes[port].ejector.ejected(time.monotonic()) == {"web-dead"}
    assert ("Warning", "EndpointEjected", "pod/web-dead",
            "ejected from service web after repeated failed connections") in events


# -- the data path on both event loops ---------------------------------------------------
#
# The agent runs on uvloop when it is installed (`cli/main.py`), the tests above on
# asyncio's own loop: the scenarios below run on both, each with backends and a proxy
# of its own on the loop under test.

try:
    import uvloop
except ImportError:  # the `fast` extra is not installed
    uvloop = None  # type: ignore[assignment]

LOOPS = [pytest.param("asyncio", id="asyncio"),
         pytest.param("uvloop", id="uvloop", marks=pytest.mark.skipif(uvloop is None, reason="uvloop not installed"))]


def run_on(loop: str, main: Callable[[], Awaitable[None]]) -> None:
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(asyncio.wait_for(main(), 30))


async def greet_and_echo(s: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"b\n")
    while data := await reader.read(65536):
        s.received += data
        writer.write(data)
        await writer.drain()


async def mute(s: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accepts and reads, never answers, never closes: a paused or wedged process."""
    while data := await reader.read(65536):
        s.received += data
    await asyncio.Event().wait()


async def read_then_close(s: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Takes the request and closes without a byte: a dying container's port publisher."""
    s.received += await reader.read(65536)


class Setup:
    """A proxy on a free port in front of `servers`, with metrics."""

    def __init__(self, tmp: pathlib.Path, config: ProxyConfig | None = None) -> None:
        self.metrics = AgentMetrics(tmp)
        self.proxy = ServiceProxy(config or ProxyConfig(bind_host="127.0.0.1"), rng=random.Random(1),
                                  metrics=self.metrics)
        self.port = free_port()
        self.servers: list[Server] = []

    async def start(self, *servers: Server, algorithm: str = "round_robin") -> Setup:
        self.servers = [await s.start() for s in servers]
        await self.proxy.update([table("web", [self.port], [endpoint(f"web-{i}", s.port)
                                                            for i, s in enumerate(self.servers)], algorithm)])
        return self

    async def stop(self) -> None:
        await self.proxy.close()
        for s in self.servers:
            await s.stop()

    async def __aenter__(self) -> Setup:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def value(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, {"service": "web", **labels}) or 0.0

    def client(self) -> Any:
        (client,) = self.proxy._live
        return client

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), TIMEOUT)

    async def greeted(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection through the proxy to a `greet_and_echo`-style endpoint, its greeting read."""
        reader, writer = await self.connect()
        assert await asyncio.wait_for(reader.readline(), TIMEOUT) == b"b\n"
        return reader, writer


def cfg(**kw: Any) -> ProxyConfig:
    return ProxyConfig(bind_host="127.0.0.1", **kw)


@pytest.mark.parametrize("loop", LOOPS)
def test_an_endpoint_that_closes_before_answering_gets_the_request_replayed_elsewhere(
        loop: str, tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        dying, good = Server(read_then_close), Server(greet_and_echo)
        async with await Setup(tmp_path).start(dying, good) as s:
            reader, writer = await s.connect()
            writer.write(b"hello")  # before any answer: kept for a replay
            assert await asyncio.wait_for(reader.readline(), TIMEOUT) == b"b\n"
            assert await asyncio.wait_for(reader.readexactly(5), TIMEOUT) == b"hello"
            assert dying.received == b"hello" and good.received == b"hello"
            writer.close()
            await eventually(lambda: s.value("shoal_proxy_bytes_total", direction="in") == 5, TIMEOUT, 0.01,
                             what="bytes in counted once")
            assert s.value("shoal_proxy_errors_total", kind="dropped") == 1
            assert s.value("shoal_proxy_retries_total") == 1
            assert s.value("shoal_proxy_connections_total", endpoint="web-1") == 1
            assert s.value("shoal_proxy_bytes_total", direction="out") == 7
            assert s.proxy.routes[s.port].active == 0

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_nothing_is_replayed_after_the_first_answer(loop: str, tmp_path: pathlib.Path) -> None:
    async def greet_then_close(s: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"a\n")
        s.received += await reader.read(65536)

    async def main() -> None:
        first, other = Server(greet_then_close), Server(greet_and_echo)
        async with await Setup(tmp_path).start(first, other) as s:
            reader, writer = await s.connect()
            assert await asyncio.wait_for(reader.readline(), TIMEOUT) == b"a\n"
            writer.write(b"hello")
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # the endpoint's close reaches the client
            writer.close()
            assert other.connections == 0

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_endpoint_down_moves_a_waiting_connection_and_cuts_a_spliced_one(loop: str, tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        stuck, good = Server(mute), Server(greet_and_echo)
        async with await Setup(tmp_path).start(stuck, good) as s:
            reader, writer = await s.connect()
            writer.write(b"ping")
            await eventually(lambda: stuck.received == b"ping", TIMEOUT, 0.01, what="the request at the mute endpoint")
            s.proxy.endpoint_down("web-0")  # it will never answer: the request goes to web-1 now
            assert await asyncio.wait_for(reader.readline(), TIMEOUT) == b"b\n"
            assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT) == b"ping"
            assert [c.ep.replica_id for c in s.proxy._live] == ["web-1"]
            s.proxy.endpoint_down("web-1")  # spliced to an endpoint that is gone: cut
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
            writer.close()
            await eventually(lambda: not s.proxy._live, TIMEOUT, 0.01, what="the connection to end")
            assert s.value("shoal_proxy_errors_total", kind="dropped") == 1

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_half_close_is_forwarded_both_ways(loop: str, tmp_path: pathlib.Path) -> None:
    async def answer_after_eof(s: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()  # to the client's EOF
        s.received += request
        writer.write(request[::-1])

    async def greet_then_listen(s: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"done talking\n")
        writer.write_eof()  # the endpoint's half-close; it keeps reading
        s.received += await reader.read()

    async def main() -> None:
        # Client first: its EOF reaches the endpoint, whose answer still comes back.
        async with await Setup(tmp_path).start(Server(answer_after_eof)) as s:
            reader, writer = await s.connect()
            writer.write(b"abc")
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b"cba"
            writer.close()
        # Endpoint first: the client sees its EOF and can still send.
        listener = Server(greet_then_listen)
        async with await Setup(tmp_path).start(listener) as s:
            reader, writer = await s.connect()
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b"done talking\n"
            writer.write(b"still here")
            writer.write_eof()
            await asyncio.wait_for(listener.done.wait(), TIMEOUT)
            assert listener.received == b"still here"
            writer.close()
            await eventually(lambda: not s.proxy._live, TIMEOUT, 0.01, what="the connection to end")

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("slow", ["client", "endpoint"])
def test_a_slow_reader_pauses_the_writer_and_bounds_what_the_proxy_holds(
        loop: str, slow: str, tmp_path: pathlib.Path) -> None:
    total = 64 << 20  # far more than the socket buffers on both sides take
    block = b"x" * 65536

    async def firehose(s: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"b\n")
        if slow == "endpoint":  # reads nothing until told to, then drains to EOF
            await go.wait()
            while data := await reader.read(1 << 20):
                s.taken += len(data)  # counted, not kept
            return
        while s.sent < total:
            writer.write(block)
            s.sent += len(block)
            await writer.drain()

    go = asyncio.Event()

    async def main() -> None:
        chunk = 65536
        backend = Server(firehose)
        async with await Setup(tmp_path, cfg(chunk=chunk)).start(backend) as s:
            reader, writer = await s.greeted()
            c = s.client()
            if slow == "client":
                # The client reads nothing: the proxy stops reading the endpoint, whose
                # writes stall long before the end.
                await eventually(lambda: not c.up.transport.is_reading(), TIMEOUT, 0.01, what="endpoint reads paused")
                assert c.transport.get_write_buffer_size() <= chunk + (256 << 10)
                assert backend.sent < total
                got = 0
                while got < total:
                    got += len(await asyncio.wait_for(reader.read(1 << 20), TIMEOUT))
                assert got == total
            else:
                # The client floods an endpoint that reads nothing: the proxy stops
                # reading the client, whose writes stall.
                writing = asyncio.ensure_future(_flood(writer, total, block))
                await eventually(lambda: not c.transport.is_reading(), TIMEOUT, 0.01, what="client reads paused")
                assert c.up.transport.get_write_buffer_size() <= chunk + (256 << 10)
                assert not writing.done()
                go.set()
                await asyncio.wait_for(writing, TIMEOUT)
                writer.write_eof()
                await asyncio.wait_for(backend.done.wait(), TIMEOUT)
                assert backend.taken == total
            writer.close()
            await eventually(lambda: s.value("shoal_proxy_bytes_total", direction="out" if slow == "client" else "in")
                             >= total, TIMEOUT, 0.01, what="the bytes counted")

    run_on(loop, main)


async def _flood(writer: asyncio.StreamWriter, total: int, block: bytes) -> None:
    for _ in range(total // len(block)):
        writer.write(block)
        await writer.drain()


@pytest.mark.parametrize("loop", LOOPS)
def test_an_endpoint_that_never_answers_is_cut_and_charged(loop: str, tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        stuck = Server(mute)
        async with await Setup(tmp_path, cfg(answer_timeout=0.2)).start(stuck) as s:
            reader, writer = await s.connect()
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
            writer.close()
            assert stuck.received == b"ping"
            assert s.value("shoal_proxy_errors_total", kind="answer_timeout") == 1
            assert s.proxy.routes[s.port].ejector._streak == {"web-0": 1}

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_an_idle_connection_is_closed(loop: str, tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        async with await Setup(tmp_path, cfg(idle_timeout=0.2)).start(Server(greet_and_echo)) as s:
            reader, writer = await s.greeted()
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # nothing either way: closed
            writer.close()
            assert s.value("shoal_proxy_errors_total", kind="answer_timeout") == 0  # idle is no failure
            await eventually(lambda: s.value("shoal_proxy_active_connections") == 0, TIMEOUT, 0.01,
                             what="no active connection")

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_connections_over_the_limit_are_closed(loop: str, tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        async with await Setup(tmp_path, cfg(max_connections=1)).start(Server(greet_and_echo)) as s:
            reader, writer = await s.greeted()
            r2, w2 = await s.connect()
            assert await asyncio.wait_for(r2.read(), TIMEOUT) == b""
            w2.close()
            assert s.value("shoal_proxy_errors_total", kind="limit") == 1
            assert s.proxy.routes[s.port].active == 1
            writer.close()
            await eventually(lambda: s.proxy.routes[s.port].active == 0, TIMEOUT, 0.01, what="the slot freed")
            assert await ask(s.port) == "b"

    run_on(loop, main)


# -- the parts other modules build on -------------------------------------------------------


async def test_an_app_protocol_change_reopens_the_listener(backends: list[Backend],
                                                             proxy: tuple[ServiceProxy, list]) -> None:
    p, _ = proxy
    port = free_port()

    def tables(app_protocol: str) -> list[Any]:
        # Stand-ins for shoal.v1.Table: `app_protocol` is read when the message has it.
        ep = SimpleNamespace(pod="web-a", address="127.0.0.1", port=backends[0].port, weight=1)
        ports = [SimpleNamespace(port=port, node_port=0, app_protocol=app_protocol)]
        return [SimpleNamespace(service="web", algorithm="round_robin", version=1, endpoints=[ep], ports=ports)]

    await p.update(tables(""))
    first = p.routes[port]
    assert first.protocol == "tcp"
    await p.update(tables("tcp"))
    assert p.routes[port] is first  # the same protocol: the listener stays
    await p.update(tables("grpc"))
    assert p.routes[port] is not first and p.routes[port].protocol == "grpc"
    assert await ask(port) == "a"


def test_watching_an_endpoint() -> None:
    p = ServiceProxy(ProxyConfig())
    told: list[str] = []
    kept = p.watch_endpoint("web-a", lambda: told.append("kept"))
    dropped = p.watch_endpoint("web-a", lambda: told.append("dropped"))
    p.watch_endpoint("web-b", lambda: told.append("other"))
    p.unwatch(dropped)
    p.unwatch(dropped)  # harmless twice
    p.endpoint_down("web-a")
    p.endpoint_down("web-a")  # once only
    assert told == ["kept"]
    p.unwatch(kept)  # harmless after the call
    assert set(p._watches) == {"web-b"}


@pytest.mark.parametrize("field_, value, message", [
    ("connect_timeout", 0.0, "connect_timeout must be a positive number of seconds"),
    ("answer_timeout", -1.0, "answer_timeout must be a positive number of seconds"),
    ("idle_timeout", 0.0, "idle_timeout must be a positive number of seconds"),
    ("chunk", 0, "chunk must be at least 1"),
    ("max_connections", 0, "max_connections must be at least 1"),
    ("replay_limit", -1, "replay_limit must not be negative"),
])
def test_bad_proxy_settings_are_refused(field_: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServiceProxy(ProxyConfig(**{field_: value}))


@pytest.mark.parametrize("answer, idle, interval", [
    (60.0, 900.0, 5.0),  # the defaults: capped at 5 s
    (8.0, 900.0, 1.0),
    (60.0, 0.4, 0.05),
    (0.01, 900.0, 0.01),  # floor
])
def test_sweep_interval(answer: float, idle: float, interval: float) -> None:
    assert ProxyConfig(answer_timeout=answer, idle_timeout=idle).sweep_interval == pytest.approx(interval)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_connect_that_hangs_times_out_and_goes_elsewhere(loop: str, tmp_path: pathlib.Path) -> None:
    # A listener that never accepts, its backlog full: the kernel drops further SYNs,
    # so a connect neither completes nor fails (a host that vanished looks the same).
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    fillers = []
    for _ in range(2):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(blackhole.getsockname())
        fillers.append(f)

    async def main() -> None:
        async with Setup(tmp_path, cfg(connect_timeout=0.2)) as s:
            good = await Server(greet_and_echo).start()
            s.servers = [good]
            await s.proxy.update([table("web", [s.port], [endpoint("web-0", blackhole.getsockname()[1]),
                                                          endpoint("web-1", good.port)])])
            assert await ask(s.port) == "b"
            assert s.value("shoal_proxy_errors_total", kind="connect") == 1
            assert s.value("shoal_proxy_retries_total") == 1

    try:
        run_on(loop, main)
    finally:
        for f in fillers:
            f.close()
        blackhole.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_a_client_that_reads_nothing_after_the_endpoint_left_is_cut_when_idle(loop: str, tmp_path: pathlib.Path) -> None:
    async def blob_then_close(s: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"x" * (32 << 20))  # more than the client's socket buffers take
        await writer.drain()

    async def main() -> None:
        backend = Server(blob_then_close)
        # A write buffer larger than the blob: the proxy reads all of it, sees the
        # endpoint close, and is left holding what the client does not take.
        async with await Setup(tmp_path, cfg(idle_timeout=0.3, chunk=64 << 20)).start(backend) as s:
            _, writer = await s.connect()
            writer.write_eof()  # both directions end: the proxy closes the client's side...
            await asyncio.wait_for(backend.done.wait(), TIMEOUT)
            # ...which waits for the client to take what is buffered; a client that takes
            # nothing is cut once idle, and the proxy lets go of the connection.
            await eventually(lambda: not s.proxy._live, TIMEOUT, 0.02, what="the connection released")
            assert s.proxy.routes[s.port].active == 0
            writer.close()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_client_that_connects_and_leaves_charges_no_endpoint(loop: str, tmp_path: pathlib.Path) -> None:
    # What a TCP health check does: connect, close. The endpoint closes in turn without
    # a byte, which is no failure of its own: nothing is retried, nobody is ejected.
    async def main() -> None:
        async with await Setup(tmp_path).start(Server(read_then_close), Server(read_then_close)) as s:
            for _ in range(4):
                _, writer = await s.connect()
                writer.close()
            await eventually(lambda: sum(srv.connections for srv in s.servers) == 4 and not s.proxy._live, TIMEOUT,
                             0.01, what="four connections through and done")
            assert s.value("shoal_proxy_errors_total", kind="dropped") == 0
            assert s.value("shoal_proxy_retries_total") == 0
            assert s.proxy.routes[s.port].ejector._streak == {}

    run_on(loop, main)
