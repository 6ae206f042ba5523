"""The scheduler core: turns placement requests into node assignments, with no I/O.

The leader hands `Scheduler.schedule` a snapshot of the nodes (what they offer, what is
already reserved on them) and a batch of replicas to place; it gets back a `Plan`: one
`Assignment` (node and host port) per placed replica and one `Unplaced` (with a sentence
saying why) per replica that fits nowhere. Nothing here reads a clock, touches the
network or uses the global `random`: the same inputs and the same seeded `rng` give the
same plan, which is what lets a test replay a failure and a `shoal plan` dry run show
exactly what the real run would do.

Rules
- A node is *feasible* for a replica when every filter passes, in this order (the order
  of `FILTERS`): the node is ready, it is not cordoned, its labels match the replica's
  nodeSelector, its free CPU covers the request, its free memory covers the request, and
  (when the replica publishes a port) a host port in `SchedulerConfig.port_range` is
  free on it.
- Among feasible nodes the highest score wins. The score is the placement score after
  the replica is added (`binpack_score`: fullest first, so few nodes are used; or
  `spread_score`: emptiest first) minus `colocation_penalty` once the node holds its
  share of the deployment: ⌈n / spread_hosts⌉ of an n-replica deployment (Nomad's job
  anti-affinity, with a free share). So three replicas on three equal nodes land on
  three hosts, twelve that fit four to a host fill three hosts under binpack (not one,
  not five), and binpack still stacks them when there are fewer nodes than that. Exact
  ties are broken by the injected rng.
- Replicas are placed one of each deployment per round (see `SchedulerConfig.interleave`)
  and reported in request order.
- A batch is consistent: every placement reserves its CPU, memory and host port in the
  working state before the next replica is placed, so one `schedule` call never
  overcommits a node or hands one port out twice, and never changes its input.
- A replica that fits nowhere gets an explanation aggregated over every node, the way
  swarmkit does it: each node is counted under the first filter that rejects it, e.g.
  ``0/3 nodes are available: insufficient memory on 2 nodes (needs 512Mi, largest free
  256Mi), 1 node cordoned``.

How it works
- The nodes are copied into column arrays (`_State`): free CPU, free memory, free port
  count, per-deployment replica counts. The hot loop reads those lists by node index;
  building the snapshot is O(nodes) and each placement is O(1) when sampling.
- Replicas are grouped by nodeSelector. A group's members are the nodes that pass the
  static filters (ready, not cordoned, selector); those never change within a batch.
- Small groups (at most `sample_threshold` members) are scanned in full: exact argmax.
- Large groups rank a random sample, after Nomad's "limit" iterator: probe random
  members until `sample_size` feasible ones are found or `sample_probes` probes are
  spent, and keep the best. Binpack probes the group's *open* nodes (already in use and
  still able to take the group's smallest replica) plus one *empty* node, so it fills
  nodes in use before it opens a new one; spread probes every member, empty ones win on
  score anyway. Only when every probe fails does it fall back to a full scan.
- Within a batch free capacity only shrinks, so once a replica shape (CPU, memory, port)
  fits nowhere in a group, every replica at least that large fails at once without a
  rescan; its explanation is the one computed when that shape first failed.
- Host ports: per node, the lowest free port at or after a cursor, wrapping around the
  range. The cursor starts just past the highest port already in use on the node, so a
  port freed by a stopped replica is not handed to a new replica until the range wraps
  (a late packet or a client with a stale table never reaches the wrong replica), and it
  is computed from the snapshot alone, so a new leader makes the same choices.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence, Set
from dataclasses import dataclass

from shoal.errors import ConfigError
from shoal.model import Placement, Resources

__all__ = [
    "NodeInfo",
    "PlacementRequest",
    "Assignment",
    "Unplaced",
    "Plan",
    "SchedulerConfig",
    "Scheduler",
    "Filter",
    "NodeReady",
    "NodeNotCordoned",
    "NodeSelectorMatch",
    "CpuFits",
    "MemoryFits",
    "HostPortFree",
    "FILTERS",
    "explain_node",
    "binpack_score",
    "spread_score",
    "colocation_penalty",
    "free_share",
    "initial_port_cursor",
    "next_free_port",
    "format_cpu",
    "format_memory",
]


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeInfo:
    """One node as the scheduler sees it: what it offers and what is already reserved.

    `capacity` is what replicas may reserve (CPU in millicores, memory in bytes; a field
    left None counts as 0). `allocated` is the sum of the requests of the replicas
    already placed on it. `used_ports` are host ports taken by anything (replicas or
    not). `replicas_by_deployment` counts the replicas of each deployment already there,
    for the colocation penalty.
    """

    name: str
    ready: bool = True
    cordoned: bool = False
    labels: tuple[tuple[str, str], ...] = ()
    capacity: Resources
    allocated: Resources = Resources(cpu_millis=0, memory_bytes=0)
    used_ports: frozenset[int] = frozenset()
    replicas_by_deployment: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class PlacementRequest:
    """One replica to place. `requests` should have defaults filled in (None counts as 0)."""

    replica_id: str
    deployment: str
    requests: Resources
    node_selector: tuple[tuple[str, str], ...] = ()
    placement: Placement = Placement.BINPACK
    needs_port: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class Assignment:
    """A replica placed on a node; `host_port` is None when it publishes no port."""

    replica_id: str
    node: str
    host_port: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Unplaced:
    """A replica no node can take, and why (aggregated over every node)."""

    replica_id: str
    explanation: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """The outcome of one `schedule` call; both tuples follow the order of the requests."""

    assignments: tuple[Assignment, ...]
    unplaced: tuple[Unplaced, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerConfig:
    """Scheduler settings. Ports are inclusive; the rest are counts or unitless scores.

    port_range: host ports handed to replicas, inclusive. 20000-29999 stays below Linux's
        ephemeral range (32768-60999, `net.ipv4.ip_local_port_range`), so a published
        port never collides with the source port of an outgoing connection, and below
        Kubernetes' NodePort range (30000-32767), which Service `nodePort` values written
        for Kubernetes use. 10,000 ports per node is far more replicas than a node holds.
    sample_threshold: a nodeSelector group with more feasible nodes than this ranks a
        random sample instead of scanning every node. 256 keeps the exact scan (about
        0.2 ms per replica at 256 nodes on one core here) for clusters of the size most
        operators run, and sampling beyond it keeps a placement O(1).
    sample_size: how many feasible nodes a sample ranks (Nomad's "limit"). Nomad uses 2
        for plain service jobs and log2(N) with spread or affinity. 16 is log2 of 65,536
        nodes. For binpack it matters little: binpack keeps only a few nodes open, so
        the sample usually covers all of them (`bench/sched.py` used the same
        node count as the exhaustive search for every size from 2 to 32); for spread
        it is how many nodes compete for the emptiest.
    sample_probes: how many random nodes a sample may look at before giving up on
        finding `sample_size` feasible ones (4 x sample_size). When fewer than about one
        node in `sample_probes` fits, the scheduler falls back to a full scan.
    colocation_penalty: the weight of Nomad's job anti-affinity. A node already holding
        its free share of the deployment (k >= ⌈n / spread_hosts⌉ replicas, n being the
        deployment's replicas on nodes plus in the batch) loses weight x (k + 1) / n
        (`colocation_penalty()`). Scores lie in [0, 1] and one replica moves the binpack
        score of a node by at most 0.28, while the penalty at the share is at least
        1 / spread_hosts, so with weight 1 no host takes more than its share while
        another host can. Nomad uses the same formula with no free share (every sibling
        pays), averaged with the binpack score: there a 12-replica job on nodes that fit
        4 spreads over every node in the cluster, which is spread, not binpack.
    spread_hosts: how many hosts binpack spreads one deployment over, when it has that
        many replicas and the hosts exist: a node takes up to ⌈n / spread_hosts⌉ of an
        n-replica deployment before the colocation penalty applies. 3 means losing one
        host never costs a deployment more than about a third of its replicas, and a
        2- or 3-replica deployment gets a host per replica; beyond that binpack packs.
    interleave: place the batch one replica of each deployment per round (the first
        replica of every deployment, then the second, ...) instead of in request order.
        Per-deployment blocks of one request shape make a greedy packer fill nodes in
        one dimension (CPU or memory) and strand the other: on the T6 workload exhaustive
        best fit used 8.6 % more nodes than the lower bound in request order, 0 %
        interleaved. It is also fairer when capacity runs out: every deployment gets
        some replicas instead of the last ones none. The plan lists outcomes in request
        order either way.
    """

    port_range: tuple[int, int] = (20000, 29999)
    sample_threshold: int = 256
    sample_size: int = 16
    sample_probes: int = 64
    colocation_penalty: float = 1.0
    spread_hosts: int = 3
    interleave: bool = True

    def validate(self) -> None:
        """Raise `ConfigError` naming the first setting that cannot be used."""
        lo, hi = self.port_range
        if not (1 <= lo <= hi <= 65535):
            raise ConfigError(
                f"scheduler port_range {lo}-{hi} must be 1 <= low <= high <= 65535"
            )
        if self.sample_threshold < 0:
            raise ConfigError("scheduler sample_threshold must be 0 or more")
        if self.sample_size < 1:
            raise ConfigError("scheduler sample_size must be at least 1")
        if self.sample_probes < self.sample_size:
            raise ConfigError("scheduler sample_probes must be at least sample_size")
        if not (self.colocation_penalty >= 0 and math.isfinite(self.colocation_penalty)):
            raise ConfigError("scheduler colocation_penalty must be a finite number >= 0")
        if self.spread_hosts < 1:
            raise ConfigError("scheduler spread_hosts must be at least 1")


# --------------------------------------------------------------------------- formulas


def binpack_score(free_cpu_fraction: float, free_memory_fraction: float) -> float:
    """Nomad's binpack fitness, normalised to [0, 1]: 1 for a node left full, 0 empty.

    score = (20 - (10^freeCpu + 10^freeMem)) / 18, with the fractions of capacity left
    free *after* the placement, clamped to [0, 1]. The exponential rewards the last
    few percent of a node most, so nearly full nodes are topped up first.
    """
    fc = min(1.0, max(0.0, free_cpu_fraction))
    fm = min(1.0, max(0.0, free_memory_fraction))
    return (20.0 - math.pow(10.0, fc) - math.pow(10.0, fm)) / 18.0


def spread_score(free_cpu_fraction: float, free_memory_fraction: float) -> float:
    """The opposite ranking to binpack: 1 for a node left empty, 0 for a full one."""
    return 1.0 - binpack_score(free_cpu_fraction, free_memory_fraction)


def free_share(deployment_replicas: int, spread_hosts: int) -> int:
    """How many replicas of a deployment a node holds before the penalty applies."""
    return max(1, -(-deployment_replicas // max(1, spread_hosts)))


def colocation_penalty(siblings: int, deployment_replicas: int, weight: float,
                       spread_hosts: int = 3) -> float:
    """What a node's score loses for holding `siblings` replicas of the same deployment.

    Nomad's job anti-affinity, weight x (siblings + 1) / deployment_replicas (the share
    of the deployment the node would hold after the placement), paid once the node
    holds its free share, ⌈deployment_replicas / spread_hosts⌉. A 3-replica deployment
    pays 0.67 for doubling up, so its replicas land on three hosts; a 12-replica one
    stacks 4 to a host for free and pays 0.42 for a fifth.
    """
    if siblings <= 0 or deployment_replicas <= 0:
        return 0.0
    if siblings < free_share(deployment_replicas, spread_hosts):
        return 0.0
    return weight * (siblings + 1) / deployment_replicas


def initial_port_cursor(used: Set[int], low: int, high: int) -> int:
    """Where a node's port search starts: just past the highest used port in range."""
    top = max((p for p in used if low <= p <= high), default=None)
    if top is None or top >= high:
        return low
    return top + 1


def next_free_port(used: Set[int], cursor: int, low: int, high: int) -> int | None:
    """The lowest port >= cursor not in `used`, wrapping to `low`; None if all are used."""
    size = high - low + 1
    if sum(1 for p in used if low <= p <= high) >= size:
        return None
    p = cursor if low <= cursor <= high else low
    while p in used:
        p = p + 1 if p < high else low
    return p


_MEMORY_UNITS = (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10))


