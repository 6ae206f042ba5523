"""A multi-host shoal cluster on one machine, in Linux network namespaces.

    python -m tests.netns up [N] [--servers S] [--hosts-only]
                                                 build N hosts (default 3), each running a
                                                 real `shoal agent`, the first S (default 1)
                                                 servers; stays in the foreground and tears
                                                 everything down on Ctrl-C/SIGTERM
    python -m tests.netns ls                     clusters whose namespaces exist now
    python -m tests.netns exec HOST CMD...       run CMD in HOST's namespace (h1, h2, ...),
                                                 with SHOAL_ADDR set to the server
                                                 (--prefix P when more than one cluster runs)
    python -m tests.netns down PREFIX|--all      remove what a crashed run left behind

Run from the repository root, as root, with `ip` (iproute2) and `nft` (nftables):
in one terminal `python -m tests.netns up 5`, in another
`python -m tests.netns exec h3 python -m shoal get nodes`. `down --all` also removes
clusters other test runs on this machine are using right now.

Layout of one run, prefix `shl` + 6 hex digits (e.g. `shl1a2b3c`):

    namespace shl1a2b3c-sw    bridge br0; veth ends h1, h2, ... enslaved to it
    namespace shl1a2b3c-hI    eth0 = 198.18.0.I/24 (peer of hI in the switch), lo;
                              nft table `netdev shl1a2b3c` (cuts and loss, see below);
                              `shoal agent --node-name hI --bind 198.18.0.I --driver process`:
                              with one server (the default), h1 with --server and the others
                              with --join 198.18.0.1 (its gossip port); with `servers=S` > 1,
                              h1..hS with --server --bootstrap-expect S --join 198.18.0.1 and
                              the others with --join 198.18.0.1 alone
    /tmp/shl1a2b3c/hI/        the agent's data dir; hI.log its output

Rules:
- Nothing is created in, or changed in, the root namespace: each veth pair is created
  with one end directly in the switch namespace and the other directly in the host's
  (`ip -n SW link add hI type veth peer name eth0 netns HOST`). The bridge lives in a
  switch namespace of its own because once Docker Engine runs, the root namespace's
  FORWARD policy is DROP, which silently drops traffic bridged there. The root
  namespace's iptables/nftables rules are never read or written.
- The addresses (198.18.0.0/15, reserved for benchmarking) are fixed: every run has its
  own switch, so runs never see one another. A host has no route but its /24, so no
  packet can leave the run's namespaces.
- Only what this run made is ever addressed: its namespaces by name, its processes by
  the inode of their network namespace (checked through a pidfd, so a reused pid is
  never signalled), its data dir by path.
- Network faults are nftables rules inside the hosts' namespaces, in the run's table,
  hooked on the host's link itself (netdev ingress and egress of eth0): `cut_from` /
  `cut_to` address sets drop what comes from / goes to the hosts cut off (both
  directions for `partition`, one for `one_way`); `loss` puts `numgen random mod 100 <
  P drop` in the chains `loss_in` / `loss_out`. A sender never learns that its packet
  was dropped (an inet output-hook drop would fail its send() with EPERM); loopback
  traffic inside a host never crosses eth0 and is never affected. Drops are silent (no
  reject): a partition looks like a dead link. `kill_host` puts a plain drop in the
  chains `down_in` / `down_out` (ahead of everything else) and kill -9s the agent: a dead
  host, which nothing reaches and which reaches nothing, though what it ran keeps running
  behind the cut until `revive_host` lifts it and starts the agent again.
- Seeds: an agent's first start joins h1 only (one --join address is all a cluster
  needs). A restart joins every other server too (the agent knows nothing better than
  a seed list, and h1 may be the host that is down); a restarted server rejoins the Raft
  cluster recorded in its data dir.
- With several servers, the harness talks to the first server that runs and is not cut
  off (`server`); `leader()` asks it which server leads.
- Teardown (`close`) works whatever state the run is in, even half built, and is
  idempotent: SIGKILL to every process in the run's namespaces (agents first, so none
  restarts a replica), reap them, delete the namespaces (their veths and nft tables go
  with them), remove the data dir. `leftovers(prefix)` says what, if anything, remains.
- Reaping: PID 1 on this machine does not reap orphans. The process that starts an
  agent becomes a child subreaper (prctl PR_SET_CHILD_SUBREAPER) and stays one (clusters
  may overlap; undoing it would strand another cluster's orphans), so the replicas of an
  agent killed with kill -9 are re-parented to it and it reaps them — by pid *and* start
  time, so it never steals the exit status of a child it does not own.
- Every wait is bounded and polls a condition; nothing sleeps to synchronise.

Sockets: `socket(host)` returns a socket created inside a host's namespace (a short-lived
thread enters the namespace with setns; a socket stays in the namespace it was made in),
so tests talk to the cluster from the harness process without a subprocess per request.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import pathlib
import re
import secrets
import shutil
import signal
import socket as socket_mod
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from tests.cluster import CliResult, json_items, service_manifest, whoami_deployment
from tests.helpers import wait_until

__all__ = [
    "GRPC_PORT",
    "AgentExited",
    "ApiError",
    "ApiSession",
    "CliResult",
    "Host",
    "HttpLoad",
    "NetnsCluster",
    "NetnsError",
    "NetnsUnavailable",
    "Request",
    "leftovers",
    "main",
    "process_exists",
    "require_netns",
    "whoami_binary",
    "whoami_manifest",
]

ROOT = pathlib.Path(__file__).resolve().parent.parent
GRPC_PORT = 7420
SUBNET = "198.18.0"  # hosts are SUBNET.1 .. SUBNET.250, /24
MAX_HOSTS = 250
PREFIX_RE = re.compile(r"^shl[0-9a-f]{6}$")
NS_RE = re.compile(r"^(shl[0-9a-f]{6})-(sw|h\d+)$")
RUN_ENV = "SHOAL_NETNS_RUN"  # set in every agent's environment, inherited by replicas

_CLONE_NEWNET = 0x40000000
_PR_SET_CHILD_SUBREAPER = 36

T = TypeVar("T")


class NetnsError(RuntimeError):
    """A command that builds or changes the cluster failed."""


class AgentExited(NetnsError):
    """An agent that was waited on exited: no point waiting any longer."""


class NetnsUnavailable(NetnsError):
    """This machine cannot run network-namespace clusters (not root, no ip or nft...)."""


@dataclass(eq=False)
class Host:
    """One simulated host: a namespace with one address and one agent process."""

    name: str  # h1, h2, ...; also the agent's node name
    index: int
    netns: str
    address: str
    data_dir: pathlib.Path
    log_path: pathlib.Path
    server: bool
    proc: subprocess.Popen[bytes] | None = None
    isolated: bool = False  # cut off by kill_host: nothing in or out of eth0
    started: int = 0  # how many times its agent was started

    @property
    def grpc_addr(self) -> str:
        return f"{self.address}:{GRPC_PORT}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __str__(self) -> str:
        return self.name


HostRef = Host | str


# -- low-level helpers ------------------------------------------------------------------

def _libc_fn() -> Any:
    return ctypes.CDLL(None, use_errno=True)  # dlopen(NULL): the same handle every time


def _run(argv: Sequence[str], *, input: str | None = None, timeout: float = 15.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        p = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"{' '.join(argv)}: no answer within {timeout:g} s") from exc
    if check and p.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p


def _wait(fn: Callable[[], Any], timeout: float, interval: float, what: str) -> Any:
    """`tests.helpers.wait_until`, except that AgentExited ends the wait at once."""
    fatal: list[AgentExited] = []

    def probe() -> Any:
        try:
            return fn()
        except AgentExited as exc:
            fatal.append(exc)
            return True

    value = wait_until(probe, timeout, interval=interval, what=what)
    if fatal:
        raise fatal[0]
    return value


def _enter_netns(netns: str) -> None:
    """Move the calling thread (only it) into `netns`."""
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc_fn().setns(fd, _CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns into {netns}: {os.strerror(e)}")
    finally:
        os.close(fd)


def _in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Run `fn` in a thread that entered `netns`; the caller's thread never moves."""
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            _enter_netns(netns)
            result.append(fn())
        except BaseException as exc:  # handed to the caller
            error.append(exc)

    t = threading.Thread(target=body, name=f"netns-{netns}", daemon=True)
    t.start()
    t.join(30.0)
    if t.is_alive():
        raise NetnsError(f"work in namespace {netns} did not finish within 30 s")
    if error:
        raise error[0]
    return result[0]


