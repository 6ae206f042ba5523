"""The multi-host test cluster itself (tests/netns.py), on three namespaced hosts.

One cluster is shared by the module: h1 is the server, h2 and h3 join it; each runs a
real `shoal agent` with the process driver. The tests run in file order and the last
one tears the cluster down and checks that nothing is left. Every wait has a deadline;
the file runs in well under 90 s.
"""

from __future__ import annotations


import pathlib
import socket
import time
from typing import Any

import pytest

from tests.cluster import json_items, service_manifest, whoami_deployment
from tests.helpers import wait_until
from tests.netns import GRPC_PORT, NetnsCluster, NetnsError, leftovers, process_exists, whoami_binary

pytestmark = [pytest.mark.netns, pytest.mark.e2e]

SERVICE_PORT = 8000


@pytest.fixture(scope="module")
def whoami() -> pathlib.Path:
    try:
        return whoami_binary()
    except NetnsError as exc:
        pytest.skip(f"cannot build build/bin/whoami: {exc}")


def manifest(whoami: pathlib.Path) -> str:
    return (whoami_deployment(whoami, "who", 3, placement="spread") + "---\n"
            + service_manifest("who", SERVICE_PORT, balance="round_robin"))


def test_every_agent_registers_with_its_address(netns_cluster: NetnsCluster) -> None:
    c = netns_cluster
    nodes = {n["name"]: n for n in c.get_json("nodes")}
    assert sorted(nodes) == ["h1", "h2", "h3"], c.diagnose()
    for h in c.hosts:
        n = nodes[h.name]
        assert (n["status"], n["address"], n["role"]) == ("Ready", h.address, "server" if h.server else "client")
    table = c.cli("get", "nodes")
    assert table.code == 0, table.err
    for h in c.hosts:
        assert any(line.split()[:2] == [h.name, "Ready"] and h.address in line for line in table.out.splitlines()), table.out


def test_spread_replicas_served_from_every_host(netns_cluster: NetnsCluster, whoami: pathlib.Path) -> None:
    c = netns_cluster
    r = c.cli("apply", "-f", "-", input=manifest(whoami))
    assert r.code == 0, r.err

    def three_ready() -> list[dict[str, Any]]:
        pods = c.get_json("pods")
        return pods if len(pods) == 3 and all(p.get("ready") for p in pods) else []

    pods = wait_until(three_ready, 30, interval=0.3, what="3 ready pods")
    assert sorted(p["node"] for p in pods) == ["h1", "h2", "h3"], pods  # spread: one per host
    for p in pods:
        assert p["host_ip"] == c.host(p["node"]).address, p
    names = {p["name"] for p in pods}

    def endpoints() -> set[str]:
        tables = [t for t in c.get_json("endpoints") if t["service"] == "who"]
        return {e["address"] for t in tables for e in t.get("endpoints", [])}

    wait_until(lambda: endpoints() == {h.address for h in c.hosts}, 20, interval=0.3, what="one endpoint per host")

    # The routing mesh: every host's address answers on the service port, from another
    # host, and its proxy reaches the replicas on all three hosts.
    for i, target in enumerate(c.hosts):
        client = c.hosts[(i + 1) % len(c.hosts)]
        seen: set[str] = set()

        def all_replicas_answer() -> bool:
            seen.add(c.http_get(client, target.address, SERVICE_PORT).strip())
            return seen == names

        wait_until(all_replicas_answer, 10, interval=0.0,
                   what=f"{client}→{target.address}:{SERVICE_PORT} to answer from {sorted(names)} (seen {seen})")


def test_any_host_answers_the_cli_and_logs_come_from_the_pods_host(netns_cluster: NetnsCluster) -> None:
    """A client agent relays the API to a server and serves its own pods' logs; a
    server relays a pod's logs from the host that runs it."""
    c = netns_cluster
    pods = {p["node"]: p["name"] for p in c.get_json("pods")}
    assert "h2" in pods, "the spread test left a replica on h2"
    h2 = c.host("h2")
    local = f"{h2.address}:{GRPC_PORT}"
    via_client = json_items(c.cli("get", "pods", "-o", "json", "--addr", local, host="h2"), "get pods via h2")
    assert {p["name"] for p in via_client} == set(pods.values())
    members = c.cli("members", "--addr", local, host="h2")
    assert members.code == 0 and all(h.name in members.out for h in c.hosts), members.out
    from_server = c.cli("logs", pods["h2"])
    from_host = c.cli("logs", pods["h2"], "--addr", local, host="h2")
    assert from_server.code == 0, from_server.err
    assert from_host.code == 0, from_host.err
    assert from_server.out == from_host.out
    missing = c.cli("logs", "nosuch-pod")
    assert missing.code == 1 and "not found" in missing.err


