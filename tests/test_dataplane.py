"""The kernel data plane (`shoal.agent.dataplane`): rule sets rendered from tables, the
shell around `nft`, the proxy handing kernel ports over, and a namespaced cluster whose
agents carry a service in the kernel.

The rendering and the shell's decisions are checked without root (twins for `nft` and
the sysctls). The real-kernel tests skip without root, `ip` or `nft`; they touch only
namespaces they make, never the root namespace's rules or sysctls.
"""

from __future__ import annotations

import os
import pathlib
import random
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from shoal.agent.dataplane import FORWARDING_SYSCTLS, KernelDataPlane, Plan, plan, remote_endpoints, render, run_nft
from shoal.agent.proxy import ProxyConfig, ServiceProxy
from shoal.model import Algorithm
from shoal.v1 import types_pb2
from tests.cluster import whoami_deployment
from tests.helpers import free_port, wait_until

REMOVE = "table ip shoal\ndelete table ip shoal\n"


def table(service: str, ports: Sequence[int | tuple[int, int]], endpoints: Sequence[tuple[str, int]] = (),
          *, algorithm: str = "round_robin", dataplane: str = "kernel", version: int = 1) -> types_pb2.Table:
    """A table; a port given as (port, node_port) has a nodePort."""
    return types_pb2.Table(
        service=service, algorithm=algorithm, version=version, dataplane=dataplane,
        endpoints=[types_pb2.Endpoint(pod=f"{service}-{i}", address=a, port=p, weight=1)
                   for i, (a, p) in enumerate(endpoints)],
        ports=[types_pb2.ServicePort(port=p[0], node_port=p[1], protocol="TCP") if isinstance(p, tuple)
               else types_pb2.ServicePort(port=p, protocol="TCP") for p in ports],
    )


THREE = [("198.18.0.1", 20000), ("198.18.0.2", 20001), ("198.18.0.3", 20002)]


# ----------------------------------------------------------------------------- rendering


def test_round_robin_with_several_ports_and_a_node_port_renders_one_numgen_rule_per_port() -> None:
    p = plan([table("web", [(80, 30080), 81], THREE)])
    assert p.taken == {80, 81, 30080}
    maps = "{ 0 : 198.18.0.1 . 20000, 1 : 198.18.0.2 . 20001, 2 : 198.18.0.3 . 20002 }"
    assert render(p, guard=True) == REMOVE + f"""\
table ip shoal {{
\tchain services {{
\t\ttcp dport 80 dnat ip to numgen inc mod 3 map {maps} comment "service/web port 80"
\t\ttcp dport 81 dnat ip to numgen inc mod 3 map {maps} comment "service/web port 81"
\t\ttcp dport 30080 dnat ip to numgen inc mod 3 map {maps} comment "service/web port 30080"
\t}}
\tchain prerouting {{
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tfib daddr type local jump services
\t}}
\tchain output {{
\t\ttype nat hook output priority -100; policy accept;
\t\tfib daddr type local jump services
\t}}
\tchain postrouting {{
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tct status dnat meta l4proto tcp ct original proto-dst {{ 80, 81, 30080 }} oifname != "lo" masquerade
\t}}
\tchain guard {{
\t\ttype filter hook prerouting priority raw; policy accept;
\t\tiifname != "lo" ip daddr 127.0.0.0/8 drop
\t}}
}}
"""


def test_random_uses_numgen_random_and_a_bound_address_narrows_the_match() -> None:
    text = render(plan([table("db", [5432], THREE[:2], algorithm="random")]), daddr="10.1.2.3")
    assert ("tcp dport 5432 dnat ip to numgen random mod 2 map { 0 : 198.18.0.1 . 20000, 1 : 198.18.0.2 . 20001 }"
            ' comment "service/db port 5432"') in text
    assert text.count("ip daddr 10.1.2.3 jump services") == 2  # prerouting and output
    assert "fib daddr" not in text