def _netns_inode(netns: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{netns}").st_ino
    except FileNotFoundError:
        return None


def _pid_netns_inode(pid: int) -> int | None:
    try:
        link = os.readlink(f"/proc/{pid}/ns/net")
    except OSError:  # gone, or a zombie (its namespaces are already released)
        return None
    m = re.fullmatch(r"net:\[(\d+)\]", link)
    return int(m.group(1)) if m else None


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _pids_in(inodes: set[int]) -> list[int]:
    """Live processes whose network namespace is one of `inodes`."""
    if not inodes:
        return []
    return [pid for pid in _pids() if _pid_netns_inode(pid) in inodes]


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time in clock ticks) of `pid`, or None when it is gone."""
    try:
        raw = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[19])


def _kill_if_in(pid: int, inodes: set[int]) -> bool:
    """SIGKILL `pid` if (and only if) it lives in one of `inodes`; race-free by pidfd:
    the signal goes to the process opened, whose namespace was checked after opening."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if _pid_netns_inode(pid) not in inodes:
            return False
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        return True
    finally:
        os.close(fd)


def _set_subreaper(on: bool) -> None:
    if _libc_fn().prctl(_PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise NetnsError(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(e)}")


def process_exists(pid: int, start: int) -> bool:
    """Whether the process `pid` that started at `start` (see `processes`) still exists,
    alive or as a zombie; a reused pid does not count."""
    st = _stat(pid)
    return st is not None and st[2] == start


def require_netns() -> None:
    """Raise NetnsUnavailable, saying why, when this machine cannot build a cluster."""
    if not sys.platform.startswith("linux"):
        raise NetnsUnavailable("network namespaces need Linux")
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root")
    for tool, pkg in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            raise NetnsUnavailable(f"`{tool}` not found: install {pkg} (scripts/setup.sh does)")
    if not hasattr(os, "pidfd_open"):
        raise NetnsUnavailable("needs os.pidfd_open (Linux 5.3+, Python 3.9+)")


def whoami_binary() -> pathlib.Path:
    """build/bin/whoami, built (scripts/build-images.sh --binaries-only) when missing."""
    path = ROOT / "build" / "bin" / "whoami"
    if not path.exists():
        _run(["bash", str(ROOT / "scripts" / "build-images.sh"), "--binaries-only"], timeout=300)
    if not path.exists():
        raise NetnsError(f"{path} was not built")
    return path


def whoami_manifest(whoami: pathlib.Path, *, name: str = "who", replicas: int = 3, port: int = 8000,
                    placement: str = "spread") -> str:
    """A Deployment of `replicas` whoami processes (the process driver, container port
    8080) and a Service `name` on `port` in front of them: the multi-host workload."""
    return whoami_deployment(whoami, name, replicas, placement=placement) + "---\n" + service_manifest(name, port)


# -- the cluster ------------------------------------------------------------------------


class NetnsCluster:
    """N hosts in network namespaces, each running a real agent; h1 (or h1..hS with
    `servers=S`) the servers, the others client agents.

    Build with `NetnsCluster(n).up()` (or as a context manager); every host is addressed
    by its `Host` or its name ("h2"). See the module docstring for the layout and rules.

    `servers=S` makes h1..hS servers that bootstrap one Raft cluster together (`up()`
    returns once a leader is known and every node is Ready); 1 keeps the cluster of one.
    `agents=False` builds the network only; `agent_args` are extra `shoal agent` flags,
    appended to every agent's command line (a flag given twice: the last one wins);
    `prefix` and `tmp_root` fix the run's name and where its data dir goes.
    """

    def __init__(
        self,
        n: int,
        *,
        servers: int = 1,
        agents: bool = True,
        agent_args: Sequence[str] = (),
        log_level: str = "info",
        prefix: str | None = None,
        tmp_root: pathlib.Path | None = None,
    ) -> None:
        if not 1 <= n <= MAX_HOSTS:
            raise ValueError(f"a cluster has 1 to {MAX_HOSTS} hosts, not {n}")
        if not 1 <= servers <= min(n, 9):
            raise ValueError(f"a cluster of {n} hosts has 1 to {min(n, 9)} servers, not {servers}")
        self.n_servers = servers
        self.prefix = prefix or f"shl{secrets.token_hex(3)}"
        if not PREFIX_RE.match(self.prefix):
            raise ValueError(f"prefix must look like shl + 6 hex digits, not {self.prefix!r}")
        self.root = (tmp_root or pathlib.Path(tempfile.gettempdir())) / self.prefix
        self.switch = f"{self.prefix}-sw"
        self.table = self.prefix  # the nft table's name in every host namespace
        self.with_agents = agents
        self.agent_args = tuple(agent_args)
        self.log_level = log_level
        self.hosts: list[Host] = [
            Host(
                name=f"h{i}",
                index=i,
                netns=f"{self.prefix}-h{i}",
                address=f"{SUBNET}.{i}",
                data_dir=self.root / f"h{i}",
                log_path=self.root / f"h{i}.log",
                server=i <= servers,
            )
            for i in range(1, n + 1)
        ]
        self.inodes: set[int] = set()  # network namespaces this run made
        self._seen: dict[int, int] = {}  # pid -> start time of processes seen in them
        self._sockets: weakref.WeakSet[socket_mod.socket] = weakref.WeakSet()
        self._made: list[str] = []  # namespaces created, in order
        self._apis: dict[str, ApiSession] = {}  # host name -> the harness's API session there
        self.closed = False

    # -- building ------------------------------------------------------------------------

    def __enter__(self) -> NetnsCluster:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def up(self, timeout: float = 30.0) -> NetnsCluster:
        """Build the network, start the agents, wait until every node is Ready."""
        require_netns()
        try:
            self.build_network()
            if self.with_agents:
                self.start_agents(timeout=timeout)
        except BaseException:
            self.close()
            raise
        return self

    def _add_netns(self, name: str) -> None:
        p = _run(["ip", "netns", "add", name], check=False)
        if p.returncode != 0:
            msg = f"cannot create network namespace {name}: {p.stderr.strip()}"
            # The first one failing means this machine cannot (no CAP_SYS_ADMIN, no netns).
            raise NetnsUnavailable(msg) if not self._made else NetnsError(msg)
        self._made.append(name)
        inode = _netns_inode(name)
        if inode is None:
            raise NetnsError(f"namespace {name} was created but /run/netns/{name} is missing")
        self.inodes.add(inode)
        # IPv6 off: no router solicitations or neighbour discovery chatter on the links.
        _in_netns(name, _disable_ipv6)

    def build_network(self) -> None:
        self.root.mkdir(parents=True, exist_ok=False)
        self._add_netns(self.switch)
        sw = ["ip", "-n", self.switch]
        _run([*sw, "link", "add", "br0", "type", "bridge"])
        _run([*sw, "link", "set", "br0", "up"])
        for h in self.hosts:
            self._add_netns(h.netns)
            # Both ends are born in their namespaces: the root namespace never sees them.
            _run([*sw, "link", "add", h.name, "type", "veth", "peer", "name", "eth0", "netns", h.netns])
            _run([*sw, "link", "set", h.name, "master", "br0", "up"])
            hn = ["ip", "-n", h.netns]
            _run([*hn, "addr", "add", f"{h.address}/24", "dev", "eth0"])
            _run([*hn, "link", "set", "eth0", "up"])
            _run([*hn, "link", "set", "lo", "up"])
            self._nft(h, _RULESET.format(table=self.table))

    def _agent_argv(self, h: Host) -> list[str]:
        argv = [
            "ip", "netns", "exec", h.netns,
            sys.executable, "-m", "shoal", "agent",
            "--node-name", h.name,
            "--bind", h.address,
            "--grpc-port", str(GRPC_PORT),
            "--data-dir", str(h.data_dir),
            "--driver", "process",
            "--log-level", self.log_level,
        ]
        if self.n_servers == 1:
            argv += ["--server"] if h.server else ["--join", self.hosts[0].address]
        else:
            if h.server:
                argv += ["--server", "--bootstrap-expect", str(self.n_servers)]
            seeds = [self.hosts[0]]
            if h.started:  # a restart: h1 may be the host that is down
                seeds += [s for s in self.servers if s is not h and s is not self.hosts[0]]
            for s in seeds:
                argv += ["--join", s.address]
        return argv + list(self.agent_args)

    def start_agent(self, host: HostRef) -> Host:
        """Start `host`'s agent (not waiting for it); its data dir is kept across restarts."""
        h = self.host(host)
        if h.alive():
            raise NetnsError(f"{h.name}'s agent is already running (pid {h.proc.pid if h.proc else '?'})")
        _set_subreaper(True)
        h.data_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env[RUN_ENV] = self.prefix
        env.pop("SHOAL_ADDR", None)
        with open(h.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} starting agent {h.name}\n".encode())
            log.flush()
            # `ip netns exec` execs (no fork), so the Popen is the agent itself; its own
            # session and process group, so a signal to the harness's group spares it.
            h.proc = subprocess.Popen(
                self._agent_argv(h), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=ROOT, env=env, start_new_session=True,
            )
        h.started += 1
        return h

    def start_agents(self, timeout: float = 30.0) -> None:
        """Servers first (clients back off exponentially while there is no leader), then
        the rest; returns once every node is Ready."""
        servers = self.servers
        for h in servers:
            self.start_agent(h)
        for h in servers:
            self.wait_listening(h, GRPC_PORT, timeout=timeout, what=f"{h.name}'s gRPC port")
        if len(servers) > 1:
            self.wait_leader(timeout=timeout)
        for h in self.hosts[len(servers):]:
            self.start_agent(h)
        self.wait_ready(timeout=timeout)

    # -- looking things up -----------------------------------------------------------------

    @property
    def servers(self) -> list[Host]:
        return [h for h in self.hosts if h.server]

    @property
    def server(self) -> Host:
        """The server the harness talks to: the first whose agent runs and is not cut off
        (h1 while it is up; with one server, always h1)."""
        for h in self.servers:
            if h.alive() and not h.isolated:
                return h
        return self.hosts[0]

    def _api_via(self, via: HostRef | None = None) -> tuple[ApiSession, Host]:
        """The harness's own API session in `via`'s namespace (default: `server`'s), made
        on first use, and the server it talks to."""
        h = self.host(via) if via is not None else self.server
        session = self._apis.get(h.name)
        if session is None or session.exited():
            session = self._apis[h.name] = ApiSession(self, h)
        return session, h

    def server_table(self, via: HostRef | None = None) -> list[dict[str, Any]]:
        """The Raft servers as `via` (default: `server`) reports them, as `shoal get
        servers -o json` prints them."""
        session, h = self._api_via(via)
        return list(session.call("servers", addr=h.grpc_addr).get("servers", []))

    def leader(self, via: HostRef | None = None) -> Host | None:
        """The server that leads, as `via` (default: `server`) sees it; None while there
        is none, or when it names a host that is down (a stale view)."""
        for s in self.server_table(via):
            if s.get("role") == "leader":
                try:
                    h = self.host(str(s.get("name") or s.get("address", "").rsplit(":", 1)[0]))
                except KeyError:
                    return None
                return h if h.alive() and not h.isolated else None
        return None

    def wait_leader(self, timeout: float = 30.0, *, not_: HostRef | None = None) -> Host:
        """Until a running server leads (and, with `not_`, one other than that host); it."""
        avoid = self.host(not_) if not_ is not None else None

        def found() -> Host | None:
            for h in self.servers:  # one that exited by itself (not killed here) will not lead
                if h.proc is not None and h.proc.poll() not in (None, -signal.SIGKILL):
                    raise AgentExited(f"agent {h.name} exited with {h.proc.returncode}")
            lead = self.leader()
            return lead if lead is not None and lead is not avoid else None

        try:
            return _wait(found, timeout, interval=0.2, what="a leader" + (f" other than {avoid}" if avoid else ""))
        except (AssertionError, NetnsError) as exc:
            raise AssertionError(f"{exc}\n{self.diagnose()}") from None

    def wait_servers_healthy(self, timeout: float = 30.0) -> Host:
        """Until the leader reports every server a voter that follows it with no lag (so
        the next fault is a single fault, not one on top of a server still catching up);
        the leader."""

        def healthy() -> Host | None:
            lead = self.leader()
            if lead is None:
                return None
            table = self.server_table(lead)
            ok = len(table) == len(self.servers) and all(
                s.get("suffrage") == "voter" and s.get("role") in ("leader", "follower") and int(s.get("lag", 0)) == 0
                for s in table
            )
            return lead if ok else None

        try:
            return _wait(healthy, timeout, interval=0.1, what="every server a voter, caught up with the leader")
        except (AssertionError, NetnsError) as exc:
            raise AssertionError(f"{exc}\n{self.diagnose()}") from None

    def host(self, ref: HostRef) -> Host:
        if isinstance(ref, Host):
            return ref
        for h in self.hosts:
            if ref in (h.name, h.netns, h.address):
                return h
        raise KeyError(f"no host {ref!r} in cluster {self.prefix} (hosts: {', '.join(h.name for h in self.hosts)})")

    def __getitem__(self, ref: str | int) -> Host:
        return self.hosts[ref - 1] if isinstance(ref, int) else self.host(ref)

    def log(self, host: HostRef, tail: int = 0) -> str:
        h = self.host(host)
        try:
            text = h.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-tail:]) if tail else text

    def diagnose(self, tail: int = 25) -> str:
        """Every host's agent state and last log lines: for failure messages."""
        parts = []
        for h in self.hosts:
            state = "not started" if h.proc is None else ("running" if h.alive() else f"exited {h.proc.returncode}")
            if h.alive() and h.proc is not None and (st := _stat(h.proc.pid)) and st[0] == "T":
                state = "stopped (SIGSTOP)"
            parts.append(f"--- {h.name} {h.address} agent {state}; last log lines:\n{self.log(h, tail)}")
        return "\n".join(parts)

    # -- running things in a host ------------------------------------------------------------

    def exec(self, host: HostRef, *argv: str, input: str | None = None, timeout: float = 30.0,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run `argv` in `host`'s namespace and wait for it (bounded by `timeout`)."""
        h = self.host(host)
        full_env = dict(os.environ, SHOAL_ADDR=self.server.grpc_addr, COLUMNS="200", **(env or {}))
        return subprocess.run(["ip", "netns", "exec", h.netns, *argv], input=input, capture_output=True,
                              text=True, timeout=timeout, cwd=ROOT, env=full_env)

    def popen(self, host: HostRef, *argv: str, env: dict[str, str] | None = None,
              **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` in `host`'s namespace without waiting (a poller, another gossip
        implementation...). Its own session, so a signal to the harness's group spares it;
        `close()` kills it with everything else in the run's namespaces. Extra `kwargs` go
        to `subprocess.Popen` (stdout=..., text=...)."""
        h = self.host(host)
        _set_subreaper(True)
        full_env = dict(os.environ, SHOAL_ADDR=self.server.grpc_addr, PYTHONUNBUFFERED="1", **(env or {}))
        full_env[RUN_ENV] = self.prefix
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("cwd", ROOT)
        proc = subprocess.Popen(["ip", "netns", "exec", h.netns, *argv], env=full_env,
                                start_new_session=True, **kwargs)
        self._remember()
        return proc

    def cli(self, *args: str, input: str | None = None, timeout: float = 60.0, host: HostRef | None = None) -> CliResult:
        """The shoal CLI, run in h1's namespace (or `host`'s), against the server."""
        p = self.exec(host or self.server, sys.executable, "-m", "shoal", *args, input=input, timeout=timeout)
        return CliResult(p.returncode, p.stdout, p.stderr)

    def get_json(self, kind: str) -> list[dict[str, Any]]:
        return json_items(self.cli("get", kind, "-o", "json"), f"get {kind}")

    def ready_nodes(self, since: float = 0.0) -> dict[str, str]:
        """Node name -> address of every node the server reports Ready, and (with `since`,
        a `time.time()` value) registered by an agent connection made since then."""
        session, h = self._api_via()
        return {
            n["name"]: n.get("address", "")
            for n in session.get("nodes", addr=h.grpc_addr)
            if n.get("status") == "Ready" and float(n.get("last_seen", 0.0)) >= since
        }

    def wait_ready(self, hosts: Iterable[HostRef] | None = None, timeout: float = 30.0, since: float = 0.0) -> None:
        """Until the server reports each of `hosts` (default: all) Ready at its address
        (and, with `since`, connected since then: see `ready_nodes`)."""
        want = {self.host(h).name: self.host(h).address for h in (hosts if hosts is not None else self.hosts)}

        def ready() -> bool:
            for h in self.hosts:
                if h.proc is not None and h.proc.poll() is not None and h.name in want:
                    raise AgentExited(f"agent {h.name} exited with {h.proc.returncode}")
            nodes = self.ready_nodes(since)
            return all(nodes.get(name) == addr for name, addr in want.items())

        try:
            _wait(ready, timeout, interval=0.2, what=f"nodes {', '.join(sorted(want))} Ready")
        except (AssertionError, NetnsError) as exc:
            raise AssertionError(f"{exc}\n{self.diagnose()}") from None

    # -- a long-lived API client inside a host ------------------------------------------------

    def api(self, host: HostRef) -> ApiSession:
        """A `shoal.client.Client` process in `host`'s namespace, for many quick API
        calls (a CLI run pays an interpreter start each time). See `ApiSession`."""
        return ApiSession(self, self.host(host))

    def thread(self, host: HostRef, target: Callable[[], None], name: str = "") -> threading.Thread:
        """Start a daemon thread that enters `host`'s namespace and runs `target`: every
        socket it makes lives there (a load generator, a prober)."""
        h = self.host(host)

        def body() -> None:
            _enter_netns(h.netns)
            target()

        t = threading.Thread(target=body, name=name or f"netns-{h.name}", daemon=True)
        t.start()
        return t

    # -- sockets inside a host ----------------------------------------------------------------

    def socket(self, host: HostRef, kind: int = socket_mod.SOCK_STREAM) -> socket_mod.socket:
        """A new IPv4 socket in `host`'s namespace; closed by `close()` if still open."""
        h = self.host(host)
        s = _in_netns(h.netns, lambda: socket_mod.socket(socket_mod.AF_INET, kind))
        self._sockets.add(s)
        return s

    def connect(self, host: HostRef, address: str, port: int, timeout: float = 2.0) -> socket_mod.socket:
        """A TCP connection from `host` to address:port (OSError when it cannot be made)."""
        s = self.socket(host)
        try:
            s.settimeout(timeout)
            s.connect((address, port))
        except BaseException:
            s.close()
            raise
        return s

    def can_connect(self, host: HostRef, address: str, port: int, timeout: float = 1.0) -> bool:
        try:
            self.connect(host, address, port, timeout).close()
        except OSError:
            return False
        return True

    def wait_listening(self, host: HostRef, port: int, timeout: float = 30.0, what: str = "") -> None:
        h = self.host(host)

        def listening() -> bool:
            if h.proc is not None and h.proc.poll() is not None:
                raise AgentExited(f"agent {h.name} exited with {h.proc.returncode}")
            return self.can_connect(h, h.address, port, timeout=0.5)

        try:
            _wait(listening, timeout, interval=0.05, what=what or f"{h.name}:{port} to listen")
        except (AssertionError, NetnsError) as exc:
            raise AssertionError(f"{exc}\n{self.diagnose()}") from None

    def http_get(self, host: HostRef, address: str, port: int, path: str = "/", timeout: float = 2.0) -> str:
        """One HTTP/1.0 GET from `host` to address:port on a new connection; the body."""
        with self.connect(host, address, port, timeout) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1."):
            raise ConnectionError(f"not an HTTP response: {data[:80]!r}")
        status = head.split(b" ", 2)[1]
        if status != b"200":
            raise ConnectionError(f"HTTP {status.decode()}: {body[:80]!r}")
        return body.decode()

    def udp_delivery(self, src: HostRef, dst: HostRef, count: int = 100, wait: float = 0.3) -> int:
        """Send `count` numbered datagrams from src to dst; how many arrived (waiting up to
        `wait` s for stragglers). Fast: no agent is involved."""
        s, d = self.host(src), self.host(dst)
        with self.socket(d, socket_mod.SOCK_DGRAM) as rx, self.socket(s, socket_mod.SOCK_DGRAM) as tx:
            rx.bind((d.address, 0))
            port = rx.getsockname()[1]
            got: set[bytes] = set()

            def drain(timeout: float) -> None:
                rx.settimeout(timeout)
                with contextlib.suppress(TimeoutError, BlockingIOError):
                    while len(got) < count:
                        got.add(rx.recv(64))
                        rx.settimeout(timeout)

            for i in range(count):
                tx.sendto(str(i).encode(), (d.address, port))  # a drop never shows here
                if i % 64 == 63:  # stay well inside the receive buffer
                    drain(0.0)
            drain(wait)
        return len(got)

    # -- process faults -------------------------------------------------------------------------

    def _remember(self, inodes: set[int] | None = None) -> None:
        """Note the start time of every process now in our namespaces, to reap it later."""
        for pid in _pids_in(inodes if inodes is not None else self.inodes):
            if (st := _stat(pid)) is not None:
                self._seen[pid] = st[2]

    def processes(self, host: HostRef | None = None) -> dict[int, int]:
        """pid -> start time (clock ticks since boot) of every live process in the run's
        namespaces (or `host`'s alone): agents, replicas, probes."""
        inodes = self.inodes
        if host is not None:
            inode = _netns_inode(self.host(host).netns)
            inodes = {inode} if inode is not None else set()
        return {pid: st[2] for pid in _pids_in(inodes) if (st := _stat(pid)) is not None}

    def replicas_running(self, host: HostRef) -> dict[str, int]:
        """Replica id -> pid of every replica process running in `host`'s namespace (the
        process driver sets SHOAL_REPLICA in each one's environment); zombies are dead."""
        found: dict[str, int] = {}
        for pid in self.processes(host):
            st = _stat(pid)
            if st is None or st[0] == "Z":
                continue
            try:
                environ = pathlib.Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for var in environ:
                if var.startswith(b"SHOAL_REPLICA="):
                    rid = var.split(b"=", 1)[1].decode()
                    # A replica's children inherit the variable: keep the group leader.
                    if rid not in found or pid < found[rid]:
                        found[rid] = pid
        return found

    def kill9(self, host: HostRef) -> None:
        """SIGKILL the agent (its replicas keep running, as they would on a real host)."""
        h = self.host(host)
        self._remember()  # its replicas are about to be re-parented to us
        if h.proc is not None and h.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(h.proc.pid, signal.SIGKILL)
            h.proc.wait(timeout=10)

    def stop(self, host: HostRef) -> None:
        """SIGSTOP the agent (a GC pause, an overloaded host); returns once it is stopped."""
        self._signal_and_wait(self.host(host), signal.SIGSTOP, stopped=True)

    def cont(self, host: HostRef) -> None:
        """SIGCONT the agent; returns once it runs again."""
        self._signal_and_wait(self.host(host), signal.SIGCONT, stopped=False)

    def _signal_and_wait(self, h: Host, sig: signal.Signals, *, stopped: bool) -> None:
        if h.proc is None or h.proc.poll() is not None:
            raise NetnsError(f"{h.name}'s agent is not running")
        os.killpg(h.proc.pid, sig)
        pid = h.proc.pid
        # Signals are delivered asynchronously; "T" once every thread has stopped.
        wait_until(lambda: (st := _stat(pid)) is not None and (st[0] == "T") == stopped, 5.0, interval=0.005,
                   what=f"{h.name}'s agent to be {'stopped' if stopped else 'running'}")

    def restart(self, host: HostRef, *, graceful: bool = True, wait: bool = True, timeout: float = 30.0) -> Host:
        """Stop the agent (SIGTERM, or SIGKILL when not `graceful`) if it runs, start it
        again with the same data dir, and (with `wait`) wait until the server has seen the
        new agent connect. (Not merely "Ready": a node can stay Ready on the server while
        its agent is down; the server's last_seen tells a new connection apart.)"""
        h = self.host(host)
        if h.alive() and h.proc is not None:
            self._remember()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(h.proc.pid, signal.SIGCONT)
                os.killpg(h.proc.pid, signal.SIGTERM if graceful else signal.SIGKILL)
            try:
                h.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(h.proc.pid, signal.SIGKILL)
                h.proc.wait(timeout=10)
        # The server stamps last_seen from the same clock; a little slack for rounding.
        started = time.time() - 0.01
        self.start_agent(h)
        if wait:
            if h.server:
                self.wait_listening(h, GRPC_PORT, timeout=timeout)
            self.wait_ready([h], timeout=timeout, since=started)
        return h

    def kill_host(self, host: HostRef) -> Host:
        """A host dies: its link goes dark (nothing in, nothing out) and its agent is
        killed with kill -9. What the agent ran keeps running behind the cut, unreachable,
        as on a host that lost its network and its agent at once."""
        h = self.host(host)
        self._nft(h, f"add rule netdev {self.table} down_in drop\nadd rule netdev {self.table} down_out drop\n")
        h.isolated = True
        self.kill9(h)
        return h

    def revive_host(self, host: HostRef, *, wait: bool = True, timeout: float = 30.0) -> Host:
        """Undo `kill_host`: the link comes back, then the agent starts again with its
        data dir (and, with `wait`, the leader has seen it connect)."""
        h = self.host(host)
        self._nft(h, f"flush chain netdev {self.table} down_in\nflush chain netdev {self.table} down_out\n")
        h.isolated = False
        return self.restart(h, wait=wait, timeout=timeout)

    # -- network faults ---------------------------------------------------------------------------

    def _nft(self, host: HostRef, script: str) -> None:
        h = self.host(host)
        _run(["ip", "netns", "exec", h.netns, "nft", "-f", "-"], input=script)

    def _cut(self, frm: Host, to: Host) -> None:
        """Drop packets from `frm` to `to`: at both ends, so either one alone would do."""
        self._nft(frm, f"add element netdev {self.table} cut_to {{ {to.address} }}\n")
        self._nft(to, f"add element netdev {self.table} cut_from {{ {frm.address} }}\n")

    def partition(self, group_a: Iterable[HostRef], group_b: Iterable[HostRef]) -> None:
        """Cut every host of `group_a` from every host of `group_b`, both directions.
        Hosts in neither group keep talking to both."""
        a = [self.host(x) for x in group_a]
        b = [self.host(x) for x in group_b]
        if set(map(id, a)) & set(map(id, b)):
            raise ValueError("a host cannot be on both sides of a partition")
        for x in a:
            for y in b:
                self._cut(x, y)
                self._cut(y, x)

    def one_way(self, frm: HostRef, to: HostRef) -> None:
        """Drop what `frm` sends to `to`; `to` can still send to `frm`."""
        self._cut(self.host(frm), self.host(to))

    def heal(self) -> None:
        """Undo every partition and one-way cut (packet loss stays until `loss(host, 0)`)."""
        for h in self.hosts:
            self._nft(h, f"flush set netdev {self.table} cut_from\nflush set netdev {self.table} cut_to\n")

    def loss(self, host: HostRef, percent: int, direction: str = "both") -> None:
        """Drop `percent` % of the packets on `host`'s link (eth0), each independently at
        random: received ("in"), sent ("out") or both. ARP crosses the link too and is
        dropped alike. With "both" on every host a packet between two hosts crosses two
        lossy links: 10 % per link loses 19 % end to end (use "out" on every host for 10 %
        end to end). 0 removes the loss."""
        h = self.host(host)
        if not 0 <= int(percent) <= 100:
            raise ValueError(f"loss is a percentage from 0 to 100, not {percent}")
        if direction not in ("in", "out", "both"):
            raise ValueError(f'direction is "in", "out" or "both", not {direction!r}')
        p = int(percent)
        lines = [f"flush chain netdev {self.table} loss_in", f"flush chain netdev {self.table} loss_out"]
        if p:
            # numgen's values are 0..99, and "< 100" is out of its range: 100 % is a plain drop.
            chance = f"numgen random mod 100 < {p} " if p < 100 else ""
            if direction in ("in", "both"):
                lines.append(f"add rule netdev {self.table} loss_in {chance}drop")
            if direction in ("out", "both"):
                lines.append(f"add rule netdev {self.table} loss_out {chance}drop")
        self._nft(h, "\n".join(lines) + "\n")

    def ruleset(self, host: HostRef) -> str:
        """`nft list table` of the run's table in `host` (for debugging)."""
        h = self.host(host)
        return _run(["ip", "netns", "exec", h.netns, "nft", "list", "table", "netdev", self.table]).stdout

    # -- teardown ---------------------------------------------------------------------------------

    def close(self, timeout: float = 20.0) -> None:
        """Remove everything this run made; safe to call at any point, and twice."""
        if self.closed:
            return
        self.closed = True
        errors: list[str] = []
        for s in list(self._sockets):
            with contextlib.suppress(OSError):
                s.close()
        self._apis.clear()  # their processes live in the run's namespaces: killed below
        # Agents first, so none of them restarts a replica killed below.
        for h in self.hosts:
            if h.proc is not None and h.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(h.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while True:
            self._remember()
            live = _pids_in(self.inodes)
            for pid in live:
                _kill_if_in(pid, self.inodes)
                # A process group led from our namespace is ours too (e.g. a replica's
                # children that left it): kill the group while its leader is still ours.
                with contextlib.suppress(OSError):
                    if os.getpgid(pid) == pid:
                        fd = os.pidfd_open(pid)
                        try:
                            if _pid_netns_inode(pid) in self.inodes:
                                os.killpg(pid, signal.SIGKILL)
                        finally:
                            os.close(fd)
            self._reap()
            if not live or time.monotonic() > deadline:
                if live:
                    errors.append(f"processes still alive after {timeout:g} s: {live}")
                break
            time.sleep(0.05)
        self._reap(wait=2.0)
        for name in reversed(self._made):  # hosts, then the switch; veths and nft tables go with them
            p = _run(["ip", "netns", "del", name], check=False)
            if p.returncode != 0 and _netns_inode(name) is not None:
                errors.append(f"ip netns del {name}: {p.stderr.strip()}")
        self._made.clear()
        if self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)
            if self.root.exists():
                errors.append(f"could not remove {self.root}")
        if errors:
            raise NetnsError(f"teardown of {self.prefix} left things behind: " + "; ".join(errors))

    def _reap(self, wait: float = 0.0) -> None:
        """Reap our agents, and the orphans re-parented to us that we saw alive (checked
        by start time, so a pid reused by someone else's child is left alone)."""
        deadline = time.monotonic() + wait
        while True:
            pending = False
            for h in self.hosts:
                if h.proc is not None and h.proc.returncode is None:
                    if h.proc.poll() is None:
                        pending = True
            me = os.getpid()
            for pid, start in list(self._seen.items()):
                st = _stat(pid)
                if st is None or st[2] != start:
                    del self._seen[pid]  # gone (reaped by someone) or the pid was reused
                    continue
                state, ppid, _ = st
                if ppid != me:
                    continue  # still someone else's child (e.g. an agent's): not ours to reap
                if state != "Z":
                    pending = True
                    continue
                try:
                    reaped, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    reaped = pid  # not ours after all (someone reaped it): forget it
                if reaped == 0:
                    # A multi-threaded process shows "Z" as soon as its main thread is
                    # gone but cannot be reaped until every thread has exited.
                    pending = True
                    continue
                del self._seen[pid]
            if not pending or time.monotonic() >= deadline:
                return
            time.sleep(0.02)


@dataclass(frozen=True, slots=True)
class Request:
    """One client request of an `HttpLoad`, retries included (times: `time.monotonic()`)."""

    start: float
    end: float
    attempts: int
    answer: str  # the body of the 200 that ended it ("" when every attempt failed)
    errors: tuple[str, ...]  # why each failed attempt failed

    @property
    def failed(self) -> bool:
        return not self.answer


class HttpLoad:
    """A steady client: from inside `host`, one HTTP/1.0 GET at a time on a new
    connection to address:port, one every `interval` seconds. An attempt that fails
    (refused, reset, no answer within `timeout`, not a 200) is retried after
    `retry_delay`, up to `attempts` in all; a request fails only when all of them did.
    whoami answers with its replica id, so `answers` says who served each request.

    `start()`, then `stop()` returns what was recorded; `requests` can be read while it
    runs (a copy)."""

    def __init__(self, cluster: NetnsCluster, host: HostRef, address: str, port: int, *, interval: float = 0.02,
                 attempts: int = 3, timeout: float = 3.0, retry_delay: float = 0.1, path: str = "/") -> None:
        self.cluster = cluster
        self.host = cluster.host(host)
        self.address, self.port, self.path = address, port, path
        self.interval, self.attempts, self.timeout, self.retry_delay = interval, attempts, timeout, retry_delay
        self._requests: list[Request] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _attempt(self) -> str:
        with socket_mod.create_connection((self.address, self.port), timeout=self.timeout) as s:
            s.settimeout(self.timeout)
            s.sendall(f"GET {self.path} HTTP/1.0\r\nHost: {self.address}\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1."):
            raise ConnectionError(f"not an HTTP response: {data[:60]!r}")
        status = head.split(b" ", 2)[1]
        if status != b"200":
            raise ConnectionError(f"HTTP {status.decode()}")
        return body.decode().strip() or "?"

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                start = time.monotonic()
                errors: list[str] = []
                answer = ""
                for i in range(self.attempts):
                    try:
                        answer = self._attempt()
                        break
                    except OSError as exc:  # ConnectionError and timeouts are OSErrors
                        errors.append(f"{type(exc).__name__}: {exc}")
                        if i + 1 < self.attempts:
                            self._stop.wait(self.retry_delay)
                end = time.monotonic()
                with self._lock:
                    self._requests.append(Request(start, end, len(errors) + (1 if answer else 0), answer, tuple(errors)))
                self._stop.wait(max(0.0, self.interval - (end - start)))  # pacing, not synchronisation
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def start(self) -> HttpLoad:
        self._thread = self.cluster.thread(self.host, self._run, name=f"load-{self.host.name}")
        return self

    def stop(self) -> list[Request]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout * self.attempts + 5)
            if self._thread.is_alive():
                raise NetnsError(f"the load generator in {self.host.name} did not stop")
        if self.error is not None:
            raise NetnsError(f"the load generator in {self.host.name} crashed: {self.error!r}") from self.error
        return self.requests

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def answers(self, since: float = 0.0) -> list[tuple[float, str]]:
        """(end time, replica id) of every request answered that ended after `since`."""
        return [(r.end, r.answer) for r in self.requests if r.answer and r.end >= since]

    def __enter__(self) -> HttpLoad:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout * self.attempts + 5)


class ApiError(NetnsError):
    """An API call made through an `ApiSession` failed; the message is the client's."""

    def __init__(self, message: str, *, kind: str = "") -> None:
        super().__init__(message)
        self.kind = kind  # the client-side exception's class name (Unavailable, ...)


_API_SESSION = r"""
import json, sys
from google.protobuf.json_format import MessageToDict
from shoal.client import Client
clients = {}
for line in sys.stdin:
    req = json.loads(line)
    try:
        c = clients.get(req["addr"])
        if c is None:
            c = clients[req["addr"]] = Client(req["addr"])
        c.timeout = req["timeout"]
        resp = getattr(c, req["method"])(*req["args"])
        out = {"id": req["id"], "ok": MessageToDict(resp, preserving_proto_field_name=True)}
    except Exception as exc:
        out = {"id": req["id"], "error": str(exc) or repr(exc), "kind": type(exc).__name__}
    print(json.dumps(out), flush=True)
"""


class ApiSession:
    """One Python process in a host's namespace holding `shoal.client.Client`s (one per
    server address): `call("get", "pods")` sends a JSON line, the process makes the gRPC
    call and answers with the response as a dict (`MessageToDict`, proto field names, as
    `-o json` prints) or the error's message. Calls are sequential; each is bounded by
    its own gRPC deadline, and the harness waits that plus a margin. The process lives in
    the run's namespace, so the cluster's `close()` ends it if `close()` here did not."""

    def __init__(self, cluster: NetnsCluster, host: Host) -> None:
        self.cluster = cluster
        self.host = host
        self._proc = cluster.popen(host, sys.executable, "-c", _API_SESSION, stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True, bufsize=1)
        self._next = 0
        self._lines: list[str] = []
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, name=f"api-{host.name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            with self._cv:
                self._lines.append(line)
                self._cv.notify_all()
        with self._cv:
            self._lines.append("")  # EOF
            self._cv.notify_all()

    def call(self, method: str, *args: Any, addr: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
        """`Client.<method>(*args)` against `addr` (default: the cluster's `server`)."""
        if self._proc.poll() is not None or self._proc.stdin is None:
            raise NetnsError(f"API session in {self.host.name} exited with {self._proc.returncode}")
        self._next += 1
        rid = self._next
        req = {"id": rid, "addr": addr or self.cluster.server.grpc_addr, "timeout": timeout,
               "method": method, "args": list(args)}
        self._proc.stdin.write(json.dumps(req) + "\n")
        self._proc.stdin.flush()
        deadline = time.monotonic() + timeout + 5.0
        with self._cv:
            while True:
                while self._lines:
                    line = self._lines.pop(0)
                    if not line:
                        raise NetnsError(f"API session in {self.host.name} exited")
                    answer = json.loads(line)
                    if answer["id"] == rid:  # older ones answer calls given up on
                        if "error" in answer:
                            raise ApiError(answer["error"], kind=answer.get("kind", ""))
                        return dict(answer["ok"])
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NetnsError(f"API session in {self.host.name}: no answer to {method} within {timeout + 5:g} s")
                self._cv.wait(left)

    def get(self, kind: str, *, addr: str | None = None, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The objects of one kind (pods, nodes, endpoints, ...), as `get KIND -o json`."""
        return list(self.call("get", kind, addr=addr, timeout=timeout).get(kind, []))

    def exited(self) -> bool:
        return self._proc.poll() is not None

    def close(self) -> None:
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=5)

    def __enter__(self) -> ApiSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Hooks on eth0 itself (netdev ingress/egress), not the inet input/output hooks: a drop
# at the output hook fails the sender's send() with EPERM, which no real network does;
# at the device a dropped packet simply never arrives. Loopback never passes eth0.
_RULESET = """\
table netdev {table} {{
    set cut_from {{ type ipv4_addr; }}
    set cut_to {{ type ipv4_addr; }}
    chain loss_in {{ }}
    chain loss_out {{ }}
    chain down_in {{ }}
    chain down_out {{ }}
    chain ingress {{
        type filter hook ingress device "eth0" priority -10; policy accept;
        jump down_in
        ip saddr @cut_from drop
        jump loss_in
    }}
    chain egress {{
        type filter hook egress device "eth0" priority -10; policy accept;
        jump down_out
        ip daddr @cut_to drop
        jump loss_out
    }}
}}
"""


def _disable_ipv6() -> None:
    # Opened in the thread that entered the namespace: /proc/sys/net is the opener's.
    for name in ("all", "default"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("1")  # (no file: the kernel has no IPv6 at all)


# -- finding what a run left behind -----------------------------------------------------------


def _netns_names() -> list[str]:
    try:
        return sorted(os.listdir("/run/netns"))
    except FileNotFoundError:
        return []


def leftovers(prefix: str, inodes: Iterable[int] = (), tmp_root: pathlib.Path | None = None) -> list[str]:
    """What remains of run `prefix`: namespaces, root-namespace links or nft tables named
    for it, processes in its namespaces (by inode) or carrying its name (command line or
    the run variable in their environment), zombies among them, its data dir. Empty when
    the run left nothing behind."""
    found: list[str] = []
    found += [f"namespace {n}" for n in _netns_names() if n.startswith(prefix)]
    links = _run(["ip", "-o", "link", "show"], check=False).stdout
    found += [f"root-namespace link {line.split(':')[1].strip()}" for line in links.splitlines() if prefix in line]
    tables = _run(["nft", "list", "tables"], check=False).stdout if shutil.which("nft") else ""
    found += [f"root-namespace nft {line.strip()}" for line in tables.splitlines() if prefix in line]
    inode_set = set(inodes)
    marker = f"{RUN_ENV}={prefix}".encode()
    for pid in _pids():
        why = ""
        if inode_set and _pid_netns_inode(pid) in inode_set:
            why = "in the run's namespace"
        else:
            with contextlib.suppress(OSError):
                if prefix.encode() in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes():
                    why = "names the run in its command line"
            with contextlib.suppress(OSError):
                if not why and marker in pathlib.Path(f"/proc/{pid}/environ").read_bytes():
                    why = f"has {RUN_ENV}={prefix}"
        if why and pid != os.getpid():
            st = _stat(pid)
            found.append(f"process {pid} ({'zombie' if st and st[0] == 'Z' else 'alive'}) {why}")
    data = (tmp_root or pathlib.Path(tempfile.gettempdir())) / prefix
    if data.exists():
        found.append(f"data dir {data}")
    return found


def _clusters() -> dict[str, list[str]]:
    """prefix -> namespace names, for every run whose namespaces exist now."""
    out: dict[str, list[str]] = {}
    for name in _netns_names():
        if m := NS_RE.match(name):
            out.setdefault(m.group(1), []).append(name)
    return out


def _down(prefix: str) -> list[str]:
    """Remove a run's namespaces, the processes in them and its data dir (a crashed run)."""
    names = _clusters().get(prefix, [])
    inodes = {i for n in names if (i := _netns_inode(n)) is not None}
    deadline = time.monotonic() + 10.0
    while (live := _pids_in(inodes)) and time.monotonic() < deadline:
        for pid in live:
            _kill_if_in(pid, inodes)
        time.sleep(0.05)
    for n in sorted(names, key=lambda n: n.endswith("-sw")):
        _run(["ip", "netns", "del", n], check=False)
    data = pathlib.Path(tempfile.gettempdir()) / prefix
    shutil.rmtree(data, ignore_errors=True)
    return leftovers(prefix, inodes)


# -- the command for people ----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.netns", description=__doc__.split("\n\n")[0] if __doc__ else "",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="build a cluster and run it until Ctrl-C")
    p_up.add_argument("n", type=int, nargs="?", default=3)
    p_up.add_argument("--servers", type=int, default=1, help="how many of the hosts are servers (1, 3 or 5)")
    p_up.add_argument("--hosts-only", action="store_true", help="namespaces and links only, no agents")
    p_up.add_argument("--log-level", default="info")
    sub.add_parser("ls", help="list clusters")
    p_exec = sub.add_parser("exec", help="run a command in a host's namespace")
    p_exec.add_argument("--prefix", default="")
    p_exec.add_argument("host")
    p_exec.add_argument("argv", nargs=argparse.REMAINDER)
    p_down = sub.add_parser("down", help="remove what a crashed run left behind")
    p_down.add_argument("prefix", nargs="?", default="")
    p_down.add_argument("--all", action="store_true", help="every shl?????? cluster on this machine")
    args = parser.parse_args(argv)

    if args.cmd == "ls":
        for prefix, names in sorted(_clusters().items()):
            print(f"{prefix}: {' '.join(n.removeprefix(prefix + '-') for n in names)}")
        return 0
    if args.cmd == "exec":
        clusters = _clusters()
        if args.prefix:
            prefix = args.prefix
        elif len(clusters) == 1:
            prefix = next(iter(clusters))
        else:
            print(f"netns: {len(clusters)} clusters exist; say which with --prefix ({', '.join(clusters) or 'none'})", file=sys.stderr)
            return 2
        ns = f"{prefix}-{args.host}"
        if ns not in clusters.get(prefix, []):
            print(f"netns: no namespace {ns}", file=sys.stderr)
            return 2
        if not args.argv:
            print("netns: exec needs a command", file=sys.stderr)
            return 2
        os.environ["SHOAL_ADDR"] = f"{SUBNET}.1:{GRPC_PORT}"
        os.execvp("ip", ["ip", "netns", "exec", ns, *args.argv])
    if args.cmd == "down":
        prefixes = list(_clusters()) if args.all else [args.prefix]
        if not args.all and not PREFIX_RE.match(args.prefix):
            print("netns: down needs a run prefix (shl + 6 hex digits) or --all", file=sys.stderr)
            return 2
        left = [x for p in prefixes for x in _down(p)]
        for line in left:
            print(f"left behind: {line}", file=sys.stderr)
        return 1 if left else 0

    # up
    try:
        require_netns()
    except NetnsUnavailable as exc:
        print(f"netns: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    cluster = NetnsCluster(args.n, servers=args.servers, agents=not args.hosts_only, log_level=args.log_level)
    try:
        t0 = time.monotonic()
        cluster.up()
        print(f"cluster {cluster.prefix}: {args.n} hosts up in {time.monotonic() - t0:.1f} s; data and logs in {cluster.root}")
        for h in cluster.hosts:
            print(f"  {h.name}  {h.address}  netns {h.netns}  {'server' if h.server else 'client'}")
        print(f"try:  python -m tests.netns exec h1 {sys.executable} -m shoal get nodes")
        print("Ctrl-C tears it all down.", flush=True)
        reported: set[str] = set()
        while not stop.wait(1.0):
            for h in cluster.hosts:
                if h.proc is not None and h.proc.poll() is not None and h.name not in reported:
                    reported.add(h.name)
                    print(f"note: agent {h.name} exited with {h.proc.returncode}; see {h.log_path}", flush=True)
    finally:
        cluster.close()
        left = leftovers(cluster.prefix, cluster.inodes)
        print(f"cluster {cluster.prefix} removed" + (f"; LEFT BEHIND: {left}" if left else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
