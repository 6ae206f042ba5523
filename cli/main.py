"""The `shoal` command: run an agent, and drive a cluster with kubectl habits.

Every client command talks to `--addr` (or `$SHOAL_ADDR`, default 127.0.0.1:7420) over
the `shoal.v1.Control` API. Errors are one sentence on stderr and exit code 1; a
traceback means a bug in shoal.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Annotated, Any, NoReturn

from shoal.agent.command import route as _route_agent

# `shoal agent ...` starts the agent here, before typer (with rich and pydantic) is
# imported, and exits; any other command, or agent arguments only typer handles
# (--help, a usage error), carry on below. See shoal.agent.command.
_route_agent(__name__)

import typer  # noqa: E402
import yaml  # noqa: E402
from google.protobuf.json_format import MessageToDict  # noqa: E402
from rich.console import Console  # noqa: E402

import shoal  # noqa: E402
from shoal.client import Client, default_addr  # noqa: E402
from shoal.errors import ManifestError, ShoalError  # noqa: E402

__all__ = ["app", "main"]

app = typer.Typer(
    name="shoal",
    help="shoal: a self-contained container orchestrator.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)

Addr = Annotated[str, typer.Option("--addr", envvar="SHOAL_ADDR", help="Server to talk to (host:port).")]
Output = Annotated[str, typer.Option("--output", "-o", help="table (default), wide, yaml or json.")]


def _fail(message: str) -> NoReturn:
    err.print(f"error: {message}", markup=False)
    raise typer.Exit(1)


def _client(addr: str) -> Client:
    return Client(addr or default_addr())


def _age(ts: float, now: float | None = None) -> str:
    if not ts:
        return "<none>"
    s = int(max(0.0, (now or time.time()) - ts))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """kubectl-style columns: upper-case headers, three spaces between columns."""
    grid = [list(headers)] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in grid) for i in range(len(headers))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in grid)


def _bytes(n: int) -> str:
    for unit, size in (("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}{unit}".replace(".0", "")
    return str(n)


def _dump(items: list[Any], output: str) -> None:
    docs = [MessageToDict(i, preserving_proto_field_name=True) for i in items]
    for d in docs:
        if "manifest_json" in d:
            d["manifest"] = json.loads(d.pop("manifest_json"))
    payload: Any = docs[0] if len(docs) == 1 else {"items": docs}
    if output == "json":
        out.print(json.dumps(payload, indent=2, sort_keys=True), markup=False)
    else:
        out.print(yaml.safe_dump(payload, sort_keys=False).rstrip(), markup=False)


def _run(fn: Callable[[], None]) -> None:
    try:
        fn()
    except ManifestError as exc:
        for p in exc.problems:
            err.print(str(p), markup=False)
        err.print(f"error: {len(exc.problems)} problem(s) found; nothing was applied", markup=False)
        raise typer.Exit(1) from None
    except ShoalError as exc:
        _fail(str(exc))


# -- agent ------------------------------------------------------------------------


@app.command()
def agent(
    ctx: typer.Context,
    dev: Annotated[bool, typer.Option("--dev", help="Server and client in one process, loopback only, per-user data dir.")] = False,
    server: Annotated[bool, typer.Option("--server", help="Hold the cluster state and serve the API.")] = False,
    join: Annotated[list[str] | None, typer.Option("--join", help="An agent already in the cluster (HOST[:GOSSIP_PORT]); repeatable.")] = None,
    bootstrap_expect: Annotated[int, typer.Option("--bootstrap-expect", help="With --server: wait for this many servers, then form a new cluster (3 or 5 for fault tolerance).")] = 0,
    bind: Annotated[str, typer.Option("--bind", help="Address to listen on.")] = "127.0.0.1",
    advertise: Annotated[str, typer.Option("--advertise", help="Address other hosts use to reach this one.")] = "",
    grpc_port: Annotated[int, typer.Option("--grpc-port", help="gRPC API port.")] = 7420,
    gossip_port: Annotated[int, typer.Option("--gossip-port", help="Gossip port (UDP and TCP).")] = 7421,
    metrics_port: Annotated[int, typer.Option("--metrics-port", help="Prometheus /metrics port (HTTP); 0 turns it off.")] = 7422,
    data_dir: Annotated[pathlib.Path | None, typer.Option("--data-dir", help="Where state lives (default: per-user).")] = None,
    node_name: Annotated[str, typer.Option("--node-name", help="This host's name in the cluster (default: hostname).")] = "",
    label: Annotated[list[str] | None, typer.Option("--label", help="Node label KEY=VALUE; repeatable.")] = None,
    driver: Annotated[list[str] | None, typer.Option("--driver", help="Runtime drivers to enable (docker, process); repeatable.")] = None,
    scheduler_sample_size: Annotated[int, typer.Option("--scheduler-sample-size", help="Servers: feasible nodes ranked per replica in clusters larger than the sample threshold.")] = 16,
    scheduler_sample_threshold: Annotated[int, typer.Option("--scheduler-sample-threshold", help="Servers: up to this many feasible nodes are ranked in full.")] = 256,
    scheduler_spread_hosts: Annotated[int, typer.Option("--scheduler-spread-hosts", help="Servers: binpack keeps a deployment on at least this many hosts.")] = 3,
    log_json: Annotated[bool, typer.Option("--log-json", help="Logs as JSON lines.")] = False,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error (reloaded on SIGHUP).")] = "info",
    seed: Annotated[int | None, typer.Option("--seed", hidden=True)] = None,
    config: Annotated[pathlib.Path | None, typer.Option("--config", help="Settings file (default: /etc/shoal/agent.yaml if it exists, except with --dev; /dev/null for none); flags win over it.")] = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the effective settings and where each came from, then exit.")] = False,
) -> None:
    """Run the agent on this host (every host runs one)."""
    # The body is shoal.agent.command's, which the command line usually reaches without
    # typer (see the routing at the top of this module).
    from shoal import config as settings_file
    from shoal.agent.command import Invocation, run

    # Only what was typed counts as a flag; the rest may come from the file. (Sources are
    # compared by name: typer vendors click, and its enum has no stable import path.)
    given = {
        key.param: ctx.params[key.param]
        for key in settings_file.KEYS
        if getattr(ctx.get_parameter_source(key.param), "name", "") in ("COMMANDLINE", "ENVIRONMENT", "PROMPT")
    }
    status = run(Invocation(given=given, config=config, print_config=print_config))
    if status:
        raise typer.Exit(status)


# -- apply / delete ---------------------------------------------------------------


def _read_documents(files: list[str]) -> list[tuple[str, str]]:
    """Validate locally (every problem at once, no round trip), then send the texts."""
    from shoal.manifest import load_paths

    docs = load_paths(files, stdin=sys.stdin)
    texts: dict[str, str] = {}
    for d in docs:
        if d.source not in texts:
            texts[d.source] = ""
        texts[d.source] += "---\n" + json.dumps(d.raw, ensure_ascii=False) + "\n"
    return list(texts.items())


@app.command()
def apply(
    filename: Annotated[list[str], typer.Option("--filename", "-f", help="File, directory or - for stdin; repeatable.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and show what would change.")] = False,
    addr: Addr = "",
) -> None:
    """Create or update the objects in manifests (all or nothing)."""

    def go() -> None:
        docs = _read_documents(filename)
        with _client(addr) as c:
            resp = c.apply(docs, dry_run=dry_run)
        for o in resp.objects:
            suffix = " (dry run)" if dry_run else ""
            out.print(f"{o.kind.lower()}/{o.name} {o.action}{suffix}", markup=False)

    _run(go)


@app.command()
def plan(
    filename: Annotated[list[str], typer.Option("--filename", "-f", help="File, directory or - for stdin; repeatable.")],
    output: Output = "",
    addr: Addr = "",
) -> None:
    """Show where applying these manifests would place replicas, and what would not fit
    and why. Changes nothing."""

    def go() -> None:
        docs = _read_documents(filename)
        with _client(addr) as c:
            resp = c.plan(docs)
        if output in ("yaml", "json"):
            _dump([resp], output)
            return
        for o in resp.objects:
            out.print(f"{o.kind.lower()}/{o.name} would be {o.action}", markup=False)
        if resp.placements:
            rows = [[p.deployment, p.replica, p.node, p.host_port or "-"] for p in resp.placements]
            out.print(_table(["DEPLOYMENT", "REPLICA", "NODE", "HOST PORT"], rows), markup=False)
        for u in resp.unplaced:
            out.print(f"deployment/{u.deployment}: {u.placed} placed, the rest does not fit: {u.reason}", markup=False)
        if not resp.placements and not resp.unplaced:
            out.print("no new placements", markup=False)

    _run(go)


@app.command()
def delete(
    kind: Annotated[str, typer.Argument(help="deployment or service (or TYPE/NAME).")] = "",
    name: Annotated[str, typer.Argument()] = "",
    filename: Annotated[list[str] | None, typer.Option("--filename", "-f", help="Delete what these manifests define.")] = None,
    addr: Addr = "",
) -> None:
    """Delete deployments and services, by name or by manifest."""

    def go() -> None:
        targets: list[tuple[str, str]] = []
        if filename:
            from shoal.manifest import load_paths

            targets = [(d.kind, d.name) for d in load_paths(filename, stdin=sys.stdin)]
        else:
            k, n = _split_ref(kind, name)
            targets = [(k, n)]
        with _client(addr) as c:
            for k, n in targets:
                c.delete(k, n)
                out.print(f"{k.lower().rstrip('s')}/{n} deleted", markup=False)

    _run(go)


def _split_ref(kind: str, name: str) -> tuple[str, str]:
    if "/" in kind and not name:
        kind, name = kind.split("/", 1)
    if not kind or not name:
        _fail("name the object: TYPE NAME or TYPE/NAME (or use -f FILE)")
    return kind, name


@app.command()
def scale(
    ref: Annotated[str, typer.Argument(help="deployment/NAME")],
    replicas: Annotated[int, typer.Option("--replicas", help="How many replicas.")],
    addr: Addr = "",
) -> None:
    """Set a deployment's replica count."""

    def go() -> None:
        kind, name = _split_ref(ref, "")
        if kind.lower() not in ("deployment", "deployments", "deploy"):
            _fail(f'only deployments scale, not "{kind}"')
        with _client(addr) as c:
            resp = c.scale(name, replicas)
        out.print(f"deployment/{resp.deployment} scaled to {resp.replicas}", markup=False)

    _run(go)


