"""The client library's balanced gRPC channels (`shoal.client.channel`, `aio_channel`)
and the agent's `Control.WatchTable` that feeds them.

Endpoints are real gRPC servers on loopback (the standard health service, answering
with their name in the trailing metadata); tables come from a twin of the agent's feed
(`FakeTables`), or from a real `shoal agent --dev` at the end.
"""

from __future__ import annotations

import asyncio
import pathlib
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shoal.aio_channel import AioBalancedChannel
from shoal.balancing import Endpoint, RetryBudget, Table
from shoal.call_balancer import CallBalancer, Outcome, parse_target, retryable
from shoal.channel import HASH_KEY_METADATA, BalancedChannel
from shoal.client import aio_channel, channel
from shoal.errors import ConfigError, NotFound
from shoal.model import Algorithm
from shoal.table_feed import TableFeed, follow_step
from shoal.v1 import control_pb2, control_pb2_grpc, types_pb2
from tests.cluster import DevAgent, service_manifest, whoami_deployment
from tests.helpers import eventually, free_port, wait_until

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHECK = health_pb2.HealthCheckRequest()


# -- endpoints ------------------------------------------------------------------------

class Who(health_pb2_grpc.HealthServicer):
    """A health service that names itself in its trailing metadata; `delay` makes it
    slow, `refuse` answers UNAVAILABLE (after the request reached it), `hold` keeps
    Watch streams open until released."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.delay = 0.0
        self.refuse = False
        self.calls = 0
        self.hold = threading.Event()
        self._lock = threading.Lock()

    def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext) -> health_pb2.HealthCheckResponse:
        with self._lock:
            self.calls += 1
        context.set_trailing_metadata((("who", self.name),))
        if self.refuse:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} is shedding load")
        if self.delay:
            time.sleep(self.delay)  # the endpoint's service time, what p2c must notice
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext) -> Iterator[health_pb2.HealthCheckResponse]:
        with self._lock:
            self.calls += 1
        context.set_trailing_metadata((("who", self.name),))
        yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        if request.service == "hold":
            self.hold.wait(30)


class Backend:
    def __init__(self, name: str) -> None:
        self.who = Who(name)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        health_pb2_grpc.add_HealthServicer_to_server(self.who, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def endpoint(self, weight: int = 1) -> types_pb2.Endpoint:
        return types_pb2.Endpoint(pod=self.who.name, address="127.0.0.1", port=self.port, weight=weight)

    def stop(self) -> None:
        self.who.hold.set()
        self.server.stop(None)


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    made = [Backend(f"svc-{c}") for c in "abc"]
    yield made
    for b in made:
        b.stop()


def table(eps: list[types_pb2.Endpoint], *, version: int = 1, algorithm: str = "round_robin") -> types_pb2.Table:
    return types_pb2.Table(service="svc", algorithm=algorithm, version=version,
                           endpoints=sorted(eps, key=lambda e: e.pod))


def closed_endpoint(name: str = "svc-0down") -> types_pb2.Endpoint:
    return types_pb2.Endpoint(pod=name, address="127.0.0.1", port=free_port(), weight=1)


# -- the agent's feed, as a twin --------------------------------------------------------

class _FakeWatch:
    def __init__(self, q: queue.Queue[object]) -> None:
        self._q = q

    def __iter__(self) -> Iterator[types_pb2.Table]:
        while True:
            item = self._q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, types_pb2.Table)
            yield item

    def cancel(self) -> bool:
        self._q.put(None)
        return True


class FakeTables:
    """The agent's side of WatchTable for one channel: tables (or errors) pushed in order."""

    def __init__(self, *first: types_pb2.Table) -> None:
        self.q: queue.Queue[object] = queue.Queue()
        for t in first:
            self.q.put(t)

    def push(self, item: types_pb2.Table | BaseException) -> None:
        self.q.put(item)

    def watch(self, service: str) -> _FakeWatch:
        return _FakeWatch(self.q)

    def close(self) -> None:
        pass


class AioFakeTables:
    def __init__(self, *first: types_pb2.Table) -> None:
        self.q: asyncio.Queue[types_pb2.Table] = asyncio.Queue()
        for t in first:
            self.q.put_nowait(t)

    async def _tables(self) -> AsyncIterator[types_pb2.Table]:
        while True:
            yield await self.q.get()

    def watch(self, service: str) -> AsyncIterator[types_pb2.Table]:
        return self._tables()

    async def close(self) -> None:
        pass


