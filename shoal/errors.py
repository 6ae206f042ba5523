"""Errors shoal raises, all rooted at `ShoalError`.

    ShoalError
    ├── ConfigError            a setting a user gave cannot be used
    ├── ManifestError          one or more manifest problems, each with file, line and field
    ├── NotFound               a named object does not exist
    ├── Conflict               the request contradicts the current state
    ├── Unschedulable          no node can take a replica; `explanation` says why
    ├── RuntimeDriverError     the container or process runtime failed
    │   ├── ImageNotFound      the image is neither local nor pullable
    │   ├── HostPortInUse      the replica's host port is taken on this node (`port`)
    │   └── RuntimeUnavailable the runtime (Docker Engine) cannot be reached
    ├── StoreError             the state store failed to read or persist
    │   └── (raft) LogCompacted, LogUnavailable, SnapshotOutOfDate, SnapshotTemporarilyUnavailable
    ├── Unavailable            the control plane cannot be reached or has no leader
    │   └── (raft) NotLeader(leader_hint), ProposalDropped
    ├── (gossip) WireError(reason)  incoming gossip bytes refused and counted by reason
    │   └── TruncatedPacket, OversizedPacket(size, limit), MalformedPacket, ForeignCluster(cluster)
    └── (raft) RaftInvariantError   a consensus invariant broke: a bug, fail loudly
            └── IllegalTransition
    (raft) ConfChangeRefused is a Conflict. The Raft errors live in shoal.leader.raft.errors.
    The gossip wire errors live in shoal.agent.gossip_wire.

Each error carries its context as keyword attributes and renders as one sentence a user
can act on. gRPC status codes are chosen only at the API edge (`shoal.leader.api`), and
translated back into these errors only in the client library (`shoal.client`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ShoalError",
    "ConfigError",
    "ManifestError",
    "ManifestProblem",
    "NotFound",
    "Conflict",
    "Unschedulable",
    "RuntimeDriverError",
    "ImageNotFound",
    "RuntimeUnavailable",
    "HostPortInUse",
    "StoreError",
    "Unavailable",
]


class ShoalError(Exception):
    """Root of every error shoal raises on purpose."""


class ConfigError(ShoalError):
    """A setting cannot be used; the message says which and why."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ManifestProblem:
    """One problem in one manifest document: where it is and what is wrong."""

    source: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line is not None else self.source
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ManifestError(ShoalError):
    """One or more manifest problems, reported together."""

    def __init__(self, problems: list[ManifestProblem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class NotFound(ShoalError):
    """A named object does not exist."""

    def __init__(self, kind: str, name: str) -> None:
        self.kind = kind
        self.name = name
        super().__init__(f'{kind} "{name}" not found')


class Conflict(ShoalError):
    """The request contradicts the current state."""


class Unschedulable(ShoalError):
    """No node can take a replica; `explanation` says why, node by node."""

    def __init__(self, explanation: str) -> None:
        self.explanation = explanation
        super().__init__(explanation)


class RuntimeDriverError(ShoalError):
    """The container or process runtime failed."""


class ImageNotFound(RuntimeDriverError):
    """The image is neither present locally nor pullable."""

    def __init__(self, image: str) -> None:
        self.image = image
        super().__init__(f'image "{image}" is not present on this host and could not be pulled')


class HostPortInUse(RuntimeDriverError):
    """The host port a replica was given is taken on this node by something else."""

    def __init__(self, message: str, *, port: int | None = None) -> None:
        self.port = port
        super().__init__(message)


class RuntimeUnavailable(RuntimeDriverError):
    """The runtime (Docker Engine) cannot be reached."""


class StoreError(ShoalError):
    """The state store failed to read or persist."""


class Unavailable(ShoalError):
    """The control plane cannot be reached or has no leader."""