def test_a_port_without_endpoints_is_taken_but_gets_no_rule_so_connections_are_refused() -> None:
    p = plan([table("empty", [90]), table("web", [80], THREE[:1])])
    assert p.taken == {80, 90}  # the proxy must not listen on 90 either
    text = render(p)
    assert "dport 90" not in text and "{ 80 }" in text
    assert "chain guard" not in text  # no endpoint on another host, no route_localnet to guard
    assert "tcp dport 80 dnat ip to numgen inc mod 1 map { 0 : 198.18.0.1 . 20000 }" in text


def test_nothing_to_carry_renders_the_removal_alone() -> None:
    assert render(Plan()) == REMOVE
    assert render(plan([table("empty", [90])])) == REMOVE
    assert render(plan([table("web", [80], THREE, dataplane="proxy")])) == REMOVE
    assert render(Plan(), table="other") == "table ip other\ndelete table ip other\n"


def test_ports_go_first_come_first_served_like_the_proxy() -> None:
    p = plan([
        table("a", [80], THREE, dataplane="proxy"),
        table("b", [80, 81], THREE),  # loses 80 to a (the proxy carries a), keeps 81
        table("c", [81, (82, 30082)], THREE),  # loses 81 to b
    ])
    assert [(kp.service, kp.port) for kp in p.ports] == [("b", 81), ("c", 82), ("c", 30082)]
    assert p.conflicts == (("b", 80, "a"), ("c", 81, "b"))
    assert p.services == ("b", "c")


@pytest.mark.parametrize(
    ("t", "why"),
    [
        (table("w", [80], THREE, algorithm="least_conn"), "nftables cannot balance with least_conn"),
        (table("w", [80], THREE, algorithm="bogus"), "unknown algorithm 'bogus'"),
        (table("w", [80], [("node-1.example", 20000)]), "not an IPv4 address"),
    ],
)
def test_what_the_kernel_cannot_carry_is_left_to_the_proxy(t: types_pb2.Table, why: str) -> None:
    p = plan([t])
    assert p.ports == () and len(p.fallback) == 1
    assert p.fallback[0][0] == "w" and why in p.fallback[0][1]


@pytest.mark.parametrize(
    ("endpoints", "local", "remote"),
    [
        ([("198.18.0.1", 1)], {"198.18.0.1"}, False),
        ([("127.0.0.1", 1)], set(), False),
        ([("198.18.0.1", 1), ("198.18.0.2", 2)], {"198.18.0.1"}, True),
        ([], set(), False),
    ],
)
def test_remote_endpoints(endpoints: list[tuple[str, int]], local: set[str], remote: bool) -> None:
    assert remote_endpoints(plan([table("w", [80], endpoints)]), local) is remote


def test_the_algorithm_is_carried_per_port() -> None:
    (kp,) = plan([table("w", [80], THREE, algorithm="random")]).ports
    assert (kp.algorithm, kp.endpoints) == (Algorithm.RANDOM, tuple(THREE))


# ----------------------------------------------------------------------------- the shell, with twins


class FakeNft:
    """`nft -f -`'s twin: records every script; `fail` makes the next ones fail."""

    def __init__(self, tables: Sequence[str] = ("filter",)) -> None:
        self.scripts: list[str] = []
        self.fail = ""
        self.forward_policy = "accept"
        self.tables = list(tables)

    async def __call__(self, script: str) -> tuple[bool, str]:
        self.scripts.append(script)
        if self.fail:
            return False, self.fail
        if script == "list tables ip\n":
            return True, "".join(f"table ip {t}\n" for t in self.tables)
        if script.startswith("list chain ip filter FORWARD"):
            return True, ("table ip filter {\n\tchain FORWARD {\n"
                          f"\t\ttype filter hook forward priority filter; policy {self.forward_policy};\n\t}}\n}}\n")
        return True, ""

    @property
    def rule_sets(self) -> list[str]:
        return [s for s in self.scripts if not s.startswith("list")]


async def test_start_writes_nothing_without_a_leftover() -> None:
    nft = FakeNft()
    plane, _ = make_plane(nft)
    await plane.start()
    assert plane.usable and nft.scripts == ["list tables ip\n"]
    assert await plane.update([]) == frozenset()
    await plane.close()
    assert nft.rule_sets == []