def answered_by(ch: grpc.Channel, n: int, **kw: object) -> list[str]:
    stub = health_pb2_grpc.HealthStub(ch)
    out = []
    for _ in range(n):
        _, call = stub.Check.with_call(CHECK, timeout=5, **kw)
        out.append(dict(call.trailing_metadata())["who"])
    return out


def make(source: FakeTables, **kw: object) -> BalancedChannel:
    return BalancedChannel("svc", source, rng=random.Random(1), **kw)  # type: ignore[arg-type]


# -- pure parts -------------------------------------------------------------------------

@pytest.mark.parametrize("target, expect", [
    ("shoal:///whoami", (None, "whoami")),
    ("shoal://10.0.0.1:7420/whoami", ("10.0.0.1:7420", "whoami")),
])
def test_targets(target: str, expect: tuple[str | None, str]) -> None:
    assert parse_target(target) == expect


@pytest.mark.parametrize("target", ["dns:///whoami", "whoami", "shoal://", "shoal:///", "shoal:///a/b", "shoal://host"])
def test_bad_targets_say_what_is_expected(target: str) -> None:
    with pytest.raises(ConfigError, match="expected shoal:///SERVICE"):
        parse_target(target)


@pytest.mark.parametrize("code, details, idempotent, expect", [
    ("UNAVAILABLE", "failed to connect to all addresses; last error: Connection refused", False, True),
    ("UNAVAILABLE", "Socket closed", False, False),          # may have been sent
    ("UNAVAILABLE", "Socket closed", True, True),
    ("UNAVAILABLE", "svc-a is shedding load", False, False),  # the endpoint answered
    ("DEADLINE_EXCEEDED", "failed to connect to all addresses", True, False),
    ("INTERNAL", "", True, False),
])
def test_which_failures_are_retried(code: str, details: str, idempotent: bool, expect: bool) -> None:
    assert retryable(code, details, idempotent=idempotent) is expect


def _t(version: int, *names: str, ports: dict[str, int] | None = None) -> types_pb2.Table:
    return types_pb2.Table(service="svc", version=version, endpoints=[
        types_pb2.Endpoint(pod=n, address="h", port=(ports or {}).get(n, 1)) for n in names])


@pytest.mark.parametrize("held, sent, expect", [
    (None, None, None),                       # no tables yet: wait
    ({"svc": _t(1, "a")}, None, 1),           # the current table first
    ({"svc": _t(1, "a")}, 1, None),           # nothing new
    ({"svc": _t(2, "a", "b")}, 1, 2),         # a new version
])
def test_follow_step(held: dict[str, types_pb2.Table] | None, sent: int | None, expect: int | None) -> None:
    got = follow_step(held, "svc", sent)
    assert (got.version if got is not None else None) == expect


@pytest.mark.parametrize("sent, words", [(None, "not found"), (3, "was deleted")])
def test_follow_step_unknown_service(sent: int | None, words: str) -> None:
    with pytest.raises(NotFound, match=f'service "svc" {words} .*other'):
        follow_step({"other": _t(1, "a")}, "svc", sent)


async def test_feed_streams_current_then_changes_only() -> None:
    feed = TableFeed()
    got: list[int] = []

    async def follow() -> None:
        async for t in feed.follow("svc"):
            got.append(t.version)

    task = asyncio.create_task(follow())
    feed.publish([_t(1, "a")])
    await eventually(lambda: got == [1], what="the first table")
    feed.publish([_t(1, "a"), types_pb2.Table(service="other", version=7)])  # svc unchanged
    feed.publish([_t(2, "a", "b")])
    await eventually(lambda: got == [1, 2], what="the second version, once")
    feed.publish([])
    with pytest.raises(NotFound, match="was deleted"):
        await asyncio.wait_for(task, 5)


