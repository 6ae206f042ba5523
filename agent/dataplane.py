"""The kernel data plane: nftables rules that DNAT a service's ports to its endpoints.

A Service annotated `shoal.io/dataplane: kernel` is carried by the host's kernel instead
of the agent's userspace proxy: every agent programs the same rules, so any host's
address answers on the service's ports (the routing mesh), without a copy through
userspace.

Rules
-----
- The agent owns one nftables table, `ip shoal`, and touches no other (one agent per
  network namespace, as one proxy per host).
- Every change rebuilds that table whole in one `nft -f -` transaction (`table ip
  shoal; delete table ip shoal; table ip shoal {...}`), so the kernel swaps rule sets
  atomically: a new connection meets the old rules or the new ones, never a mixture.
  A rule set equal to the one applied last is not applied again, so round robin keeps
  counting across table updates that change nothing here.
- Round robin is `numgen inc mod N` — the seed's S = (R mod N) + 1, counted from 0 in
  the kernel — and random is `numgen random mod N`; nothing else is expressible (the
  manifest refuses other algorithms with this data plane). One rule per port sits in a
  regular chain that both `prerouting` (clients on other hosts) and `output` (clients on
  this host) jump to, so a port has one counter whoever connects. NAT chains see only a
  connection's first packet: the counter counts connections, like the proxy's picker.
- Only connections addressed to this host are taken (`fib daddr type local`, or `ip
  daddr A` when the proxy is told to bind one address A): the ports the proxy would have
  served. Connections this host makes to other hosts are never touched.
- DNATed connections that leave the host (to an endpoint on another host) are
  masqueraded, so the endpoint answers through this host and conntrack can undo the DNAT
  (kube-proxy does the same). Connections to an endpoint on this host keep their
  client's address.
- With an endpoint on another host the kernel must forward (`net.ipv4.ip_forward`), and
  a client on this host connecting to 127.0.0.1 must be routable off the host
  (`net.ipv4.conf.all.route_localnet`). The agent turns on what is off and puts both back
  when it no longer needs them (no kernel rules left, or the agent stops). Meanwhile the
  table drops packets from the wire addressed to 127.0.0.0/8, which is what the kernel
  does by itself with `route_localnet` off, so the sysctl exposes nothing.
- A port whose table has no endpoint gets no rule: the connection reaches this host's
  own port, where nothing listens (the proxy leaves kernel ports alone), and is refused
  at once instead of hanging on a black hole.
- Ports: first come, first served in table order, whatever the data plane, exactly as
  the proxy does; a kernel service that loses a port is told by an event.
- The table is removed when the agent stops, and at start, where it is what a crashed
  agent left behind. Where nftables is not usable (no `nft`, no permission, a kernel
  without nf_tables) or a rule set is refused, each kernel service gets one Warning
  event and the userspace proxy carries it instead.

How it works
------------
`plan()` decides, from the tables alone, which ports the kernel carries and with what;
`render()` turns a plan into the `nft -f -` text. Both are pure and tested without root.
`KernelDataPlane` is the shell: it probes nftables at start, applies rendered rule sets,
sets the sysctls, reports through `on_event`, and tells the proxy which ports it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import subprocess
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from shoal.model import KERNEL_ALGORITHMS, Algorithm, DataPlane

__all__ = [
    "KernelPort",
    "Plan",
    "plan",
    "render",
    "remote_endpoints",
    "KernelDataPlane",
    "run_nft",
    "TABLE",
    "FORWARDING_SYSCTLS",
]

TABLE = "shoal"

# What an endpoint on another host needs: forwarding for clients on other hosts, and
# route_localnet for clients on this host that connect to 127.0.0.1.
FORWARDING_SYSCTLS = ("net/ipv4/ip_forward", "net/ipv4/conf/all/route_localnet")

# `nft` answers in milliseconds; 5 s bounds a wedged one without giving up on a loaded host.
NFT_TIMEOUT = 5.0

NftRunner = Callable[[str], Awaitable[tuple[bool, str]]]


@dataclass(frozen=True, slots=True, kw_only=True)
class KernelPort:
    """One port the kernel carries: connections to it go to `endpoints` (address, port)."""

    service: str
    port: int
    algorithm: Algorithm
    endpoints: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """What the kernel carries, and what it cannot.

    `ports`: the ports taken, in port order (one with no endpoints is taken all the
    same: nothing may listen on it). `fallback`: (service, reason) for kernel services
    the proxy must carry. `conflicts`: (service, port, holder) for kernel ports another
    service holds.
    """

    ports: tuple[KernelPort, ...] = ()
    fallback: tuple[tuple[str, str], ...] = ()
    conflicts: tuple[tuple[str, int, str], ...] = ()

    @property
    def taken(self) -> frozenset[int]:
        return frozenset(p.port for p in self.ports)

    @property
    def services(self) -> tuple[str, ...]:
        return tuple(sorted({p.service for p in self.ports}))


def plan(tables: Iterable[Any]) -> Plan:
    """The kernel's share of a full set of tables (shoal.v1.Table messages)."""
    holder: dict[int, str] = {}
    ports: list[KernelPort] = []
    fallback: list[tuple[str, str]] = []
    conflicts: list[tuple[str, int, str]] = []
    for t in tables:
        kernel = t.dataplane == DataPlane.KERNEL.value
        why = _unsupported(t) if kernel else ""
        if why:
            fallback.append((t.service, why))
            kernel = False
        endpoints = tuple((e.address, int(e.port)) for e in t.endpoints)
        for p in t.ports:
            for port in (p.port, p.node_port):
                if not port:
                    continue
                if port in holder:
                    if kernel and holder[port] != t.service:
                        conflicts.append((t.service, port, holder[port]))
                    continue
                holder[port] = t.service
                if kernel:
                    ports.append(KernelPort(service=t.service, port=port, algorithm=Algorithm(t.algorithm),
                                            endpoints=endpoints))
    return Plan(ports=tuple(sorted(ports, key=lambda p: p.port)), fallback=tuple(fallback),
                conflicts=tuple(conflicts))