async def test_without_permission_nftables_is_unusable_and_nothing_is_said_until_a_kernel_service() -> None:
    nft = FakeNft()
    nft.fail = "netlink: Error: cache initialization failed: Operation not permitted"
    plane, events = make_plane(nft)
    await plane.start()
    assert plane.usable is False and plane.unusable_reason == nft.fail
    assert await plane.update([table("web", [80], THREE, dataplane="proxy")]) == frozenset()
    assert events == []
    assert await plane.update([table("web", [80], THREE)]) == frozenset()
    assert events == [("Warning", "DataPlaneFallback", "service/web",
                       f"nftables is not usable on this host ({nft.fail}): the proxy carries this service")]


class FakeSysctl:
    def __init__(self, **values: str) -> None:
        self.values = {name: "0" for name in FORWARDING_SYSCTLS} | values
        self.read_only = False

    def read(self, name: str) -> str:
        return self.values[name]

    def write(self, name: str, value: str) -> None:
        if self.read_only:
            raise PermissionError(13, "Permission denied")
        self.values[name] = value


def make_plane(nft: FakeNft, sysctl: FakeSysctl | None = None, local: Sequence[str] = ("198.18.0.1",)
               ) -> tuple[KernelDataPlane, list[tuple[str, str, str, str]]]:
    events: list[tuple[str, str, str, str]] = []
    plane = KernelDataPlane(runner=nft, sysctl=sysctl or FakeSysctl(), local_addresses=lambda: local,
                            on_event=lambda *e: events.append(e))
    return plane, events


async def test_start_removes_a_leftover_and_updates_apply_only_what_changed() -> None:
    nft = FakeNft(tables=("filter", "shoal"))
    plane, events = make_plane(nft)
    await plane.start()
    assert plane.usable and nft.rule_sets == [REMOVE]  # what a crashed agent left goes first

    tables = [table("web", [80], THREE, version=1)]
    assert await plane.update(tables) == {80}
    assert nft.rule_sets[-1] == render(plan(tables), guard=True)  # two endpoints are on other hosts
    assert events == [("Normal", "KernelDataPlane", "service/web", "kernel data plane (nftables) carries port(s) 80")]
    applied = len(nft.rule_sets)

    # A new version with the same endpoints: nothing to apply (round robin keeps counting).
    assert await plane.update([table("web", [80], THREE, version=2)]) == {80}
    assert len(nft.rule_sets) == applied and len(events) == 1

    assert await plane.update([table("web", [80], THREE[:2], version=3)]) == {80}
    assert "mod 2" in nft.rule_sets[-1] and len(events) == 1  # said once, not per change

    assert await plane.update([]) == frozenset()  # the service went away: the table goes
    assert nft.rule_sets[-1] == REMOVE
    await plane.close()
    assert nft.rule_sets[-1] == REMOVE and len(nft.rule_sets) == applied + 2  # already gone: not again


async def test_close_removes_the_table() -> None:
    nft = FakeNft()
    plane, _ = make_plane(nft)
    await plane.start()
    await plane.update([table("web", [80], THREE)])
    await plane.close()
    assert nft.rule_sets[-1] == REMOVE
    assert plane.taken == frozenset()


async def test_unusable_nftables_is_one_warning_per_service_and_the_proxy_takes_over() -> None:
    nft = FakeNft()
    nft.fail = "nft: No such file or directory"
    plane, events = make_plane(nft)
    await plane.start()
    assert plane.usable is False
    assert await plane.update([]) == frozenset()
    assert events == []  # no kernel service, nothing to say
    tables = [table("web", [80], THREE), table("db", [5432], THREE, algorithm="random"),
              table("plain", [8080], THREE, dataplane="proxy")]
    for version in (1, 2):
        assert await plane.update(tables) == frozenset()
    assert sorted(events) == [
        ("Warning", "DataPlaneFallback", f"service/{s}",
         "nftables is not usable on this host (nft: No such file or directory): the proxy carries this service")
        for s in ("db", "web")
    ]
    assert nft.scripts == ["list tables ip\n"]  # the probe; nothing is tried against a missing nft