def format_memory(n: int) -> str:
    """Bytes the way manifests write them: 512Mi, 1Gi; 1.5Gi when not a whole unit."""
    if n < 0:
        return "-" + format_memory(-n)
    for suffix, size in _MEMORY_UNITS:
        if n >= size:
            if n % size == 0:
                return f"{n // size}{suffix}"
            return f"{n / size:.1f}{suffix}"
    return str(n)


def format_cpu(millis: int) -> str:
    """CPU in millicores the way manifests write them: 500m, 2000m."""
    return f"{millis}m"


def _nodes(n: int) -> str:
    return f"{n} node" if n == 1 else f"{n} nodes"


def _selector_text(selector: Sequence[tuple[str, str]]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(set(selector)))


def _cpu_of(r: Resources) -> int:
    return r.cpu_millis or 0


def _mem_of(r: Resources) -> int:
    return r.memory_bytes or 0


# --------------------------------------------------------------------------- state


class _State:
    """The working copy of the cluster for one batch, in columns indexed by node."""

    __slots__ = (
        "names",
        "ready",
        "cordoned",
        "labels",
        "cap_cpu",
        "cap_mem",
        "inv_cpu",
        "inv_mem",
        "free_cpu",
        "free_mem",
        "ports",
        "ports_free",
        "cursor",
        "dep_counts",
        "low",
        "high",
    )

    def __init__(self, nodes: Sequence[NodeInfo], config: SchedulerConfig) -> None:
        low, high = config.port_range
        size = high - low + 1
        self.low = low
        self.high = high
        self.names = [n.name for n in nodes]
        if len(set(self.names)) != len(self.names):
            raise ValueError("node names passed to the scheduler must be unique")
        self.ready = [n.ready for n in nodes]
        self.cordoned = [n.cordoned for n in nodes]
        self.labels = [dict(n.labels) for n in nodes]
        self.cap_cpu = [_cpu_of(n.capacity) for n in nodes]
        self.cap_mem = [_mem_of(n.capacity) for n in nodes]
        # A zero capacity makes every free fraction 0: the node scores as full.
        self.inv_cpu = [1.0 / c if c > 0 else 0.0 for c in self.cap_cpu]
        self.inv_mem = [1.0 / m if m > 0 else 0.0 for m in self.cap_mem]
        self.free_cpu = [c - _cpu_of(n.allocated) for c, n in zip(self.cap_cpu, nodes)]
        self.free_mem = [m - _mem_of(n.allocated) for m, n in zip(self.cap_mem, nodes)]
        # Copied on first write (most nodes of a small batch are never written).
        self.ports: list[Set[int]] = [n.used_ports for n in nodes]
        self.ports_free = [
            size - sum(1 for p in n.used_ports if low <= p <= high) for n in nodes
        ]
        self.cursor = [initial_port_cursor(n.used_ports, low, high) for n in nodes]
        self.dep_counts: dict[str, dict[int, int]] = {}
        for i, n in enumerate(nodes):
            for dep, count in n.replicas_by_deployment:
                if count:
                    per = self.dep_counts.setdefault(dep, {})
                    per[i] = per.get(i, 0) + count

    def matches(self, i: int, selector: Sequence[tuple[str, str]]) -> bool:
        labels = self.labels[i]
        return all(labels.get(k) == v for k, v in selector)

    def take_port(self, i: int) -> int:
        """Reserve the next free host port on node i (the caller checked one is free)."""
        used = self.ports[i]
        if not isinstance(used, set):
            used = set(used)
            self.ports[i] = used
        low, high = self.low, self.high
        p = self.cursor[i]
        while p in used:
            p = p + 1 if p < high else low
        used.add(p)
        self.ports_free[i] -= 1
        self.cursor[i] = p + 1 if p < high else low
        return p