async def test_client_agent_serves_watch_table_from_its_copy() -> None:
    from shoal.agent.client_api import ClientControl

    async def no_logs(pod: str, follow: bool, tail: int) -> AsyncIterator[bytes]:
        raise NotFound("pod", pod)
        yield b""

    feed = TableFeed()
    server = grpc.aio.server()
    # No server known (None): WatchTable must not need one.
    control_pb2_grpc.add_ControlServicer_to_server(ClientControl(lambda: None, list, no_logs, tables=feed), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = control_pb2_grpc.ControlStub(ch)
            call = stub.WatchTable(control_pb2.WatchTableRequest(service="svc"), timeout=10)
            feed.publish([_t(1, "a")])
            assert (await call.read()).version == 1
            feed.publish([_t(2, "a", "b")])
            assert [e.pod for e in (await call.read()).endpoints] == ["a", "b"]
            feed.publish([types_pb2.Table(service="other", version=1)])
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert err.value.details() == 'service "svc" was deleted (services this agent knows: other)'
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.WatchTable(control_pb2.WatchTableRequest(), timeout=10).read()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await server.stop(None)


def test_balancer_closes_a_removed_target_after_its_last_call() -> None:
    core = CallBalancer("svc", random.Random(0))
    a = Endpoint(replica_id="a", address="h", port=1)
    b = Endpoint(replica_id="b", address="h", port=2)
    change = core.update(Table(service="svc", algorithm=Algorithm.ROUND_ROBIN, version=1, endpoints=(a, b)))
    assert change.opened == ("h:1", "h:2") and change.closed == ()
    ep = core.pick(0.0)
    assert ep == a
    target = core.started(ep)
    change = core.update(Table(service="svc", algorithm=Algorithm.ROUND_ROBIN, version=2, endpoints=(b,)))
    assert change.closed == ()                 # a call still runs on h:1
    assert [core.pick(0.0) for _ in range(3)] == [b, b, b]
    assert core.finished(ep, target, Outcome(seconds=0.01), 0.0) == ("h:1",)
    assert core.targets == ("h:2",)


def test_balancer_moves_a_replica_whose_port_changed() -> None:
    core = CallBalancer("svc", random.Random(0))
    a1 = Endpoint(replica_id="a", address="h", port=1)
    core.update(Table(service="svc", algorithm=Algorithm.ROUND_ROBIN, version=1, endpoints=(a1,)))
    change = core.update(Table(service="svc", algorithm=Algorithm.ROUND_ROBIN, version=2,
                               endpoints=(Endpoint(replica_id="a", address="h", port=9),)))
    assert change.opened == ("h:9",) and change.closed == ("h:1",)


# -- the sync channel -------------------------------------------------------------------

def test_round_robin_spreads_calls_exactly(backends: list[Backend]) -> None:
    with make(FakeTables(table([b.endpoint() for b in backends]))) as ch:
        got = answered_by(ch, 30)
    assert got == ["svc-a", "svc-b", "svc-c"] * 10


def test_round_robin_stays_exact_across_threads(backends: list[Backend]) -> None:
    with make(FakeTables(table([b.endpoint() for b in backends]))) as ch:
        with futures.ThreadPoolExecutor(max_workers=4) as pool:
            runs = list(pool.map(lambda _: answered_by(ch, 30), range(4)))
    assert Counter(w for run in runs for w in run) == {"svc-a": 40, "svc-b": 40, "svc-c": 40}


async def test_aio_channel_reports_an_unknown_service() -> None:
    class NotFoundError(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.NOT_FOUND

        def details(self) -> str:
            return 'service "svc" not found (services this agent knows: none)'

    class Missing:
        async def _fail(self) -> AsyncIterator[types_pb2.Table]:
            raise NotFoundError()
            yield types_pb2.Table()

        def watch(self, service: str) -> AsyncIterator[types_pb2.Table]:
            return self._fail()

        async def close(self) -> None:
            pass

    async with AioBalancedChannel("svc", Missing()) as ch:
        with pytest.raises(grpc.RpcError) as err:
            await health_pb2_grpc.HealthStub(ch).Check(CHECK, timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "services this agent knows" in err.value.details()


def test_generated_stub_streams_work(backends: list[Backend]) -> None:
    with make(FakeTables(table([b.endpoint() for b in backends]))) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        firsts = []
        for _ in range(3):
            call = stub.Watch(CHECK, timeout=5)
            assert [r.status for r in call] == [health_pb2.HealthCheckResponse.SERVING]
            firsts.append(dict(call.trailing_metadata())["who"])
    assert firsts == ["svc-a", "svc-b", "svc-c"]


def test_removed_endpoint_gets_no_more_calls_and_closes_after_its_last(backends: list[Backend]) -> None:
    a, b, c = backends
    feed = FakeTables(table([x.endpoint() for x in backends]))
    with make(feed) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        held = stub.Watch(health_pb2.HealthCheckRequest(service="hold"), timeout=30)  # on svc-a, first in turn
        assert next(held).status == health_pb2.HealthCheckResponse.SERVING
        feed.push(table([b.endpoint(), c.endpoint()], version=2))
        wait_until(lambda: ch.table_version() == 2, 5, what="table version 2")
        a_calls = a.who.calls
        assert Counter(answered_by(ch, 20)) == {"svc-b": 10, "svc-c": 10}
        assert a.who.calls == a_calls
        # svc-a's sub-channel stays open while its stream runs, and closes after it.
        assert f"127.0.0.1:{a.port}" in ch.subchannels()
        a.who.hold.set()
        assert list(held) == []
        wait_until(lambda: f"127.0.0.1:{a.port}" not in ch.subchannels(), 5, what="svc-a's sub-channel closed")
        assert len(ch.subchannels()) == 2


def test_endpoint_that_is_down_costs_no_failed_call(backends: list[Backend]) -> None:
    down = closed_endpoint()
    with make(FakeTables(table([down] + [b.endpoint() for b in backends]))) as ch:
        got = answered_by(ch, 60)
        stub = health_pb2_grpc.HealthStub(ch)
        streamed = [list(stub.Watch(CHECK, timeout=5)) for _ in range(8)]
    assert len(got) == 60 and set(got) == {"svc-a", "svc-b", "svc-c"}
    assert all(len(s) == 1 for s in streamed)


def test_unavailable_after_sending_is_retried_only_when_idempotent(backends: list[Backend]) -> None:
    a, b, c = backends
    a.who.refuse = True
    eps = table([x.endpoint() for x in backends])
    with make(FakeTables(eps)) as ch:
        with pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(ch).Check(CHECK, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shedding" in err.value.details()
    with make(FakeTables(eps), idempotent=["/grpc.health.v1.Health/Check"]) as ch:
        assert set(answered_by(ch, 9)) == {"svc-b", "svc-c"}


def test_retries_stop_at_the_budget(backends: list[Backend]) -> None:
    backends[0].who.refuse = True
    # A clock that stands still: svc-a, once ejected, stays out for the whole test.
    with make(FakeTables(table([x.endpoint() for x in backends])), idempotent=True,
              retry_budget=RetryBudget(ratio=0.0, reserve=2.0), clock=lambda: 100.0) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        failed = 0
        for _ in range(12):
            try:
                stub.Check(CHECK, timeout=5)
            except grpc.RpcError:
                failed += 1
    # svc-a's first two turns are retried on svc-b (the budget's two tokens); its third
    # fails the call and ejects it (three failures in a row), so no call fails after.
    assert failed == 1
    assert backends[0].who.calls == 3


def test_p2c_ewma_avoids_a_slow_endpoint(backends: list[Backend]) -> None:
    backends[1].who.delay = 0.03
    with make(FakeTables(table([b.endpoint() for b in backends], algorithm="p2c_ewma"))) as ch:
        got = Counter(answered_by(ch, 150))
    assert got["svc-b"] < 0.15 * 150, got
    assert got["svc-a"] > 40 and got["svc-c"] > 40, got


def test_consistent_hash_keeps_a_key_on_one_endpoint(backends: list[Backend]) -> None:
    with make(FakeTables(table([b.endpoint() for b in backends], algorithm="consistent_hash"))) as ch:
        by_key = {k: set(answered_by(ch, 5, metadata=((HASH_KEY_METADATA, k),))) for k in ("u1", "u2", "u3", "u4", "u5", "u6")}
        stub = health_pb2_grpc.HealthStub(ch)
        kw = {stub.Check.with_call(CHECK, timeout=5, hash_key=b"u1")[1].trailing_metadata()[0].value for _ in range(5)}
    assert all(len(v) == 1 for v in by_key.values()), by_key
    assert len(set().union(*by_key.values())) > 1
    assert kw == by_key["u1"]


def test_unknown_service_fails_calls_with_the_agents_words() -> None:
    class NotFoundError(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.NOT_FOUND

        def details(self) -> str:
            return 'service "svc" not found (services this agent knows: who)'

    with make(FakeTables(), table_wait=5) as ch:
        ch._source.push(NotFoundError())  # type: ignore[attr-defined]
        with pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(ch).Check(CHECK, timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "services this agent knows: who" in err.value.details()


def test_no_endpoint_fails_fast_or_waits_for_one(backends: list[Backend]) -> None:
    feed = FakeTables(table([]))
    with make(feed) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        wait_until(lambda: ch.table_version() == 1, 5, what="the empty table")
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(CHECK, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no ready endpoint" in err.value.details()
        result: list[str] = []
        t = threading.Thread(target=lambda: result.extend(answered_by(ch, 1, wait_for_ready=True)))
        t.start()
        feed.push(table([backends[2].endpoint()], version=2))
        t.join(10)
    assert result == ["svc-c"]


def test_channel_rejects_targets_that_are_not_shoal_ones() -> None:
    with pytest.raises(ConfigError, match="not a shoal target"):
        channel("dns:///whoami")
    with pytest.raises(ConfigError, match="names no service"):
        aio_channel("shoal://127.0.0.1:7420")


# -- the aio channel --------------------------------------------------------------------

async def test_aio_channel_balances_and_retries_a_down_endpoint(backends: list[Backend]) -> None:
    down = closed_endpoint()
    source = AioFakeTables(table([down] + [b.endpoint() for b in backends]))
    async with AioBalancedChannel("svc", source, rng=random.Random(1)) as ch:  # type: ignore[arg-type]
        stub = health_pb2_grpc.HealthStub(ch)
        got = []
        for _ in range(12):
            call = stub.Check(CHECK, timeout=5)
            assert (await call).status == health_pb2.HealthCheckResponse.SERVING
        streamed = [[r.status async for r in stub.Watch(CHECK, timeout=5)] for _ in range(4)]
        got = [b.who.calls for b in backends]
        source.q.put_nowait(table([backends[0].endpoint()], version=2))
        await eventually(lambda: ch.table_version() == 2, what="table version 2")
        await stub.Check(CHECK, timeout=5)
        assert backends[0].who.calls == got[0] + 1
        await eventually(lambda: len(ch.subchannels()) == 1, what="removed sub-channels closed")
    # Every call answered, each live endpoint used (round robin hands a down endpoint's
    # turns to the next one, so the three need not be even).
    assert sum(got) == 16 and min(got) >= 3
    assert streamed == [[health_pb2.HealthCheckResponse.SERVING]] * 4


# -- a real agent -----------------------------------------------------------------------

@pytest.mark.e2e
def test_agent_watch_table_streams_the_table_and_its_changes(tmp_path: pathlib.Path) -> None:
    whoami = ROOT / "build" / "bin" / "whoami"
    if not whoami.exists():
        pytest.skip("scripts/build-images.sh builds build/bin/whoami")
    agent = DevAgent(data_dir=tmp_path / "data")
    agent.start()
    try:
        m = tmp_path / "who.yaml"
        m.write_text(whoami_deployment(whoami, "whotab", 2) + "---\n" + service_manifest("whotab", free_port()))
        r = agent.cli("apply", "-f", str(m))
        assert r.code == 0, r.err
        with grpc.insecure_channel(agent.addr) as ctl:
            stub = control_pb2_grpc.ControlStub(ctl)
            with pytest.raises(grpc.RpcError) as err:
                list(stub.WatchTable(control_pb2.WatchTableRequest(service="nosuch"), timeout=10))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and "whotab" in err.value.details()
            stream = stub.WatchTable(control_pb2.WatchTableRequest(service="whotab"), timeout=90)
            first = next(stream)
            assert first.service == "whotab" and first.version >= 1
            t = first
            while len(t.endpoints) < 2:
                t = next(stream)
                assert t.version > first.version
            ch = channel("shoal:///whotab", agent=agent.addr)
            try:
                assert ch.wait_for_endpoints(2, timeout=30)
                r = agent.cli("scale", "deployment/whotab", "--replicas", "3")
                assert r.code == 0, r.err
                before = t.version
                while len(t.endpoints) < 3:
                    t = next(stream)
                assert t.version > before
                assert sorted(e.pod for e in t.endpoints) == sorted(p["name"] for p in agent.get_json("pods"))
                assert ch.wait_for_endpoints(3, timeout=30)
                assert {e.replica_id for e in ch.endpoints()} == {e.pod for e in t.endpoints}
            finally:
                ch.close()
            stream.cancel()
    finally:
        agent.stop()
        agent.cleanup_workloads()