async def test_a_refused_rule_set_falls_back_and_removes_the_old_rules() -> None:
    nft = FakeNft()
    plane, events = make_plane(nft)
    await plane.start()
    assert await plane.update([table("web", [80], THREE)]) == {80}
    nft.fail = "Error: Could not process rule: No such file or directory"
    assert await plane.update([table("web", [80], THREE[:2])]) == frozenset()
    assert nft.scripts[-1] == REMOVE
    assert events[-1][:3] == ("Warning", "DataPlaneFallback", "service/web")
    assert "nftables refused the rules (Error: Could not process rule" in events[-1][3]
    nft.fail = ""
    assert await plane.update([table("web", [80], THREE[:2])]) == {80}  # tried again on the next change
    assert events[-1][:2] == ("Normal", "KernelDataPlane")


async def test_endpoints_on_other_hosts_turn_forwarding_on_and_it_is_put_back() -> None:
    nft = FakeNft()
    sysctl = FakeSysctl(**{"net/ipv4/ip_forward": "1"})
    plane, events = make_plane(nft, sysctl)
    await plane.start()
    await plane.update([table("local", [80], THREE[:1])])  # 198.18.0.1 is this host
    assert sysctl.values == {"net/ipv4/ip_forward": "1", "net/ipv4/conf/all/route_localnet": "0"}
    await plane.update([table("local", [80], THREE)])
    assert sysctl.values == {"net/ipv4/ip_forward": "1", "net/ipv4/conf/all/route_localnet": "1"}
    await plane.update([])
    # Put back as found: ip_forward was on before (not ours to turn off), route_localnet was not.
    assert sysctl.values == {"net/ipv4/ip_forward": "1", "net/ipv4/conf/all/route_localnet": "0"}
    await plane.update([table("local", [80], THREE)])
    await plane.close()
    assert sysctl.values == {"net/ipv4/ip_forward": "1", "net/ipv4/conf/all/route_localnet": "0"}
    assert all(e[0] == "Normal" for e in events), events


async def test_sysctls_that_cannot_be_set_fall_back_to_the_proxy() -> None:
    nft = FakeNft()
    sysctl = FakeSysctl()
    sysctl.read_only = True
    plane, events = make_plane(nft, sysctl)
    await plane.start()
    assert await plane.update([table("web", [80], THREE)]) == frozenset()
    assert events == [("Warning", "DataPlaneFallback", "service/web",
                       "cannot set net.ipv4.ip_forward=1 for endpoints on other hosts (Permission denied): "
                       "the proxy carries this service")]
    assert nft.rule_sets == []


async def test_a_forward_policy_of_drop_is_reported_once() -> None:
    nft = FakeNft()
    nft.forward_policy = "drop"
    plane, events = make_plane(nft, FakeSysctl(**{name: "1" for name in FORWARDING_SYSCTLS}))
    await plane.start()
    await plane.update([table("web", [80], THREE)])
    await plane.update([table("web", [80], THREE[1:])])
    dropped = [e for e in events if e[1] == "ForwardDropped"]
    assert len(dropped) == 1 and dropped[0][0] == "Warning" and "DOCKER-USER" in dropped[0][3]


async def test_port_conflicts_and_unsupported_tables_are_told() -> None:
    plane, events = make_plane(FakeNft())
    await plane.start()
    taken = await plane.update([table("a", [80], THREE, dataplane="proxy"), table("b", [80, 81], THREE),
                                table("c", [90], THREE, algorithm="weighted")])
    assert taken == {81}
    assert ("Warning", "PortInUse", "service/b", "port 80 is already used by service a") in events
    assert any(e[:3] == ("Warning", "DataPlaneFallback", "service/c") and "weighted" in e[3] for e in events)


# ----------------------------------------------------------------------------- the proxy hands over