# --------------------------------------------------------------------------- filters


class Filter:
    """One feasibility rule: a name, a per-node reason and an aggregated phrase.

    `rejects` is the rule itself; `node_reason` says why one node fails it (for
    `explain_node`); `summary` phrases how many nodes failed it, for `Unplaced`.
    """

    name = "filter"

    def rejects(self, st: _State, i: int, req: PlacementRequest) -> bool:
        raise NotImplementedError

    def node_reason(self, st: _State, i: int, req: PlacementRequest) -> str:
        raise NotImplementedError

    def summary(self, st: _State, failed: Sequence[int], req: PlacementRequest) -> str:
        raise NotImplementedError


class NodeReady(Filter):
    """The node must be ready (alive in gossip, reporting to the leader)."""

    name = "ready"

    def rejects(self, st: _State, i: int, req: PlacementRequest) -> bool:
        return not st.ready[i]

    def node_reason(self, st: _State, i: int, req: PlacementRequest) -> str:
        return "node is not ready"

    def summary(self, st: _State, failed: Sequence[int], req: PlacementRequest) -> str:
        return f"{_nodes(len(failed))} not ready"


class NodeNotCordoned(Filter):
    """A cordoned node keeps what it runs but takes nothing new."""

    name = "cordoned"

    def rejects(self, st: _State, i: int, req: PlacementRequest) -> bool:
        return st.cordoned[i]

    def node_reason(self, st: _State, i: int, req: PlacementRequest) -> str:
        return "node is cordoned"

    def summary(self, st: _State, failed: Sequence[int], req: PlacementRequest) -> str:
        return f"{_nodes(len(failed))} cordoned"