def _unsupported(t: Any) -> str:
    """Why a kernel table cannot be carried by the kernel ("" when it can)."""
    try:
        algorithm = Algorithm(t.algorithm)
    except ValueError:
        return f"unknown algorithm {t.algorithm!r}"
    if algorithm not in KERNEL_ALGORITHMS:
        # The manifest refuses this; a table from an older leader may still say it.
        return f"nftables cannot balance with {algorithm.value}"
    for p in t.ports:
        if (p.protocol or "TCP") != "TCP":
            return f"port {p.port} is {p.protocol}; the kernel data plane carries TCP"
    for e in t.endpoints:
        if not _is_ipv4(e.address):
            return f"endpoint {e.pod} has address {e.address!r}, not an IPv4 address nftables can DNAT to"
    return ""


def _is_ipv4(address: str) -> bool:
    try:
        ipaddress.IPv4Address(address)
    except ValueError:
        return False
    return True


def render(p: Plan, *, daddr: str | None = None, guard: bool = False, table: str = TABLE) -> str:
    """The `nft -f -` text that makes the kernel carry `p`, replacing whatever `table`
    held; with no rule to write, the text just removes the table.

    `daddr`: the one address the ports answer on, or None for every local address.
    `guard`: drop packets from the wire addressed to 127.0.0.0/8 (wanted while
    `route_localnet` is on, for endpoints on other hosts; it costs every packet a rule).
    """
    lines = [f"table ip {table}", f"delete table ip {table}"]
    rules = [_dnat(kp) for kp in p.ports if kp.endpoints]
    if not rules:
        return "\n".join(lines) + "\n"
    local = f"ip daddr {daddr}" if daddr else "fib daddr type local"
    ports = ", ".join(str(kp.port) for kp in p.ports if kp.endpoints)
    lines += [
        f"table ip {table} {{",
        "\tchain services {",
        *(f"\t\t{r}" for r in rules),
        "\t}",
        "\tchain prerouting {",
        "\t\ttype nat hook prerouting priority dstnat; policy accept;",
        f"\t\t{local} jump services",
        "\t}",
        "\tchain output {",
        # nft 1.0 has no symbolic `dstnat` for the output hook; -100 is its value.
        "\t\ttype nat hook output priority -100; policy accept;",
        f"\t\t{local} jump services",
        "\t}",
        "\tchain postrouting {",
        "\t\ttype nat hook postrouting priority srcnat; policy accept;",
        f'\t\tct status dnat meta l4proto tcp ct original proto-dst {{ {ports} }} oifname != "lo" masquerade',
        "\t}",
    ]
    if guard:
        lines += [
            "\tchain guard {",
            # Before conntrack (raw), so a reply on its way back to a 127.0.0.1 client
            # still carries this host's address here and passes.
            "\t\ttype filter hook prerouting priority raw; policy accept;",
            '\t\tiifname != "lo" ip daddr 127.0.0.0/8 drop',
            "\t}",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dnat(kp: KernelPort) -> str:
    gen = "inc" if kp.algorithm is Algorithm.ROUND_ROBIN else "random"
    targets = ", ".join(f"{i} : {a} . {port}" for i, (a, port) in enumerate(kp.endpoints))
    return (f"tcp dport {kp.port} dnat ip to numgen {gen} mod {len(kp.endpoints)} map {{ {targets} }}"
            f' comment "service/{kp.service} port {kp.port}"')


def remote_endpoints(p: Plan, local_addresses: Iterable[str]) -> bool:
    """Whether some endpoint of `p` is on another host (so the kernel must forward)."""
    local = set(local_addresses)
    return any(a not in local and not a.startswith("127.") for kp in p.ports for a, _ in kp.endpoints)


async def run_nft(script: str, *, argv: Sequence[str] = ("nft",), timeout: float = NFT_TIMEOUT) -> tuple[bool, str]:
    """Run `nft -f -` (`argv` + `-f -`) with `script`: (True, output) or (False, why not).

    A blocking `subprocess.run` in a worker thread, not the event loop's subprocess
    transports: uvloop's stdin pipe has been seen to close under `communicate()` while
    the process driver's children come and go, and a rule set must not depend on that.
    """
    nft = argv[-1]

    def run() -> tuple[bool, str]:
        try:
            proc = subprocess.run([*argv, "-f", "-"], input=script, capture_output=True, text=True,
                                  timeout=timeout, errors="replace")
        except OSError as exc:
            return False, f"{nft}: {exc.strerror or exc}"
        except subprocess.TimeoutExpired:
            return False, f"{nft} did not answer within {timeout:g} s"
        if proc.returncode != 0:
            text = proc.stderr.strip() or f"exit status {proc.returncode}"
            return False, " ".join(text.split())[:300]
        return True, proc.stdout

    return await asyncio.to_thread(run)


def _local_ipv4() -> set[str]:
    import psutil

    return {a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET}


class _ProcSysctl:
    """`net/ipv4/ip_forward` → /proc/sys/net/ipv4/ip_forward (this network namespace's)."""

    def read(self, name: str) -> str:
        return (Path("/proc/sys") / name).read_text().strip()

    def write(self, name: str, value: str) -> None:
        (Path("/proc/sys") / name).write_text(value + "\n")


class KernelDataPlane:
    """The shell around `plan` and `render`: applies rule sets with `nft` and says which
    ports it took. `start()` before the first `update()`, `close()` at the end."""

    def __init__(
        self,
        *,
        bind_host: str = "0.0.0.0",
        table: str = TABLE,
        runner: NftRunner | None = None,
        sysctl: Any = None,
        local_addresses: Callable[[], Iterable[str]] = _local_ipv4,
        on_event: Callable[[str, str, str, str], None] | None = None,
        logger: Any = None,
    ) -> None:
        self.table = table
        self._daddr = bind_host if _is_ipv4(bind_host) and bind_host != "0.0.0.0" else None
        self._run = runner or run_nft
        self._sysctl = sysctl or _ProcSysctl()
        self._local_addresses = local_addresses
        self._on_event = on_event or (lambda *_: None)
        self._log = logger or structlog.get_logger("shoal.dataplane")
        self.usable: bool | None = None  # None until start() has probed
        self.unusable_reason = ""
        self.applied: str | None = None  # the text applied last; None: unknown
        self.taken: frozenset[int] = frozenset()
        self._restore: dict[str, str] = {}  # sysctl → the value it had before we set it
        self._reported: dict[tuple[str, str], str] = {}  # (service, reason) → message
        self._forward_checked = False

    async def start(self) -> None:
        """Probe nftables (a read) and remove what a previous agent left: a crash leaves
        its table behind. Without a leftover nothing is written."""
        ok, out = await self._run("list tables ip\n")
        if ok and f"table ip {self.table}" in out.splitlines():
            ok, out = await self._run(self._remove_text())
            if ok:
                self._log.info("dataplane.leftover_removed", table=f"ip {self.table}")
        self.usable = ok
        self.unusable_reason = "" if ok else out
        if ok:
            self.applied = self._remove_text()
            self._log.info("dataplane.ready", table=f"ip {self.table}")
        else:
            self._log.info("dataplane.unusable", reason=out)

    async def update(self, tables: Iterable[Any]) -> frozenset[int]:
        """Follow a full set of tables; return the ports the kernel now carries (the
        proxy carries every other one)."""
        try:
            return await self._update(list(tables))
        except Exception as exc:  # a bug here must not cost the services their proxy
            self._log.error("dataplane.update_failed", error=repr(exc))
            self.applied = None  # unknown now: the next update applies whatever it renders
            self.taken = frozenset()
            return self.taken

    async def _update(self, tables: list[Any]) -> frozenset[int]:
        p = plan(tables)
        current: dict[tuple[str, str], str] = {}
        for service, why in p.fallback:
            current[service, "DataPlaneFallback"] = (
                f"kernel data plane cannot carry this service ({why}): the proxy carries it")
        for service, port, holder in p.conflicts:
            current[service, f"PortInUse:{port}"] = f"port {port} is already used by service {holder}"
        if p.ports and self.usable is None:
            await self.start()
        if p.ports and not self.usable:
            for service in p.services:
                current[service, "DataPlaneFallback"] = (
                    f"nftables is not usable on this host ({self.unusable_reason}): the proxy carries this service")
            p = Plan()
        elif p.ports:
            why = self._forwarding(p)
            if why:
                for service in p.services:
                    current[service, "DataPlaneFallback"] = f"{why}: the proxy carries this service"
                p = Plan()
        remote = remote_endpoints(p, self._local_addresses())
        text = render(p, daddr=self._daddr, guard=remote, table=self.table)
        if text != self.applied and (p.ports or self.usable):
            ok, out = await self._run(text)
            if ok:
                self.applied = text
                self._log.info("dataplane.applied", ports=sorted(p.taken), services=list(p.services))
            else:
                self._log.warning("dataplane.refused", error=out)
                for service in p.services:
                    current[service, "DataPlaneFallback"] = (
                        f"nftables refused the rules ({out}): the proxy carries this service")
                p = Plan()
                # The previous rules would still take the connections the proxy now serves.
                removed, _ = await self._run(self._remove_text())
                self.applied = self._remove_text() if removed else None
        if not p.ports:
            self._put_back_sysctls()
        elif remote and not self._forward_checked:
            self._forward_checked = True
            await self._check_forward_policy(p, current)
        for service in p.services:
            ports = ", ".join(str(kp.port) for kp in p.ports if kp.service == service)
            current[service, "KernelDataPlane"] = f"kernel data plane (nftables) carries port(s) {ports}"
        self._report(current)
        self.taken = p.taken
        return self.taken

    def _forwarding(self, p: Plan) -> str:
        """Turn on the sysctls endpoints on other hosts need; why not, if they cannot be."""
        if not remote_endpoints(p, self._local_addresses()):
            return ""
        for name in FORWARDING_SYSCTLS:
            try:
                before = self._sysctl.read(name)
                if before != "1":
                    self._sysctl.write(name, "1")
                    self._restore.setdefault(name, before)
                    self._log.info("dataplane.sysctl_set", name=name, value=1, was=before)
            except OSError as exc:
                return f"cannot set {name.replace('/', '.')}=1 for endpoints on other hosts ({exc.strerror or exc})"
        return ""

    def _put_back_sysctls(self) -> None:
        for name, value in list(self._restore.items()):
            with contextlib.suppress(OSError):
                if self._sysctl.read(name) == "1":
                    self._sysctl.write(name, value)
                    self._log.info("dataplane.sysctl_restored", name=name, value=value)
            del self._restore[name]

    async def _check_forward_policy(self, p: Plan, current: dict[tuple[str, str], str]) -> None:
        # Docker sets the iptables FORWARD policy to drop; a drop there wins over any
        # accept of ours, so forwarded connections would vanish without a word.
        ok, out = await self._run("list chain ip filter FORWARD\n")
        if ok and "policy drop" in out:
            for service in p.services:
                current[service, "ForwardDropped"] = (
                    "this host's ip filter FORWARD chain drops by default (as Docker sets it): connections from "
                    "other hosts to endpoints on other hosts are dropped unless accepted there, e.g. "
                    "iptables -I DOCKER-USER -m conntrack --ctstate DNAT -j ACCEPT")

    def _report(self, current: dict[tuple[str, str], str]) -> None:
        """One event per condition when it starts to hold (or its message changes); a
        condition that ends is forgotten, so it is told again if it comes back."""
        for key, message in sorted(current.items()):
            if self._reported.get(key) == message:
                continue
            service, reason = key
            reason = reason.split(":")[0]
            if reason == "KernelDataPlane":
                self._log.info("dataplane.carrying", service=service, message=message)
                self._on_event("Normal", reason, f"service/{service}", message)
            else:
                self._log.warning("dataplane.warning", service=service, reason=reason, message=message)
                self._on_event("Warning", reason, f"service/{service}", message)
        self._reported = current

    async def close(self) -> None:
        """Remove the table (and put back the sysctls this agent turned on)."""
        if self.usable and self.applied != self._remove_text():
            ok, out = await self._run(self._remove_text())
            if not ok:
                self._log.warning("dataplane.remove_failed", error=out)
            self.applied = self._remove_text() if ok else None
        self._put_back_sysctls()
        self.taken = frozenset()

    def _remove_text(self) -> str:
        return render(Plan(), table=self.table)
