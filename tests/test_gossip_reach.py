"""Reachability checks in the gossip shell, on loopback with real sockets and processes.

- `reach_outcome` is the one mapping of connect errors to `Reach`; every case is listed.
- `reach` against a listening socket (accepted), a closed port (refused) and a listener
  whose accept queue is full (the SYN is dropped: no answer).
- Members in one event loop plus one member in a process of its own: stopping that
  process (SIGSTOP) for longer than the silence tolerance raises no suspicion, because its
  kernel still accepts the probers' checks; killing it (SIGKILL) leaves its port closed,
  the probers' checks are refused, and it is declared dead well before silence alone
  could have done it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import pytest

from shoal.agent.gossip import _REACH_BY_ERROR, GossipConfig, GossipShell, reach, reach_outcome
from shoal.agent.swim import Config, EventKind, MemberEvent, Reach, State
from shoal.agent.swim.config import silence_tolerance
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(60)

CLUSTER = "reach"
# local() timings, with a wider window for the check's answer (a busy test machine) and
# a silence threshold far above what a refusal takes: a member dead within SILENCE must
# have been found by the refused path.
SWIM = dataclasses.replace(
    Config.local(), probe_interval=0.3, probe_timeout=0.1, suspicion_mult=10.0, suspicion_max_timeout_mult=2.0
)
SILENCE = silence_tolerance(SWIM, 4)  # 3.3 s
PAUSE = 2.0 * silence_tolerance(Config.local(), 4)  # twice what local() alone would tolerate

MEMBER = r"""
import asyncio, dataclasses, random, sys
from shoal.agent.gossip import GossipConfig, GossipShell
from shoal.agent.swim import Config

async def main() -> None:
    swim = dataclasses.replace(Config.local(), suspicion_mult=15.0, suspicion_max_timeout_mult=2.0)
    shell = GossipShell(GossipConfig(name="outsider", cluster=sys.argv[1], bind=sys.argv[2], port=0, swim=swim),
                        rng=random.Random(7))
    await shell.start()
    await shell.join([sys.argv[3]], timeout=10.0)
    print(shell.address[1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (None, Reach.ACCEPTED),
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), Reach.REFUSED),
        (TimeoutError(), Reach.NO_ANSWER),
        (OSError(errno.EHOSTUNREACH, "no route to host"), Reach.NO_ANSWER),
        (OSError(errno.ENETUNREACH, "network is unreachable"), Reach.NO_ANSWER),
        (ConnectionResetError(errno.ECONNRESET, "reset"), Reach.NO_ANSWER),
        (OSError(errno.EADDRNOTAVAIL, "cannot assign requested address"), Reach.NO_ANSWER),
    ],
)
def test_connect_errors_map_to_outcomes(exc: BaseException | None, outcome: Reach) -> None:
    assert reach_outcome(exc) is outcome


def test_the_mapping_covers_every_listed_error_and_nothing_else() -> None:
    for cls in _REACH_BY_ERROR:
        assert reach_outcome(cls()) is _REACH_BY_ERROR[cls]
    with pytest.raises(TypeError):
        reach_outcome(ValueError("not from a socket"))


async def test_reach_on_real_sockets() -> None:
    with socket.socket() as listening, socket.socket() as full, socket.socket() as filler, socket.socket() as gone:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        gone.bind(("127.0.0.1", 0))  # bound, never listening: the kernel answers RST
        full.bind(("127.0.0.1", 0))
        full.listen(0)  # room for one pending connection, which `filler` takes
        filler.connect(full.getsockname())
        assert await reach(listening.getsockname(), 1.0) is Reach.ACCEPTED
        assert await reach(gone.getsockname(), 1.0) is Reach.REFUSED
        assert await reach(gone.getsockname(), 1.0, ("127.0.0.1", 0)) is Reach.REFUSED
        t0 = time.monotonic()
        assert await reach(full.getsockname(), 0.2) is Reach.NO_ANSWER  # the SYN is dropped
        assert 0.15 < time.monotonic() - t0 < 1.0


def _config(i: int) -> GossipConfig:
    return GossipConfig(name=f"node-{i}", cluster=CLUSTER, bind=f"127.0.0.{40 + i}", port=0, swim=SWIM,
                        join_backoff=0.1)


@pytest.fixture
async def members() -> AsyncIterator[list[GossipShell]]:
    shells = [GossipShell(_config(i), rng=random.Random(i)) for i in range(3)]
    try:
        for s in shells:
            await s.start()
        assert await asyncio.gather(*(s.join([shells[0].address], timeout=5.0) for s in shells[1:])) == [True] * 2
        yield shells
    finally:
        for s in shells:
            await s.close()


async def test_stopped_process_stays_unsuspected_and_killed_process_is_found_by_refusal(
    members: list[GossipShell],
) -> None:
    seed = f"{members[0].address[0]}:{members[0].address[1]}"
    proc = subprocess.Popen(
        [sys.executable, "-c", MEMBER, CLUSTER, "127.0.0.49", seed],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        events: list[MemberEvent] = []
        for s in members:
            s.add_callback(lambda ev: events.append(ev) if ev.member.name == "outsider" else None)
        await eventually(
            lambda: all((m := s.member("outsider")) is not None and m.state is State.ALIVE for s in members),
            timeout=20.0, what="the outsider alive on every member",
        )
        accepted = sum(s.stats.checks[Reach.ACCEPTED] for s in members)
        events.clear()

        # Stopped: its kernel still completes the probers' handshakes.
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(PAUSE)  # the scenario: a stopped process
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        await asyncio.sleep(0.5)  # its backlog of pings is answered
        assert [ev.kind for ev in events] == [], events
        assert sum(s.stats.checks[Reach.ACCEPTED] for s in members) > accepted

        # Killed: nothing listens on its port any more, and the probers are told so.
        proc.kill()
        proc.wait(timeout=5)
        t0 = time.monotonic()
        await eventually(
            lambda: all(s.member("outsider").state is State.DEAD for s in members),  # type: ignore[union-attr]
            timeout=3 * SILENCE, interval=0.02, what="the outsider dead on every member",
        )
        took = time.monotonic() - t0
        assert sum(s.stats.checks[Reach.REFUSED] for s in members) > 0
        assert took < SILENCE, f"dead everywhere after {took:.2f} s: not faster than silence ({SILENCE:.1f} s)"
        print(f"killed member dead everywhere in {took:.2f} s (silence alone: >= {SILENCE:.1f} s)")
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()