class NodeSelectorMatch(Filter):
    """Every key=value of the replica's nodeSelector must be a label of the node."""

    name = "node-selector"

    def rejects(self, st: _State, i: int, req: PlacementRequest) -> bool:
        return not st.matches(i, req.node_selector)

    def node_reason(self, st: _State, i: int, req: PlacementRequest) -> str:
        return f"node labels don't match nodeSelector {_selector_text(req.node_selector)}"

    def summary(self, st: _State, failed: Sequence[int], req: PlacementRequest) -> str:
        return (
            f"{_nodes(len(failed))} didn't match nodeSelector "
            f"{_selector_text(req.node_selector)}"
        )


class CpuFits(Filter):
    """The node's unreserved CPU must cover the replica's CPU request."""

    name = "cpu"

    def rejects(self, st: _State, i: int, req: PlacementRequest) -> bool:
        return st.free_cpu[i] < _cpu_of(req.requests)

    def node_reason(self, st: _State, i: int, req: PlacementRequest) -> str:
        return (
            f"insufficient cpu (needs {format_cpu(_cpu_of(req.requests))}, "
            f"free {format_cpu(max(0, st.free_cpu[i]))})"
        )

    def summary(self, st: _State, failed: Sequence[int], req: PlacementRequest) -> str:
        largest = max(0, max(st.free_cpu[i] for i in failed))
        return (
            f"insufficient cpu on {_nodes(len(failed))} "
            f"(needs {format_cpu(_cpu_of(req.requests))}, largest free {format_cpu(largest)})"
        )


