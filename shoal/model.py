"""The declared objects: what a user's manifests mean once parsed and validated.

These are values (frozen, slotted dataclasses) with no behaviour beyond small derived
properties. `shoal.manifest` builds them from YAML and is the only place that knows the
YAML shape; everything else (scheduler, controllers, agents) works on these.

Units: CPU in millicores (`500m` = 500, `1` = 1000), memory in bytes, times in seconds.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = [
    "Algorithm",
    "DataPlane",
    "KERNEL_ALGORITHMS",
    "Driver",
    "Placement",
    "ProbeKind",
    "Resources",
    "Probe",
    "ContainerPort",
    "Container",
    "RollingUpdate",
    "DeploymentSpec",
    "ServicePort",
    "ServiceSpec",
    "RunSpec",
    "DEFAULT_REQUESTS",
    "ANNOTATION_BALANCE",
    "ANNOTATION_DATAPLANE",
    "ANNOTATION_DRIVER",
    "ANNOTATION_HASH_HEADER",
    "ANNOTATION_PLACEMENT",
    "ANNOTATION_PROTOCOL",
    "AppProtocol",
    "ANNOTATION_WEIGHT",
]

ANNOTATION_BALANCE = "shoal.io/balance"
ANNOTATION_DATAPLANE = "shoal.io/dataplane"
ANNOTATION_DRIVER = "shoal.io/driver"
ANNOTATION_HASH_HEADER = "shoal.io/hash-header"
ANNOTATION_PLACEMENT = "shoal.io/placement"
ANNOTATION_PROTOCOL = "shoal.io/protocol"
ANNOTATION_WEIGHT = "shoal.io/weight"


class Algorithm(enum.Enum):
    """How a service's table picks an endpoint (`shoal.io/balance`)."""

    ROUND_ROBIN = "round_robin"
    RANDOM = "random"
    WEIGHTED = "weighted"
    LEAST_CONN = "least_conn"
    P2C_EWMA = "p2c_ewma"
    CONSISTENT_HASH = "consistent_hash"


class DataPlane(enum.Enum):
    """What carries a service's connections (`shoal.io/dataplane`): the agent's userspace
    proxy, or nftables DNAT rules the agent programs in the host's kernel."""

    PROXY = "proxy"
    KERNEL = "kernel"


class AppProtocol(enum.Enum):
    """What the proxy speaks on a service port (`ports[].appProtocol`, defaulting to the
    `shoal.io/protocol` annotation): bytes forwarded per connection, or HTTP/1.1 parsed
    and balanced per request."""

    TCP = "tcp"
    HTTP = "http"


# What nftables can pick with by itself: `numgen inc mod N` (round robin, the seed's
# S = (R mod N) + 1) and `numgen random mod N`. The others need per-endpoint state the
# kernel does not keep (weights, open connections, latency, a hash ring).
KERNEL_ALGORITHMS = frozenset({Algorithm.ROUND_ROBIN, Algorithm.RANDOM})


class Driver(enum.Enum):
    """What runs a replica (`shoal.io/driver`)."""

    DOCKER = "docker"
    PROCESS = "process"


class Placement(enum.Enum):
    """How the scheduler ranks feasible nodes (`shoal.io/placement`)."""

    BINPACK = "binpack"
    SPREAD = "spread"


class ProbeKind(enum.Enum):
    """How a probe checks a replica: HTTP GET, TCP connect, a command, gRPC health."""

    HTTP = "http"
    TCP = "tcp"
    EXEC = "exec"
    GRPC = "grpc"


@dataclass(frozen=True, slots=True, kw_only=True)
class Resources:
    """CPU in millicores and memory in bytes; None where the manifest did not say."""

    cpu_millis: int | None = None
    memory_bytes: int | None = None


# What a replica reserves when its manifest asks for nothing: small enough that a laptop
# takes dozens, large enough that a node is not promised to thousands (Nomad and
# Kubernetes pick similar figures).
DEFAULT_REQUESTS = Resources(cpu_millis=100, memory_bytes=64 * 1024 * 1024)