async def test_the_proxy_leaves_kernel_ports_to_the_kernel_and_takes_them_back_on_fallback() -> None:
    nft = FakeNft()
    plane, events = make_plane(nft, local=("127.0.0.1",))
    await plane.start()
    proxy = ServiceProxy(ProxyConfig(bind_host="127.0.0.1"), rng=random.Random(1),
                         on_event=lambda *e: events.append(e), dataplane=plane)
    kernel_port, proxy_port = free_port(), free_port()
    try:
        await proxy.update([table("k", [kernel_port], [("127.0.0.1", 1)]),
                            table("p", [proxy_port], [("127.0.0.1", 1)], dataplane="proxy")])
        assert sorted(proxy.routes) == [proxy_port]  # the kernel carries the other one
        nft.fail = "Error: Operation not permitted"
        await proxy.update([table("k", [kernel_port], [("127.0.0.1", 2)], version=2),
                            table("p", [proxy_port], [("127.0.0.1", 1)], dataplane="proxy")])
        assert sorted(proxy.routes) == sorted([kernel_port, proxy_port])
        assert any(e[:3] == ("Warning", "DataPlaneFallback", "service/k") for e in events)
    finally:
        await proxy.close()
        await plane.close()


# ----------------------------------------------------------------------------- the real kernel


def _can_netns() -> str:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return ""


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace of this test's own (removed afterwards, whatever happened)."""
    if why := _can_netns():
        pytest.skip(why)
    name = f"shdp{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _tables_in(netns: str) -> str:
    return subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "tables"], capture_output=True,
                          text=True, check=True).stdout


async def test_the_kernel_accepts_the_rule_sets_and_close_leaves_nothing(netns: str) -> None:
    async def runner(script: str) -> tuple[bool, str]:
        return await run_nft(script, argv=("ip", "netns", "exec", netns, "nft"))

    # A leftover, as a crashed agent leaves it.
    left = render(plan([table("old", [70], THREE)]))
    assert await runner(left) == (True, "")
    assert "table ip shoal" in _tables_in(netns)

    events: list[tuple[str, ...]] = []
    plane = KernelDataPlane(runner=runner, sysctl=FakeSysctl(**{n: "1" for n in FORWARDING_SYSCTLS}),
                            local_addresses=lambda: ("198.18.0.1",), on_event=lambda *e: events.append(e))
    await plane.start()
    assert "table ip shoal" not in _tables_in(netns)
    assert await plane.update([table("web", [(80, 30080)], THREE), table("db", [5432], THREE[:2], algorithm="random"),
                               table("empty", [90])]) == {80, 90, 5432, 30080}
    listed = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "table", "ip", "shoal"],
                            capture_output=True, text=True, check=True).stdout
    assert "numgen inc mod 3" in listed and "numgen random mod 2" in listed and "dport 90" not in listed
    assert "chain guard" in listed  # endpoints on other hosts: 127.0.0.0/8 from the wire is dropped
    assert not [e for e in events if e[0] == "Warning"], events
    await plane.close()
    assert "table ip shoal" not in _tables_in(netns)


# ----------------------------------------------------------------------------- a namespaced cluster

SERVICE_PORT = 8000
NODE_PORT = 30080


def _manifest(whoami: pathlib.Path) -> str:
    return whoami_deployment(whoami, "who", 3, placement="spread")


SERVICE = f"""\
apiVersion: v1
kind: Service
metadata:
  name: who
  annotations:
    shoal.io/balance: round_robin
    shoal.io/dataplane: kernel
spec:
  type: NodePort
  selector: {{app: who}}
  ports:
  - port: {SERVICE_PORT}
    targetPort: 8080
    nodePort: {NODE_PORT}
"""


def _shoal_table(c: Any, host: str) -> str:
    """`nft list table ip shoal` in `host`'s namespace; "" when there is none."""
    p = c.exec(host, "nft", "list", "table", "ip", "shoal", timeout=10)
    return p.stdout if p.returncode == 0 else ""