class MemoryFits(Filter):
    """The node's unreserved memory must cover the replica's memory request."""

    name = "memory"

    def rejects(self, st: _State, i: int, req: PlacementRequest) -> bool:
        return st.free_mem[i] < _mem_of(req.requests)

    def node_reason(self, st: _State, i: int, req: PlacementRequest) -> str:
        return (
            f"insufficient memory (needs {format_memory(_mem_of(req.requests))}, "
            f"free {format_memory(max(0, st.free_mem[i]))})"
        )

    def summary(self, st: _State, failed: Sequence[int], req: PlacementRequest) -> str:
        largest = max(0, max(st.free_mem[i] for i in failed))
        return (
            f"insufficient memory on {_nodes(len(failed))} (needs "
            f"{format_memory(_mem_of(req.requests))}, largest free {format_memory(largest)})"
        )


class HostPortFree(Filter):
    """A replica that publishes a port needs a free host port in the range on the node."""

    name = "host-port"

    def rejects(self, st: _State, i: int, req: PlacementRequest) -> bool:
        return req.needs_port and st.ports_free[i] <= 0

    def node_reason(self, st: _State, i: int, req: PlacementRequest) -> str:
        return f"no free host port in {st.low}-{st.high}"

    def summary(self, st: _State, failed: Sequence[int], req: PlacementRequest) -> str:
        return f"no free host port in {st.low}-{st.high} on {_nodes(len(failed))}"


# Pipeline order: the static filters first (they never change within a batch), then the
# resources. A rejected node is counted under the first filter that rejects it.
FILTERS: tuple[Filter, ...] = (
    NodeReady(),
    NodeNotCordoned(),
    NodeSelectorMatch(),
    CpuFits(),
    MemoryFits(),
    HostPortFree(),
)


def _node_reasons(st: _State, i: int, req: PlacementRequest) -> list[str]:
    return [f.node_reason(st, i, req) for f in FILTERS if f.rejects(st, i, req)]


def _explain(st: _State, req: PlacementRequest) -> str:
    """The swarmkit-style sentence for a replica no node takes."""
    total = len(st.names)
    if total == 0:
        return "0/0 nodes are available: the cluster has no nodes"
    failed: list[list[int]] = [[] for _ in FILTERS]
    fits = 0
    for i in range(total):
        for k, f in enumerate(FILTERS):
            if f.rejects(st, i, req):
                failed[k].append(i)
                break
        else:
            fits += 1
    # The biggest obstacle first; equal counts keep the pipeline order.
    order = sorted(
        (k for k in range(len(FILTERS)) if failed[k]), key=lambda k: (-len(failed[k]), k)
    )
    parts = [FILTERS[k].summary(st, failed[k], req) for k in order]
    return f"{fits}/{total} nodes are available: " + ", ".join(parts)