@dataclass(frozen=True, slots=True, kw_only=True)
class Probe:
    """A liveness, readiness or startup probe, Kubernetes semantics and defaults."""

    kind: ProbeKind
    port: int | None = None  # HTTP, TCP, gRPC: the container port probed
    path: str = "/"  # HTTP
    command: tuple[str, ...] = ()  # exec
    service: str = ""  # gRPC health service name
    initial_delay_seconds: float = 0.0
    period_seconds: float = 10.0
    timeout_seconds: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class ContainerPort:
    container_port: int
    name: str = ""
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True, kw_only=True)
class Container:
    name: str
    image: str
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    ports: tuple[ContainerPort, ...] = ()
    requests: Resources = field(default_factory=Resources)
    limits: Resources = field(default_factory=Resources)
    liveness_probe: Probe | None = None
    readiness_probe: Probe | None = None
    startup_probe: Probe | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RollingUpdate:
    """Kept as given: an int count or a "25%" string, as Kubernetes accepts."""

    max_surge: int | str = "25%"
    max_unavailable: int | str = "25%"


@dataclass(frozen=True, slots=True, kw_only=True)
class DeploymentSpec:
    name: str
    replicas: int = 1
    labels: tuple[tuple[str, str], ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()
    selector: tuple[tuple[str, str], ...] = ()
    template_labels: tuple[tuple[str, str], ...] = ()
    container: Container
    node_selector: tuple[tuple[str, str], ...] = ()
    strategy: str = "RollingUpdate"
    rolling_update: RollingUpdate = field(default_factory=RollingUpdate)
    driver: Driver = Driver.DOCKER
    placement: Placement = Placement.BINPACK
    # spec.template.metadata.annotations as written. `annotations` has the Deployment's
    # own plus the template's `shoal.io/` ones (`shoal.io/weight` is written there).
    template_annotations: tuple[tuple[str, str], ...] = ()
    # For the deployment controller and `rollout history`; Kubernetes' defaults.
    revision_history_limit: int = 10
    min_ready_seconds: int = 0
    progress_deadline_seconds: int = 600

    @property
    def weight(self) -> int:
        """Each replica's weight under the `weighted` algorithm (`shoal.io/weight`, default 1)."""
        return int(dict(self.annotations).get(ANNOTATION_WEIGHT, "1"))

    @property
    def requests(self) -> Resources:
        """What one replica reserves on its node, defaults filled in."""
        r = self.container.requests
        return Resources(
            cpu_millis=r.cpu_millis if r.cpu_millis is not None else DEFAULT_REQUESTS.cpu_millis,
            memory_bytes=(
                r.memory_bytes if r.memory_bytes is not None else DEFAULT_REQUESTS.memory_bytes
            ),
        )

    @property
    def container_port(self) -> int | None:
        """The port a replica serves on; the scheduler gives it a host port."""
        return self.container.ports[0].container_port if self.container.ports else None


@dataclass(frozen=True, slots=True, kw_only=True)
class ServicePort:
    port: int
    target_port: int | str  # a number, or the name of a container port
    name: str = ""
    node_port: int | None = None
    protocol: str = "TCP"
    app_protocol: AppProtocol = AppProtocol.TCP


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceSpec:
    name: str
    selector: tuple[tuple[str, str], ...]
    ports: tuple[ServicePort, ...]
    type: str = "ClusterIP"  # ClusterIP | NodePort | LoadBalancer
    labels: tuple[tuple[str, str], ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()
    algorithm: Algorithm = Algorithm.ROUND_ROBIN
    dataplane: DataPlane = DataPlane.PROXY
    # `shoal.io/hash-header`: the request header consistent_hash keys on, on http ports
    # ("": the client address, as on tcp ports).
    hash_header: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSpec:
    """What an agent's runtime driver needs to run one replica.

    `host_port` is where the replica must be reachable on the host: Docker publishes
    `container_port` there; the process driver sets `PORT` to it. The probes are the
    container's, run by the agent (`shoal.agent.probes`); None: not probed.
    """

    replica_id: str
    deployment: str
    generation: int
    driver: Driver
    image: str
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    container_port: int | None = None
    host_port: int | None = None
    limits: Resources = field(default_factory=Resources)
    liveness: Probe | None = None
    readiness: Probe | None = None
    startup: Probe | None = None
