"""Typed views of the records kept in the cluster state.

Each record is a frozen dataclass that converts to and from the plain dict stored in
`ClusterState` (`to_dict` / `from_dict`). Fields missing from a stored dict take their
defaults, so adding a field never breaks reading an older state.

Replica phases are ordered numbers with gaps (the swarmkit way), so code can ask
"has it at least started?" with a comparison, and new phases fit between old ones.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Self

__all__ = [
    "Phase",
    "DeploymentRecord",
    "ServiceRecord",
    "ReplicaRecord",
    "NodeRecord",
    "TableRecord",
]


class Phase(enum.IntEnum):
    PENDING = 100  # created, not yet placed on a node
    ASSIGNED = 200  # placed; the node has not reported it yet
    STARTING = 300  # the node is starting it
    RUNNING = 400  # running (ready or not)
    FAILED = 500  # exited; the node restarts it with back-off

    @property
    def label(self) -> str:
        return self.name.capitalize()


class _Record:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload, no-any-return]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True, slots=True, kw_only=True)
class DeploymentRecord(_Record):
    name: str
    manifest: dict[str, Any]
    generation: int = 1  # bumped on every change of the declared spec
    template_generation: int = 1  # bumped when the pod template changes: replicas roll
    created_at: float = 0.0
    updated_at: float = 0.0
    unschedulable: str = ""  # why replicas are pending, if they are


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceRecord(_Record):
    name: str
    manifest: dict[str, Any]
    generation: int = 1
    created_at: float = 0.0
    warning: str = ""  # e.g. a port that could not be bound


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaRecord(_Record):
    id: str
    deployment: str
    generation: int  # the deployment's template_generation it was made from
    node: str = ""
    host_port: int = 0
    phase: int = Phase.PENDING
    ready: bool = False
    handle: str = ""
    restarts: int = 0
    exit_code: int = 0
    message: str = ""
    created_at: float = 0.0
    started_at: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeRecord(_Record):
    name: str
    address: str
    role: str = "client"
    status: str = "Ready"  # Ready | NotReady | Down
    cordoned: bool = False
    draining: bool = False  # cordoned, and its replicas are moving to other nodes
    cpu_millis: int = 0
    memory_bytes: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    last_seen: float = 0.0
    version: str = ""
    blocked_ports: list[int] = field(default_factory=list)  # taken by something else
    down_since: float = 0.0  # when gossip declared it dead (status Down)
    usage: dict[str, float] = field(default_factory=dict)
    metrics_port: int = 0
    grpc_port: int = 0  # the agent's Control API (logs of the replicas it runs)  # cpu_percent, memory/disk used bytes, disk total


@dataclass(frozen=True, slots=True, kw_only=True)
class TableRecord(_Record):
    service: str
    algorithm: str
    version: int
    endpoints: list[dict[str, Any]] = field(default_factory=list)  # pod, address, port, weight
    ports: list[dict[str, Any]] = field(default_factory=list)  # name, port, target_port, node_port, protocol, app_protocol
    dataplane: str = "proxy"  # a model.DataPlane value: who carries the service's connections
    hash_header: str = ""  # consistent_hash on http ports: the request header keyed on