def explain_node(
    node: NodeInfo, request: PlacementRequest, config: SchedulerConfig | None = None
) -> list[str]:
    """Every reason `node` cannot take `request` right now; empty when it can."""
    st = _State([node], config or SchedulerConfig())
    return _node_reasons(st, 0, request)


# --------------------------------------------------------------------------- scheduler

# How many random empty nodes binpack looks at for its one empty candidate: empty nodes
# of one group rarely differ, so the first probe nearly always fits.
_EMPTY_PROBES = 4


class _IndexedSet:
    """A set of node indices with O(1) add, discard and uniform random access."""

    __slots__ = ("items", "pos")

    def __init__(self) -> None:
        self.items: list[int] = []
        self.pos: dict[int, int] = {}

    def add(self, x: int) -> None:
        if x not in self.pos:
            self.pos[x] = len(self.items)
            self.items.append(x)

    def discard(self, x: int) -> None:
        p = self.pos.pop(x, None)
        if p is None:
            return
        last = self.items.pop()
        if last != x:
            self.items[p] = last
            self.pos[last] = p


class _Group:
    """The replicas of a batch that share a nodeSelector, and the nodes they may use."""

    __slots__ = (
        "selector",
        "members",
        "sampled",
        "open",
        "empty",
        "min_cpu",
        "min_mem",
        "all_need_port",
        "failed",
    )

    def __init__(
        self,
        st: _State,
        selector: tuple[tuple[str, str], ...],
        minimum: tuple[int, int, bool],
        threshold: int,
    ) -> None:
        self.selector = selector
        self.members = [
            i
            for i in range(len(st.names))
            if st.ready[i] and not st.cordoned[i] and st.matches(i, selector)
        ]
        self.sampled = len(self.members) > threshold
        self.min_cpu, self.min_mem, self.all_need_port = minimum
        self.open = _IndexedSet()
        self.empty = _IndexedSet()
        # Shapes (cpu, memory, needs_port) that fit no member: capacity only shrinks
        # within a batch, so anything at least as large fails too.
        self.failed: list[tuple[int, int, bool]] = []
        if self.sampled:
            for i in self.members:
                self.refresh(st, i)

    def refresh(self, st: _State, i: int) -> None:
        """Re-file node i as open, empty or neither after its state changed."""
        if (
            st.free_cpu[i] < self.min_cpu
            or st.free_mem[i] < self.min_mem
            or (self.all_need_port and st.ports_free[i] <= 0)
        ):
            # It cannot take even the smallest replica of this group again.
            self.open.discard(i)
            self.empty.discard(i)
        elif st.free_cpu[i] < st.cap_cpu[i] or st.free_mem[i] < st.cap_mem[i]:
            self.empty.discard(i)
            self.open.add(i)
        else:
            self.open.discard(i)
            self.empty.add(i)

    def remember_failure(self, cpu: int, mem: int, port: bool) -> None:
        """Record a shape that fits no member, dropping the shapes it implies."""
        self.failed = [
            f for f in self.failed if not (f[0] >= cpu and f[1] >= mem and (f[2] or not port))
        ]
        self.failed.append((cpu, mem, port))

    def known_to_fail(self, cpu: int, mem: int, port: bool) -> bool:
        for fc, fm, fp in self.failed:
            if fc <= cpu and fm <= mem and (port or not fp):
                return True
        return False