def _wait(c: Any, fn: Any, timeout: float, what: str) -> Any:
    """`wait_until`, with the agents' last log lines when it times out."""
    try:
        return wait_until(fn, timeout, interval=0.2, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{c.diagnose(40)}") from None


def _round_robin(answers: list[str], names: set[str]) -> None:
    """Every replica in turn: a fixed cycle through all of them."""
    n = len(names)
    assert set(answers) == names, answers
    assert all(answers[i] == answers[i + n] for i in range(len(answers) - n)), answers


def _refused(c: Any, host: str, address: str, port: int) -> bool:
    try:
        c.connect(host, address, port, timeout=1.0).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.netns
@pytest.mark.e2e
def test_kernel_dataplane_in_a_cluster(netns_cluster_factory: Any) -> None:
    """Three hosts carry a service in the kernel: round robin from other hosts and from
    the host itself (its address and 127.0.0.1), to replicas on every host; no rule is
    left after the service is deleted, after a kill -9 and a restart, or after a stop."""
    from tests.netns import NetnsError, whoami_binary

    try:
        whoami = whoami_binary()
    except NetnsError as exc:
        pytest.skip(f"cannot build build/bin/whoami: {exc}")
    c = netns_cluster_factory(3)
    h1, h2, h3 = c.hosts
    r = c.cli("apply", "-f", "-", input=_manifest(whoami) + "---\n" + SERVICE)
    assert r.code == 0, r.err
    pods = wait_until(lambda: (ps := c.get_json("pods")) and len(ps) == 3 and all(p.get("ready") for p in ps) and ps,
                      30, interval=0.3, what="3 ready pods")
    assert sorted(p["node"] for p in pods) == ["h1", "h2", "h3"]
    names = {p["name"] for p in pods}
    for h in c.hosts:
        _wait(c, lambda h=h: "numgen inc mod 3" in _shoal_table(c, h), 20, f"{h}'s kernel rules for 3 endpoints")
    # The proxy leaves the port alone: nothing of the agent's listens there.
    assert f":{SERVICE_PORT} " not in c.exec(h1, "ss", "-Htln").stdout

    # From another host, to the service port and to the nodePort.
    _round_robin([c.http_get(h2, h1.address, SERVICE_PORT).strip() for _ in range(9)], names)
    _round_robin([c.http_get(h1, h3.address, NODE_PORT).strip() for _ in range(6)], names)
    # From the host itself: its own address and loopback share the port's one counter.
    _round_robin([c.http_get(h1, address, SERVICE_PORT).strip()
                  for _ in range(6) for address in (h1.address, "127.0.0.1")], names)

    # kill -9: the rules stay and keep serving (the kernel does not need the agent)...
    c.kill9(h2)
    assert "numgen inc mod 3" in _shoal_table(c, h2)
    assert c.http_get(h3, h2.address, SERVICE_PORT).strip() in names
    # ...the service goes while h2's agent is down: the live agents drop their rules...
    r = c.cli("delete", "service", "who")
    assert r.code == 0, r.err
    for h in (h1, h3):
        _wait(c, lambda h=h: _shoal_table(c, h) == "", 15, f"{h}'s rules to go")
    assert _refused(c, h2.address, h1.address, SERVICE_PORT)
    assert _shoal_table(c, h2)  # a crashed agent's leftover
    # ...and the restarted agent removes its leftover.
    c.restart(h2, timeout=20)
    _wait(c, lambda: _shoal_table(c, h2) == "", 10, "h2's leftover to go")
    assert _refused(c, h3.address, h2.address, SERVICE_PORT)

    # A graceful stop removes the rules too.
    r = c.cli("apply", "-f", "-", input=SERVICE)
    assert r.code == 0, r.err
    _wait(c, lambda: "numgen inc mod" in _shoal_table(c, h3), 20, "h3's rules again")
    # (h2's replica may have been replaced while its agent was down: ask for the names again.)
    assert c.http_get(h2, h3.address, SERVICE_PORT).strip() in {p["name"] for p in c.get_json("pods")}
    assert h3.proc is not None
    os.killpg(h3.proc.pid, signal.SIGTERM)
    h3.proc.wait(timeout=20)
    assert _shoal_table(c, h3) == ""
    assert h3.proc.returncode == 0, c.log(h3, 30)
