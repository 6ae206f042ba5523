"""The agent's TCP service proxy, with real asyncio backends on 127.0.0.1."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import AsyncIterator, Sequence

import pytest

from shoal.agent.proxy import ProxyConfig, ServiceProxy
from shoal.v1 import types_pb2

from helpers import eventually, free_port

TIMEOUT = 5.0


class Backend:
    """Answers every connection with its name and a newline, then echoes until EOF."""

    def __init__(self, name: str, delay: float = 0.0) -> None:
        self.name = name
        self.delay = delay  # before the greeting: a slow replica
        self.server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0

    async def start(self) -> Backend:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            writer.write(f"{self.name}\n".encode())
            await writer.drain()
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
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