class _Batch:
    """What one pass over the requests tells before any is placed.

    - `group_keys[k]`: request k's nodeSelector, normalised (sorted, deduplicated).
    - `minimums[key]`: the group's smallest CPU, smallest memory and whether every
      replica of it needs a port: a node that cannot take that is closed to the group.
    - `deployment_totals[name]`: replicas of the deployment already on nodes plus those
      in the batch, the denominator of the colocation penalty.
    - `order`: the order to place in. Interleaved: the first replica of every deployment
      (in request order), then the second of every deployment, and so on; otherwise
      the request order.
    """

    __slots__ = ("group_keys", "minimums", "deployment_totals", "order")

    def __init__(
        self, st: _State, requests: Sequence[PlacementRequest], interleave: bool
    ) -> None:
        norm: dict[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]] = {}
        acc: dict[tuple[tuple[str, str], ...], list[int]] = {}
        existing = {dep: sum(per.values()) for dep, per in st.dep_counts.items()}
        in_batch: dict[str, int] = {}
        keys: list[tuple[tuple[str, str], ...]] = []
        rounds: list[list[int]] = []
        for k, req in enumerate(requests):
            raw = req.node_selector
            key = norm.get(raw)
            if key is None:
                key = norm[raw] = _normalise(raw)
            keys.append(key)
            r = req.requests
            cpu = r.cpu_millis or 0
            mem = r.memory_bytes or 0
            nth = in_batch.get(req.deployment, 0)
            in_batch[req.deployment] = nth + 1
            if nth == len(rounds):
                rounds.append([])
            rounds[nth].append(k)
            m = acc.get(key)
            if m is None:
                acc[key] = [cpu, mem, 1 if req.needs_port else 0]
                continue
            if cpu < m[0]:
                m[0] = cpu
            if mem < m[1]:
                m[1] = mem
            if not req.needs_port:
                m[2] = 0
        self.group_keys = keys
        self.minimums = {k: (v[0], v[1], bool(v[2])) for k, v in acc.items()}
        self.deployment_totals = {
            dep: existing.get(dep, 0) + count for dep, count in in_batch.items()
        }
        self.order: Sequence[int] = (
            [k for r in rounds for k in r] if interleave else range(len(requests))
        )


