"""Three `shoal agent --server --bootstrap-expect 3` processes on loopback form one Raft
cluster through gossip, answer the API on any server, and survive losing the leader.

Driven through the CLI as an operator would: `shoal get servers`, `shoal apply` to a
follower (forwarded to the leader), `kill -9` of the leader, a fourth server that joins
by itself and is removed with `shoal server remove`, and a graceful stop of the leader
that hands leadership over.
"""

from __future__ import annotations

import pathlib
import signal
import time
from collections.abc import Iterator

import pytest

from tests.cluster import DevAgent, json_items
from tests.helpers import free_port, wait_until

pytestmark = pytest.mark.timeout(240)

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
spec:
  replicas: 0
  selector:
    matchLabels: {{app: {name}}}
  template:
    metadata:
      labels: {{app: {name}}}
    spec:
      containers:
        - name: app
          image: shoal-test/whoami:latest
"""


def server(root: pathlib.Path, name: str, seed_gossip: int, *, expect: int | None = 3) -> DevAgent:
    mode = ["--server", "--join", f"127.0.0.1:{seed_gossip}", "--driver", "process"]
    if expect is not None:
        mode += ["--bootstrap-expect", str(expect)]
    return DevAgent(data_dir=root / name, node=name, mode=tuple(mode))


class Servers:
    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self.seed = free_port()
        self.agents: dict[str, DevAgent] = {}

    def add(self, name: str, *, expect: int | None = 3, first: bool = False) -> DevAgent:
        a = server(self.root, name, self.seed, expect=expect)
        if first:
            a.gossip_port = self.seed
        self.agents[name] = a
        return a

    def servers(self, via: DevAgent) -> list[dict]:
        return json_items(via.cli("get", "servers", "-o", "json"), "get servers")

    def leader(self, via: DevAgent, timeout: float = 15.0) -> str:
        """The name of the server every live server agrees is leading."""
        found: list[str] = []

        def agreed() -> bool:
            r = via.cli("get", "servers", "-o", "json")
            if r.code != 0:
                return False
            rows = json_items(r, "get servers")
            leads = [s["name"] for s in rows if s.get("role") == "leader"]
            if len(leads) != 1:
                return False
            found[:] = leads
            return True

        wait_until(agreed, timeout, interval=0.2, what="one leader")
        return found[0]

    def stop_all(self) -> None:
        for a in self.agents.values():
            if a.proc is not None and a.proc.poll() is None:
                a.signal(signal.SIGCONT)
            a.stop()


@pytest.fixture
def cluster(tmp_path: pathlib.Path) -> Iterator[Servers]:
    c = Servers(tmp_path)
    for i, name in enumerate(("s1", "s2", "s3")):
        c.add(name, first=i == 0).start(wait=False)
    try:
        for a in c.agents.values():
            a.wait_serving(30.0)
        yield c
    finally:
        c.stop_all()


def test_three_servers_form_one_cluster_and_any_of_them_answers(cluster: Servers) -> None:
    s1, s2, s3 = (cluster.agents[n] for n in ("s1", "s2", "s3"))
    lead = cluster.leader(s1)
    rows = cluster.servers(s2)
    assert sorted(r["name"] for r in rows) == ["s1", "s2", "s3"]
    assert {r["suffrage"] for r in rows} == {"voter"}
    assert len({r["term"] for r in rows}) == 1, "every server is in the leader's term"
    assert len({int(r["id"]) for r in rows}) == 3

    # A write sent to a follower is forwarded to the leader; a read from another
    # follower sees it (reads go through a read barrier).
    followers = [a for n, a in cluster.agents.items() if n != lead]
    manifest = cluster.root / "web.yaml"
    manifest.write_text(DEPLOYMENT.format(name="web"))
    r = followers[0].cli("apply", "-f", str(manifest))
    assert r.code == 0, r.err
    names = [d["name"] for d in json_items(followers[1].cli("get", "deployments", "-o", "json"), "get")]
    assert names == ["web"]
    nodes = json_items(s3.cli("get", "nodes", "-o", "json"), "get nodes")
    wait_until(lambda: len(json_items(s3.cli("get", "nodes", "-o", "json"), "get nodes")) == 3, 15.0,
               interval=0.2, what="every agent registered with the leader")
    assert nodes is not None


def test_leader_kill9_elects_another_and_keeps_every_acknowledged_write(cluster: Servers) -> None:
    s1 = cluster.agents["s1"]
    lead = cluster.leader(s1)
    survivors = [a for n, a in cluster.agents.items() if n != lead]
    manifest = cluster.root / "m.yaml"
    for i in range(3):
        manifest.write_text(DEPLOYMENT.format(name=f"before{i}"))
        assert survivors[0].cli("apply", "-f", str(manifest)).code == 0
    old = cluster.agents[lead]
    old_term = max(r["term"] for r in cluster.servers(survivors[0]))
    killed_at = time.monotonic()
    old.kill9()
    new_lead = cluster.leader(survivors[0])
    assert new_lead != lead
    manifest.write_text(DEPLOYMENT.format(name="after"))
    r = survivors[1].cli("apply", "-f", str(manifest))
    assert r.code == 0, r.err
    took = time.monotonic() - killed_at
    rows = cluster.servers(survivors[1])
    assert max(int(r["term"]) for r in rows if r["role"] != "unreachable") > int(old_term)
    assert [r["role"] for r in rows if r["name"] == lead] == ["unreachable"]
    names = {d["name"] for d in json_items(survivors[0].cli("get", "deployments", "-o", "json"), "get")}
    assert names == {"before0", "before1", "before2", "after"}, f"after {took:.1f}s"

    # The old leader comes back as a follower and catches up from the log.
    old.start(wait=False)
    old.wait_serving(30.0)
    wait_until(lambda: {d["name"] for d in json_items(old.cli("get", "deployments", "-o", "json"), "get")}
               == names, 20.0, interval=0.3, what="the restarted server caught up")
    assert cluster.leader(old) == new_lead


def test_a_fourth_server_joins_by_itself_and_is_removed_by_name(cluster: Servers) -> None:
    s1 = cluster.agents["s1"]
    cluster.leader(s1)
    s4 = cluster.add("s4", expect=None)
    s4.start(wait=False)
    s4.wait_serving(30.0)

    def four_voters() -> bool:
        rows = cluster.servers(s1)
        return sorted(r["name"] for r in rows if r.get("suffrage") == "voter") == ["s1", "s2", "s3", "s4"]

    wait_until(four_voters, 30.0, interval=0.3, what="s4 added and promoted to voter")
    # Adding by hand what is already a member changes nothing and says which server it is.
    s4_id = next(r["id"] for r in cluster.servers(s1) if r["name"] == "s4")
    r = cluster.agents["s2"].cli("server", "add", s4.addr)
    assert r.code == 0, r.err
    assert f"server {s4_id} at {s4.addr} added" in r.out
    s4.stop()
    r = s1.cli("server", "remove", "s4")
    assert r.code == 0, r.err
    assert sorted(r["name"] for r in cluster.servers(s1)) == ["s1", "s2", "s3"]
    bad = s1.cli("server", "remove", "nosuch")
    assert bad.code == 1 and 'no server named "nosuch"' in bad.err


def test_stopping_the_leader_hands_leadership_over(cluster: Servers) -> None:
    s1 = cluster.agents["s1"]
    lead = cluster.leader(s1)
    old = cluster.agents[lead]
    survivors = [a for n, a in cluster.agents.items() if n != lead]
    old.stop()  # SIGTERM
    assert "raft.transferring_leadership" in old.log()
    assert cluster.leader(survivors[0]) != lead
    manifest = cluster.root / "x.yaml"
    manifest.write_text(DEPLOYMENT.format(name="x"))
    assert survivors[1].cli("apply", "-f", str(manifest)).code == 0


def test_without_a_quorum_the_cli_says_so_and_nothing_is_lost(cluster: Servers) -> None:
    s1 = cluster.agents["s1"]
    cluster.leader(s1)
    manifest = cluster.root / "q.yaml"
    manifest.write_text(DEPLOYMENT.format(name="kept"))
    assert s1.cli("apply", "-f", str(manifest)).code == 0
    for name in ("s2", "s3"):
        cluster.agents[name].kill9()
    r = s1.cli("get", "deployments")
    assert r.code == 1
    assert "no quorum: 1 of 3 servers are alive (a majority is 2)" in r.err, r.err
    w = s1.cli("scale", "deployment/kept", "--replicas", "0")
    assert w.code == 1 and "no quorum" in w.err, w.err
    for name in ("s2", "s3"):
        cluster.agents[name].start(wait=False)
    wait_until(lambda: s1.cli("get", "deployments", "-o", "json").code == 0, 30.0, interval=0.3,
               what="the cluster to serve again")
    assert [d["name"] for d in json_items(s1.cli("get", "deployments", "-o", "json"), "get")] == ["kept"]