def _agent_state(c: NetnsCluster, host: str) -> str:
    proc = c.host(host).proc
    assert proc is not None
    return pathlib.Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_stop_cont_kill9_restart(netns_cluster: NetnsCluster) -> None:
    c = netns_cluster
    c.stop("h3")
    assert _agent_state(c, "h3") == "T"
    c.cont("h3")
    assert _agent_state(c, "h3") != "T"

    agent_pid = c["h3"].proc.pid if c["h3"].proc else 0
    replicas_before = {pid: start for pid, start in c.processes().items() if pid != agent_pid}
    c.kill9("h3")
    assert c["h3"].proc is not None and c["h3"].proc.returncode == -9
    assert not c["h3"].alive()
    # kill -9 takes the agent only: what it ran keeps running, as on a real host.
    assert all(process_exists(pid, start) for pid, start in replicas_before.items())
    # The server's store now applies a cancelled commit (see leader/store.py), so the
    # disconnect is recorded; gossip independently declares the member dead.
    wait_until(lambda: _members(c).get("h3", {}).get("state") == "dead", 20, what="gossip to declare h3 dead")
    before = int(_members(c)["h3"].get("incarnation", 0))

    started = time.time()
    c.restart("h3", timeout=20)  # returns once the server has seen the new agent connect
    assert c.ready_nodes(since=started - 0.01)["h3"] == c["h3"].address
    wait_until(lambda: _members(c)["h3"]["state"] == "alive", 20, what="h3 alive again")
    assert int(_members(c)["h3"].get("incarnation", 0)) > before
    assert "MemberDead" in c.cli("events").out


def _members(c: NetnsCluster) -> dict[str, dict[str, object]]:
    return {str(m["name"]): m for m in json_items(c.cli("members", "-o", "json"), "members")}


def test_gossip_members_see_every_agent(netns_cluster: NetnsCluster) -> None:
    c = netns_cluster
    def all_alive() -> dict[str, dict[str, object]] | None:
        m = _members(c)
        return m if len(m) == 3 and all(v["state"] == "alive" for v in m.values()) else None

    members = wait_until(all_alive, 20, what="3 alive members")
    assert members["h1"]["role"] == "server" and members["h2"]["role"] == "client"
    assert str(members["h2"]["address"]).startswith(c["h2"].address + ":")


def _tcp_listener(c: NetnsCluster, host: str) -> tuple[socket.socket, int]:
    s = c.socket(host)
    s.bind((c.host(host).address, 0))
    s.listen()
    return s, int(s.getsockname()[1])


def test_partition_one_way_heal_and_loss(netns_cluster: NetnsCluster) -> None:
    c = netns_cluster
    h1, h2, h3 = c.hosts
    listener, port = _tcp_listener(c, "h2")
    with listener:
        assert c.can_connect(h2, h1.address, GRPC_PORT)
        assert c.can_connect(h1, h2.address, port)

        c.partition([h2], [h1])
        assert not c.can_connect(h2, h1.address, GRPC_PORT, timeout=0.5)
        assert not c.can_connect(h1, h2.address, port, timeout=0.5)
        assert c.can_connect(h3, h1.address, GRPC_PORT)  # bystanders still reach both sides
        assert c.can_connect(h3, h2.address, port)
        c.heal()
        assert c.can_connect(h2, h1.address, GRPC_PORT)
        assert c.can_connect(h1, h2.address, port)

        # One way: what h2 sends to h1 is lost, what h1 sends to h2 arrives.
        c.one_way(h2, h1)
        assert c.udp_delivery(h2, h1, 20, wait=0.2) == 0
        assert c.udp_delivery(h1, h2, 20) == 20
        c.heal()
        assert c.udp_delivery(h2, h1, 20) == 20

        c.loss(h2, 100)
        assert not c.can_connect(h2, h1.address, GRPC_PORT, timeout=0.5)
        assert c.udp_delivery(h3, h2, 20, wait=0.2) == 0
        c.loss(h2, 0)
        assert c.can_connect(h2, h1.address, GRPC_PORT)
        assert c.udp_delivery(h3, h2, 20) == 20

        # Random loss is random: 50 % on h2's input drops about half, and only there.
        c.loss(h2, 50, direction="in")
        got = c.udp_delivery(h1, h2, 400, wait=0.2)
        assert 120 <= got <= 280, got  # mean 200, sd 10: 8 sd either way
        assert c.udp_delivery(h2, h1, 100) == 100
        c.loss(h2, 0)


def test_teardown_leaves_nothing_behind(netns_cluster: NetnsCluster) -> None:
    """Last in the file: tears the shared cluster down. An agent killed with kill -9
    first, so its replica is an orphan: teardown must find and reap it too."""
    c = netns_cluster
    c.kill9("h2")
    before = c.processes()
    assert len(before) >= 2, c.diagnose()  # two agents at least, replicas too after the deployment test
    prefix, inodes = c.prefix, set(c.inodes)
    c.close()
    assert leftovers(prefix, inodes) == []
    survivors = [pid for pid, start in before.items() if process_exists(pid, start)]
    assert survivors == [], f"processes (or zombies) left: {survivors}"