class Scheduler:
    """Places replicas on nodes; see the module docstring for the rules.

    The scheduler keeps no cluster state between calls: everything comes in with
    `schedule`. It keeps only its rng, so consecutive calls continue one random stream.
    """

    def __init__(self, config: SchedulerConfig, rng: random.Random) -> None:
        config.validate()
        self._config = config
        self._rng = rng

    @property
    def config(self) -> SchedulerConfig:
        return self._config

    def explain_node(self, node: NodeInfo, request: PlacementRequest) -> list[str]:
        """Every reason `node` cannot take `request` right now; empty when it can."""
        return explain_node(node, request, self._config)

    def schedule(self, nodes: Sequence[NodeInfo], requests: Sequence[PlacementRequest]) -> Plan:
        """Place `requests` on `nodes`; see the module docstring for the rules."""
        st = _State(nodes, self._config)
        batch = _Batch(st, requests, self._config.interleave)
        groups: dict[tuple[tuple[str, str], ...], _Group] = {}
        # For each node, the sampled groups whose open/empty pools list it.
        node_groups: list[list[_Group]] = [[] for _ in st.names]
        explanations: dict[tuple[object, ...], str] = {}
        threshold = self._config.sample_threshold
        weight = self._config.colocation_penalty
        spread_hosts = self._config.spread_hosts
        dep_counts = st.dep_counts
        totals = batch.deployment_totals
        keys = batch.group_keys
        outcome: list[Assignment | Unplaced | None] = [None] * len(requests)

        for k in batch.order:
            req = requests[k]
            key = keys[k]
            group = groups.get(key)
            if group is None:
                group = _Group(st, key, batch.minimums[key], threshold)
                groups[key] = group
                if group.sampled:
                    for i in group.members:
                        node_groups[i].append(group)
            counts = dep_counts.get(req.deployment)
            need = _Need(req, counts, weight, totals[req.deployment], spread_hosts)
            cpu, mem, port = need.cpu, need.mem, need.port

            i = -1
            if not group.known_to_fail(cpu, mem, port):
                if group.sampled:
                    i = self._sample(st, group, need)
                if i < 0:
                    i = self._scan(st, group.members, need)
                if i < 0:
                    group.remember_failure(cpu, mem, port)
            if i < 0:
                ekey = (key, cpu, mem, port)
                text = explanations.get(ekey)
                if text is None:
                    text = _explain(st, req)
                    explanations[ekey] = text
                outcome[k] = Unplaced(replica_id=req.replica_id, explanation=text)
                continue

            st.free_cpu[i] -= cpu
            st.free_mem[i] -= mem
            host_port = st.take_port(i) if port else None
            if counts is None:
                counts = dep_counts[req.deployment] = {}
            counts[i] = counts.get(i, 0) + 1
            for g in node_groups[i]:
                g.refresh(st, i)
            outcome[k] = Assignment(
                replica_id=req.replica_id, node=st.names[i], host_port=host_port
            )

        return Plan(
            assignments=tuple(o for o in outcome if isinstance(o, Assignment)),
            unplaced=tuple(o for o in outcome if isinstance(o, Unplaced)),
        )

    def _scan(self, st: _State, members: Sequence[int], need: _Need) -> int:
        """Exact argmax over `members`; exact ties go to a uniformly random one."""
        return self._best(st, iter(members), len(members), need)[1]

    def _sample(self, st: _State, group: _Group, need: _Need) -> int:
        """Best of a random sample of the group (Nomad's limit); -1 if no probe fits."""
        size = self._config.sample_size
        probes = self._config.sample_probes
        if not need.binpack:
            return self._best(st, self._probe(group.members, probes), size, need)[1]
        # Binpack: nodes in use first, plus one empty node so that the colocation
        # penalty can still send a replica away from its siblings.
        pool = group.open.items
        if len(pool) <= probes:
            # Few nodes open (the usual case under binpack): rank them all.
            best, best_i, ties = self._best(st, iter(pool), len(pool), need)
        else:
            best, best_i, ties = self._best(st, self._probe(pool, probes), size, need)
        empties = group.empty.items
        if empties:
            e_best, e_i, e_ties = self._best(st, self._probe(empties, _EMPTY_PROBES), 1, need)
            if e_best > best or (
                e_best == best and e_i >= 0 and self._rng.random() * (ties + e_ties) < e_ties
            ):
                best_i = e_i
        return best_i

    def _probe(self, pool: Sequence[int], probes: int) -> Iterator[int]:
        """`probes` members of `pool` drawn uniformly with replacement."""
        rnd = self._rng.random
        n = len(pool)
        for _ in range(probes):
            yield pool[int(rnd() * n)]

    def _best(
        self, st: _State, candidates: Iterator[int], limit: int, need: _Need
    ) -> tuple[float, int, int]:
        """(score, node, ties): the best of the first `limit` feasible candidates.

        The score is `binpack_score` (or `spread_score`) minus `colocation_penalty`,
        inlined here because this loop is the scheduler's hot path; a test checks it
        agrees with the public formulas.
        """
        cpu, mem, port, binpack = need.cpu, need.mem, need.port, need.binpack
        counts, weight, total, share = need.counts, need.weight, need.total, need.share
        free_cpu = st.free_cpu
        free_mem = st.free_mem
        inv_cpu = st.inv_cpu
        inv_mem = st.inv_mem
        ports_free = st.ports_free
        rnd = self._rng.random
        best = -math.inf
        best_i = -1
        ties = 0
        found = 0
        for i in candidates:
            fc = free_cpu[i] - cpu
            if fc < 0:
                continue
            fm = free_mem[i] - mem
            if fm < 0:
                continue
            if port and ports_free[i] <= 0:
                continue
            fcf = fc * inv_cpu[i]
            fmf = fm * inv_mem[i]
            if fcf > 1.0:
                fcf = 1.0
            if fmf > 1.0:
                fmf = 1.0
            s = (20.0 - 10.0**fcf - 10.0**fmf) / 18.0
            if not binpack:
                s = 1.0 - s
            if counts is not None:
                siblings = counts.get(i, 0)
                if siblings >= share:
                    s -= weight * (siblings + 1) / total
            if s > best:
                best = s
                best_i = i
                ties = 1
            elif s == best:
                # Reservoir sampling: each of the k tied nodes ends up chosen with 1/k.
                ties += 1
                if rnd() * ties < 1.0:
                    best_i = i
            found += 1
            if found >= limit:
                break
        return best, best_i, ties


class _Need:
    """What one replica asks of a node, unpacked once for the hot loop."""

    __slots__ = ("cpu", "mem", "port", "binpack", "counts", "weight", "total", "share")

    def __init__(
        self,
        req: PlacementRequest,
        counts: dict[int, int] | None,
        weight: float,
        total: int,
        spread_hosts: int,
    ) -> None:
        r = req.requests
        self.cpu = r.cpu_millis or 0
        self.mem = r.memory_bytes or 0
        self.port = req.needs_port
        self.binpack = req.placement is not Placement.SPREAD
        self.counts = counts
        self.weight = weight
        self.total = total
        self.share = free_share(total, spread_hosts)


def _normalise(selector: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(set(selector)))