# -- reads ------------------------------------------------------------------------


@app.command()
def get(
    kind: Annotated[str, typer.Argument(help="deployments, services, pods, endpoints, nodes, events or servers.")],
    name: Annotated[str, typer.Argument()] = "",
    output: Output = "",
    addr: Addr = "",
) -> None:
    """List objects, or show one."""

    def go() -> None:
        k, n = (kind.split("/", 1) if "/" in kind and not name else (kind, name))
        if k.lower() in ("servers", "server"):
            _print_servers(addr, n, output)
            return
        with _client(addr) as c:
            resp = c.get(k, n)
        _print_get(resp, output)

    _run(go)


def _print_get(resp: Any, output: str) -> None:
    wide = output == "wide"
    for field_name in ("deployments", "services", "pods", "endpoints", "nodes", "events"):
        items = list(getattr(resp, field_name))
        if output in ("yaml", "json"):
            if items or field_name == "events":
                pass
            if items:
                _dump(items, output)
                return
            continue
        if not items:
            continue
        now = time.time()
        if field_name == "deployments":
            headers = ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"] + (["IMAGE", "DRIVER", "CONDITIONS"] if wide else [])
            rows = [[d.name, f"{d.ready}/{d.replicas}", d.updated, d.ready, _age(d.created_at, now)]
                    + ([d.image, d.driver, "; ".join(d.conditions)] if wide else []) for d in items]
        elif field_name == "services":
            headers = ["NAME", "TYPE", "PORTS", "ENDPOINTS", "ALGORITHM", "AGE"] + (["SELECTOR"] if wide else [])
            rows = [[s.name, s.type, ",".join(f"{p.port}{':' + str(p.node_port) if p.node_port else ''}/{p.protocol}" for p in s.ports),
                     s.endpoints, s.algorithm, _age(s.created_at, now)]
                    + ([",".join(f"{k}={v}" for k, v in sorted(s.selector.items()))] if wide else []) for s in items]
        elif field_name == "pods":
            headers = ["NAME", "READY", "STATUS", "RESTARTS", "AGE"] + (["NODE", "ENDPOINT", "CONTAINER", "MESSAGE"] if wide else [])
            rows = [[p.name, "1/1" if p.ready else "0/1", p.phase, p.restarts, _age(p.created_at, now)]
                    + ([p.node or "<none>", f"{p.host_ip}:{p.host_port}" if p.host_port else "<none>", p.container_id[:12] or "<none>", p.message] if wide else [])
                    for p in items]
        elif field_name == "endpoints":
            headers = ["NAME", "ENDPOINTS", "ALGORITHM", "VERSION"]
            rows = [[t.service, ",".join(f"{e.address}:{e.port}" for e in t.endpoints) or "<none>", t.algorithm, t.version] for t in items]
        elif field_name == "nodes":
            headers = ["NAME", "STATUS", "ROLE", "ADDRESS", "CPU", "MEMORY", "PODS", "AGE"] + (
                ["CPU USED", "MEMORY USED", "DISK USED"] if wide else [])
            rows = [[n.name, n.status + (",SchedulingDisabled" if n.cordoned else "") + (",Draining" if n.draining else ""),
                     n.role, n.address,
                     f"{n.allocated.cpu_millis}m/{n.capacity.cpu_millis}m",
                     f"{_bytes(n.allocated.memory_bytes)}/{_bytes(n.capacity.memory_bytes)}", n.pods, _age(n.last_seen, now)]
                    + ([f"{n.usage.cpu_percent:.0f}%", _bytes(n.usage.memory_used_bytes),
                        f"{_bytes(n.usage.disk_used_bytes)}/{_bytes(n.usage.disk_total_bytes)}"] if wide else [])
                    for n in items]
        else:
            headers = ["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]
            rows = [[_age(e.time, now), e.type, e.reason, e.object, e.message] for e in items]
        out.print(_table(headers, rows), markup=False)
        return
    if output not in ("yaml", "json"):
        err.print("No resources found.", markup=False)


@app.command()
def describe(
    kind: Annotated[str, typer.Argument(help="deployment, service, pod or node (or TYPE/NAME).")],
    name: Annotated[str, typer.Argument()] = "",
    addr: Addr = "",
) -> None:
    """Show one object in detail, with its recent events."""

    def go() -> None:
        k, n = _split_ref(kind, name)
        with _client(addr) as c:
            resp = c.get(k, n)
            items = [i for f in ("deployments", "services", "pods", "endpoints", "nodes") for i in getattr(resp, f)]
            _dump(items, "yaml")
            prefix = {"deployments": "deployment", "services": "service", "pods": "pod", "nodes": "node"}
            kind_name = next((prefix[f] for f in prefix if getattr(resp, f)), "")
            events = [e for e in c.events() if e.object == f"{kind_name}/{n}"]
        out.print("events:", markup=False)
        now = time.time()
        if events:
            out.print(_table(["LAST SEEN", "TYPE", "REASON", "MESSAGE"], [[_age(e.time, now), e.type, e.reason, e.message] for e in events[-20:]]), markup=False)
        else:
            out.print("  <none>", markup=False)

    _run(go)


@app.command()
def logs(
    pod: Annotated[str, typer.Argument(help="Pod name (see shoal get pods).")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming new output.")] = False,
    tail: Annotated[int, typer.Option("--tail", help="Only the last N lines (0: all).")] = 0,
    addr: Addr = "",
) -> None:
    """Print a pod's output."""

    def go() -> None:
        with _client(addr) as c:
            try:
                for chunk in c.logs(pod, follow=follow, tail=tail):
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
            except KeyboardInterrupt:
                pass

    _run(go)


@app.command()
def events(
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Keep printing new events.")] = False,
    addr: Addr = "",
) -> None:
    """Show cluster events, oldest first."""

    def go() -> None:
        with _client(addr) as c:
            stream = c.events(follow=watch)
            headers = ["TIME", "TYPE", "REASON", "OBJECT", "MESSAGE"]
            if not watch:
                rows = [[time.strftime("%H:%M:%S", time.localtime(e.time)), e.type, e.reason, e.object, e.message] for e in stream]
                out.print(_table(headers, rows) if rows else "No events.", markup=False)
                return
            try:
                for e in stream:
                    out.print(f"{time.strftime('%H:%M:%S', time.localtime(e.time))}  {e.type:<7}  {e.reason:<16}  {e.object}  {e.message}", markup=False)
            except KeyboardInterrupt:
                pass

    _run(go)


@app.command()
def members(
    output: Output = "",
    addr: Addr = "",
) -> None:
    """Show the gossip membership: every agent, its role and state."""

    def go() -> None:
        with _client(addr) as c:
            resp = c.members()
        items = list(resp.members)
        if output in ("yaml", "json"):
            _dump(items, output)
            return
        rows = [[m.name, m.address, m.role, m.state, m.incarnation,
                 "-" if m.heard_ago < 0 else f"{m.heard_ago:.1f}s"] for m in items]
        out.print(_table(["NAME", "ADDRESS", "ROLE", "STATE", "INCARNATION", "LAST HEARD"], rows), markup=False)

    _run(go)


def _print_servers(addr: str, name: str, output: str) -> None:
    with _client(addr) as c:
        items = list(c.servers().servers)
    if name:
        items = [s for s in items if name in (s.name, s.address, str(s.id))]
        if not items:
            _fail(f'server "{name}" not found')
    if output in ("yaml", "json"):
        _dump(items, output)
        return
    rows = [[s.name or "-", s.id, s.address, s.role, s.suffrage or "-", s.term, s.commit, s.applied,
             "-" if s.lag < 0 else s.lag] for s in items]
    out.print(_table(["NAME", "ID", "ADDRESS", "ROLE", "SUFFRAGE", "TERM", "COMMIT", "APPLIED", "LAG"], rows),
              markup=False)


@app.command()
def top(
    what: Annotated[str, typer.Argument(help="nodes or services.")] = "nodes",
    output: Output = "",
    interval: Annotated[float, typer.Option("--interval", help="Seconds between refreshes.")] = 1.0,
    addr: Addr = "",
) -> None:
    """Live figures from every agent's metrics: nodes (CPU, memory, disk, network,
    replicas) or services (connections/s, bytes/s, errors, retries, time to first byte).
    -o json prints one snapshot (rates over one interval)."""
    from rich.live import Live
    from rich.text import Text

    from shoal.cli.top import node_rows, scrape_all, service_rows

    if what not in ("nodes", "services", "node", "service", "no", "svc"):
        _fail(f'cannot top "{what}"; use nodes or services')
    services = what in ("services", "service", "svc")

    def snapshot(before: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        with _client(addr) as c:
            nodes = list(c.get("nodes").nodes)
        now = scrape_all(nodes, time.monotonic())
        rows = service_rows(before, now) if services else node_rows(before, now)
        return {s.node: s for s in now}, rows

    def render(rows: list[dict[str, Any]]) -> str:
        if services:
            headers = ["SERVICE", "CONN/S", "ACTIVE", "IN/S", "OUT/S", "ERR/S", "RETRY/S", "TTFB P50", "TTFB P99",
                       "ENDPOINTS", "TABLE"]
            body = [[r["service"], f"{r['connections_per_second']:.1f}", f"{r['active_connections']:.0f}",
                     _bytes(int(r["bytes_in_per_second"])), _bytes(int(r["bytes_out_per_second"])),
                     f"{r['errors_per_second']:.1f}", f"{r['retries_per_second']:.1f}",
                     _ms(r["first_byte_p50_seconds"]), _ms(r["first_byte_p99_seconds"]),
                     f"{r['endpoints']:.0f}", f"v{r['table_version']:.0f}"] for r in rows]
        else:
            headers = ["NODE", "STATUS", "CPU", "MEMORY", "DISK", "NET RX/S", "NET TX/S", "REPLICAS", "CONNS"]
            body = [[r["node"], r["status"] if r["reachable"] else f"{r['status']} (no metrics)",
                     f"{r['cpu_percent']:.0f}%",
                     f"{_bytes(int(r['memory_used_bytes']))}/{_bytes(int(r['memory_total_bytes']))}",
                     f"{_bytes(int(r['disk_used_bytes']))}/{_bytes(int(r['disk_total_bytes']))}",
                     _bytes(int(r["network_receive_bytes_per_second"])), _bytes(int(r["network_transmit_bytes_per_second"])),
                     f"{r['replicas_ready']:.0f}/{r['replicas']:.0f}", f"{r['active_connections']:.0f}"] for r in rows]
        return _table(headers, body)

    def go() -> None:
        before, _ = snapshot({})
        if output in ("json", "yaml"):
            time.sleep(interval)
            _, rows = snapshot(before)
            text = json.dumps(rows, indent=2) if output == "json" else yaml.safe_dump(rows, sort_keys=False)
            out.print(text, markup=False, highlight=False)
            return
        with Live(Text(render([])), console=out, refresh_per_second=4, transient=False) as live:
            while True:
                time.sleep(interval)
                before, rows = snapshot(before)
                live.update(Text(render(rows)))

    try:
        _run(go)
    except KeyboardInterrupt:
        pass


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}ms"


node_app = typer.Typer(help="Take nodes out of scheduling, move their replicas away, or put them back.",
                       no_args_is_help=True)
app.add_typer(node_app, name="node")


@node_app.command("cordon")
def node_cordon(name: Annotated[str, typer.Argument(help="Node name.")], addr: Addr = "") -> None:
    """The node keeps what it runs but takes no new replicas."""

    def go() -> None:
        with _client(addr) as c:
            c.cordon(name)
        out.print(f"node/{name} cordoned", markup=False)

    _run(go)


@node_app.command("uncordon")
def node_uncordon(name: Annotated[str, typer.Argument(help="Node name.")], addr: Addr = "") -> None:
    """The node takes new replicas again (and a drain in progress stops)."""

    def go() -> None:
        with _client(addr) as c:
            c.cordon(name, cordon=False)
        out.print(f"node/{name} uncordoned", markup=False)

    _run(go)


@node_app.command("drain")
def node_drain(
    name: Annotated[str, typer.Argument(help="Node name.")],
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the node to empty.")] = 300.0,
    addr: Addr = "",
) -> None:
    """Cordon the node and move its replicas to others, each leaving once its
    replacements are ready; waits until the node runs nothing."""

    def go() -> None:
        deadline = time.monotonic() + timeout
        with _client(addr) as c:
            left = c.cordon(name, drain=True).replicas
            while left:
                if time.monotonic() > deadline:
                    _fail(f"node/{name} still runs {left} replica(s) after {timeout:.0f}s; it stays cordoned "
                          "(see shoal get pods -o wide and shoal events)")
                time.sleep(0.5)
                left = sum(1 for p in c.get("pods").pods if p.node == name)
        out.print(f"node/{name} drained", markup=False)

    _run(go)


server_app = typer.Typer(help="Add or remove Raft servers (see: shoal get servers).", no_args_is_help=True)
app.add_typer(server_app, name="server")


@server_app.command("add")
def server_add(
    address: Annotated[str, typer.Argument(help="The new server's gRPC address, HOST:PORT (its agent runs with --server).")],
    addr: Addr = "",
) -> None:
    """Add a server: it joins as a learner and votes once it has caught up."""

    def go() -> None:
        with _client(addr) as c:
            resp = c.add_server(address)
        out.print(f"server {resp.id} at {address} added to cluster {resp.cluster}", markup=False)

    _run(go)


@server_app.command("remove")
def server_remove(
    server: Annotated[str, typer.Argument(help="The server's name, address or id (see: shoal get servers).")],
    addr: Addr = "",
) -> None:
    """Remove a server from the cluster (a dead one, or one being retired)."""

    def go() -> None:
        with _client(addr) as c:
            resp = c.remove_server(server)
        out.print(f"server {resp.id} removed", markup=False)

    _run(go)


@app.command()
def version() -> None:
    """Print shoal's version."""
    out.print(f"shoal {shoal.__version__}", markup=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
