"""The gossip shell on loopback: real UDP and TCP sockets, the `local()` timings.

Five members on 127.0.0.x (distinct addresses, ports picked by the kernel) join through
one seed; a member closed without leaving (a crash) is declared dead by the others and
comes back alive at a higher incarnation when restarted; a graceful leave shows as LEFT;
garbage sent to a live member is dropped and counted by reason and changes nothing.
Every wait is a condition with a deadline (`eventually`), never a sleep.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import socket
import time
from collections.abc import AsyncIterator

import pytest

from shoal.agent import gossip_wire as wire
from shoal.agent.gossip import GossipConfig, GossipShell, parse_seed
from shoal.agent.gossip_wire import DropReason
from shoal.agent.swim import Config, EventKind, MemberEvent, State
from shoal.agent.swim.messages import Alive, PushPullRequest
from shoal.errors import ConfigError
from tests.helpers import eventually, free_port

pytestmark = pytest.mark.timeout(60)

CLUSTER = "test"
N = 5
# Crash to dead-on-everyone takes about 1-2 s with local(); generous for a loaded machine.
DETECT_DEADLINE = 10.0
SWIM = Config.local()


def _config(i: int, **kw: object) -> GossipConfig:
    return GossipConfig(
        name=f"node-{i}",
        cluster=CLUSTER,
        bind=f"127.0.0.{20 + i}",
        port=0,
        meta={"role": "server" if i == 0 else "client"},
        swim=SWIM,
        join_backoff=0.1,
        # UDP cannot carry more than 65,507 bytes, so the default 64 KiB limit is never
        # crossed on a socket: lower it to exercise the oversized path for real.
        max_datagram=4096,
        **kw,  # type: ignore[arg-type]
    )


def _view(shell: GossipShell) -> dict[str, State]:
    return {m.name: m.state for m in shell.members()}


def _all_alive(shells: list[GossipShell], n: int = N) -> bool:
    return all(
        len(v := _view(s)) == n and all(st is State.ALIVE for st in v.values()) for s in shells if not s.closed
    )


@pytest.fixture
async def cluster() -> AsyncIterator[list[GossipShell]]:
    """Five started and converged members; node-0 is the seed."""
    shells = [GossipShell(_config(i), rng=random.Random(i)) for i in range(N)]
    try:
        for s in shells:
            await s.start()
        seed = f"{shells[0].address[0]}:{shells[0].address[1]}"
        joined = await asyncio.gather(*(s.join([seed], timeout=5.0) for s in shells[1:]))
        assert joined == [True] * (N - 1)
        await eventually(lambda: _all_alive(shells), timeout=10.0, what="all five alive everywhere")
        yield shells
    finally:
        for s in shells:
            await s.close()


async def test_five_members_join_through_one_seed_and_see_each_other() -> None:
    shells = [GossipShell(_config(i), rng=random.Random(i)) for i in range(N)]
    try:
        for s in shells:
            await s.start()
        events = shells[0].subscribe()
        seen: list[MemberEvent] = []
        remove = shells[1].add_callback(seen.append)
        assert await shells[0].join([shells[0].address]) is True  # the seed joins itself: first member
        assert await shells[0].join([]) is True
        t0 = time.monotonic()
        seed = f"{shells[0].address[0]}:{shells[0].address[1]}"
        assert await asyncio.gather(*(s.join([seed], timeout=5.0) for s in shells[1:])) == [True] * 4
        await eventually(lambda: _all_alive(shells), timeout=10.0, what="all five alive everywhere")
        print(f"converged in {time.monotonic() - t0:.3f} s")
        for s in shells:
            assert {m.name: m.meta_get("role") for m in s.members()} == {
                f"node-{i}": "server" if i == 0 else "client" for i in range(N)
            }
            assert s.local.address == s.address and s.address[1] != 0
        joins = []
        while not events.empty():
            ev = events.get_nowait()
            if ev.kind is EventKind.JOIN:
                joins.append(ev.member.name)
        assert sorted(joins) == [f"node-{i}" for i in range(1, N)]
        assert {ev.member.name for ev in seen if ev.kind is EventKind.JOIN} == {
            f"node-{i}" for i in range(N) if i != 1
        }
        remove()
        # Heard from recently: the members probe each other all the time.
        await eventually(
            lambda: all((h := shells[0].heard_ago(f"node-{i}")) is not None and h < 2.0 for i in range(1, N)),
            timeout=5.0, what="node-0 hears everyone",
        )
        # Metadata changes spread like any other change.
        shells[2].update_meta({"role": "client", "version": "2"})
        await eventually(
            lambda: all(s.member("node-2").meta_get("version") == "2" for s in shells),  # type: ignore[union-attr]
            timeout=5.0, what="new metadata everywhere",
        )
        assert any(ev.kind is EventKind.UPDATE and ev.member.name == "node-2" for ev in _drain(events))
        assert all(s.stats.core_errors == 0 and sum(s.stats.dropped.values()) == 0 for s in shells)
    finally:
        for s in shells:
            await s.close()


def _drain(q: asyncio.Queue[MemberEvent]) -> list[MemberEvent]:
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


async def test_crashed_member_is_declared_dead_and_comes_back_with_a_higher_incarnation(
    cluster: list[GossipShell],
) -> None:
    victim = cluster[4]
    others = cluster[:4]
    events = others[0].subscribe()
    address = victim.address
    await victim.close()  # no leave: the others only notice the silence
    t0 = time.monotonic()
    await eventually(
        lambda: all(_view(s)["node-4"] is State.DEAD for s in others),
        timeout=DETECT_DEADLINE, interval=0.02, what="node-4 dead on every member",
    )
    print(f"crash detected by all in {time.monotonic() - t0:.2f} s")
    assert [ev.kind for ev in _drain(events) if ev.member.name == "node-4"][-1] is EventKind.DEAD
    dead_incarnation = max(s.member("node-4").incarnation for s in others)  # type: ignore[union-attr]

    # Same name, same address, a new process.
    reborn = GossipShell(dataclasses.replace(victim.config, port=address[1]), rng=random.Random(99))
    cluster[4] = reborn  # the fixture closes it
    await reborn.start()
    assert reborn.address == address
    assert await reborn.join([cluster[0].address], timeout=5.0)
    await eventually(
        lambda: _all_alive(cluster)
        and all(s.member("node-4").incarnation > dead_incarnation for s in cluster),  # type: ignore[union-attr]
        timeout=DETECT_DEADLINE, what="node-4 alive again at a higher incarnation everywhere",
    )
    assert any(ev.kind is EventKind.JOIN and ev.member.name == "node-4" for ev in _drain(events))


async def test_graceful_leave_shows_as_left(cluster: list[GossipShell]) -> None:
    leaver = cluster[3]
    events = cluster[0].subscribe()
    t0 = time.monotonic()
    await leaver.leave()
    assert time.monotonic() - t0 < 1.5  # drained, or the 1 s leave timeout
    await leaver.close()
    others = [s for s in cluster if s is not leaver]
    await eventually(
        lambda: all(_view(s)["node-3"] is State.LEFT for s in others),
        timeout=5.0, interval=0.02, what="node-3 LEFT on every member",
    )
    assert any(ev.kind is EventKind.LEAVE and ev.member.name == "node-3" for ev in _drain(events))
    # Nobody took the departure for a failure.
    assert all(ev.kind is not EventKind.DEAD for ev in _drain(events))


async def test_garbage_is_dropped_counted_and_changes_nothing(cluster: list[GossipShell]) -> None:
    target = cluster[1]
    before = {s.name: set(_view(s)) for s in cluster}
    dropped0 = dict(target.stats.dropped)
    intruder = Alive(name="intruder", address=("127.0.0.99", 7421), incarnation=5)
    ours = wire.encode_packets([intruder], CLUSTER).datagrams[0]
    theirs = wire.encode_packets([intruder], "other-cluster").datagrams[0]
    rng = random.Random(5)
    junk = [bytes([rng.choice([b for b in range(256) if b != wire.MAGIC])]) + rng.randbytes(rng.randrange(8, 1200))
            for _ in range(20)]
    # A push-pull in a datagram is refused too: it is stream-only.
    pp = PushPullRequest(sender="intruder", states=())
    payload = wire._cluster_field(CLUSTER) + wire._record(b"\x12", wire.to_proto(pp).SerializeToString())
    pp_datagram = bytes((wire.MAGIC, wire.VERSION)) + len(payload).to_bytes(2, "big") + payload

    sends = (
        [(d, DropReason.MALFORMED) for d in junk]
        + [(pp_datagram, DropReason.MALFORMED)]
        + [(ours[:cut], DropReason.TRUNCATED) for cut in (0, 3, len(ours) // 2, len(ours) - 1)]
        + [(ours + rng.randbytes(8000), DropReason.OVERSIZED)] * 3
        + [(theirs, DropReason.FOREIGN_CLUSTER)] * 5
    )
    expected = {r: dropped0[r] + sum(1 for _, why in sends if why is r) for r in DropReason}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.99", 0))
        for data, _ in sends:
            sock.sendto(data, target.address)
    await eventually(lambda: target.stats.dropped == expected, timeout=5.0, what=f"drop counters {expected}")

    # Garbage over TCP (the push-pull port): each connection dropped by its reason.
    stream0 = dict(target.stats.stream_dropped)
    frame = wire.encode_frame(pp, "other-cluster")
    for data in (
        b"\x00garbage that is no frame",
        frame,  # a well-formed frame of another cluster
        wire.encode_frame(pp, CLUSTER)[:20],  # cut short, then the connection closes
        bytes((wire.MAGIC, wire.VERSION)) + (wire.MAX_FRAME + 1).to_bytes(4, "big"),  # announces 16 MiB + 1
    ):
        reader, writer = await asyncio.open_connection(*target.address)
        writer.write(data)
        if writer.can_write_eof():
            writer.write_eof()
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5.0) == b""  # closed without an answer
        writer.close()
    await eventually(
        lambda: target.stats.stream_dropped
        == {
            **stream0,
            DropReason.MALFORMED: stream0[DropReason.MALFORMED] + 1,
            DropReason.FOREIGN_CLUSTER: stream0[DropReason.FOREIGN_CLUSTER] + 1,
            DropReason.TRUNCATED: stream0[DropReason.TRUNCATED] + 1,
            DropReason.OVERSIZED: stream0[DropReason.OVERSIZED] + 1,
        },
        timeout=5.0, what="stream drop counters",
    )

    # Still running: it keeps taking its peers' packets, and nobody changed.
    received = target.stats.packets_received
    await eventually(lambda: target.stats.packets_received >= received + 5, timeout=5.0, what="target still gossiping")
    assert target.stats.core_errors == 0
    for s in cluster:
        assert set(_view(s)) == before[s.name], "membership changed"
        assert all(m.live for m in s.members()), "someone was declared dead or left"
        assert s.member("intruder") is None


async def test_join_keeps_retrying_in_the_background_until_the_seed_appears() -> None:
    port = free_port()
    seed = GossipShell(dataclasses.replace(_config(10), port=port), rng=random.Random(10))
    joiner = GossipShell(_config(11), rng=random.Random(11))
    try:
        await joiner.start()
        t0 = time.monotonic()
        assert await joiner.join([f"127.0.0.30:{port}"], timeout=0.3) is False
        assert 0.3 <= time.monotonic() - t0 < 2.0
        assert joiner.stats.stream_errors >= 1  # connection refused, logged, retried
        await seed.start()
        assert seed.address == ("127.0.0.30", port)
        await eventually(lambda: joiner.joined, timeout=10.0, what="the background join to succeed")
        await eventually(lambda: _all_alive([seed, joiner], 2), timeout=5.0, what="both alive on both")
    finally:
        await joiner.close()
        await seed.close()


async def test_wait_until_and_close_are_safe_to_repeat() -> None:
    shell = GossipShell(_config(12))
    async with shell:
        assert await shell.wait_until(lambda: True, 0.0)
        assert not await shell.wait_until(lambda: False, 0.05)
    await shell.close()
    assert shell.closed


# ---------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1", ("10.0.0.1", 7421)),
        ("10.0.0.1:8000", ("10.0.0.1", 8000)),
        ("node-a.example", ("node-a.example", 7421)),
        ("node-a.example:1", ("node-a.example", 1)),
        ("[fe80::1]:9", ("fe80::1", 9)),
        ("[::1]", ("::1", 7421)),
        ("::1", ("::1", 7421)),
        (("10.0.0.2", 5), ("10.0.0.2", 5)),
    ],
)
def test_parse_seed(text: str | tuple[str, int], expected: tuple[str, int]) -> None:
    assert parse_seed(text) == expected


@pytest.mark.parametrize("text", ["10.0.0.1:x", "10.0.0.1:0", "10.0.0.1:70000", "[::1", "[::1]x", ":7421"])
def test_parse_seed_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_seed(text)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"name": ""}, "name"),
        ({"cluster": "x" * 33}, "cluster name"),
        ({"cluster": "bad name"}, "cluster name"),
        ({"bind": "localhost"}, "bind address"),
        ({"bind": "0.0.0.0"}, "advertise address"),
        ({"advertise": "0.0.0.0"}, "advertise address"),
        ({"port": 70000}, "port"),
        ({"max_datagram": 1000}, "max_datagram"),
        ({"join_backoff": 0.0}, "join_backoff"),
        ({"stream_timeout": 0.0}, "stream_timeout"),
        ({"swim": dataclasses.replace(Config.local(), probe_timeout=1.0)}, "probe_timeout"),
    ],
)
def test_config_validation_says_what_to_fix(change: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        dataclasses.replace(_config(0), **change).validate()  # type: ignore[arg-type]


def test_wildcard_bind_with_advertise_is_fine() -> None:
    cfg = dataclasses.replace(_config(0), bind="0.0.0.0", advertise="10.0.0.5").validate()
    assert cfg.advertise_host == "10.0.0.5"
    assert GossipConfig(name="a").port == 7421
