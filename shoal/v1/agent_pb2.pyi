from shoal.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AgentMessage(_message.Message):
    __slots__ = ("hello", "status")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    status: StatusReport
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., status: _Optional[_Union[StatusReport, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("node", "address", "role", "capacity", "labels", "version", "metrics_port", "grpc_port")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    METRICS_PORT_FIELD_NUMBER: _ClassVar[int]
    GRPC_PORT_FIELD_NUMBER: _ClassVar[int]
    node: str
    address: str
    role: str
    capacity: _types_pb2.Resources
    labels: _containers.ScalarMap[str, str]
    version: str
    metrics_port: int
    grpc_port: int
    def __init__(self, node: _Optional[str] = ..., address: _Optional[str] = ..., role: _Optional[str] = ..., capacity: _Optional[_Union[_types_pb2.Resources, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., version: _Optional[str] = ..., metrics_port: _Optional[int] = ..., grpc_port: _Optional[int] = ...) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("replica_id", "generation", "state", "ready", "handle", "restarts", "exit_code", "message", "started_at", "port_conflict")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    PORT_CONFLICT_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    generation: int
    state: str
    ready: bool
    handle: str
    restarts: int
    exit_code: int
    message: str
    started_at: float
    port_conflict: int
    def __init__(self, replica_id: _Optional[str] = ..., generation: _Optional[int] = ..., state: _Optional[str] = ..., ready: _Optional[bool] = ..., handle: _Optional[str] = ..., restarts: _Optional[int] = ..., exit_code: _Optional[int] = ..., message: _Optional[str] = ..., started_at: _Optional[float] = ..., port_conflict: _Optional[int] = ...) -> None: ...

class StatusReport(_message.Message):
    __slots__ = ("replicas", "events", "usage")
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    events: _containers.RepeatedCompositeFieldContainer[_types_pb2.Event]
    usage: _types_pb2.Usage
    def __init__(self, replicas: _Optional[_Iterable[_Union[ReplicaStatus, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[_types_pb2.Event, _Mapping]]] = ..., usage: _Optional[_Union[_types_pb2.Usage, _Mapping]] = ...) -> None: ...

class Probe(_message.Message):
    __slots__ = ("kind", "port", "path", "command", "service", "initial_delay_seconds", "period_seconds", "timeout_seconds", "success_threshold", "failure_threshold")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    INITIAL_DELAY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PERIOD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FAILURE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    kind: str
    port: int
    path: str
    command: _containers.RepeatedScalarFieldContainer[str]
    service: str
    initial_delay_seconds: float
    period_seconds: float
    timeout_seconds: float
    success_threshold: int
    failure_threshold: int
    def __init__(self, kind: _Optional[str] = ..., port: _Optional[int] = ..., path: _Optional[str] = ..., command: _Optional[_Iterable[str]] = ..., service: _Optional[str] = ..., initial_delay_seconds: _Optional[float] = ..., period_seconds: _Optional[float] = ..., timeout_seconds: _Optional[float] = ..., success_threshold: _Optional[int] = ..., failure_threshold: _Optional[int] = ...) -> None: ...

class RunSpec(_message.Message):
    __slots__ = ("driver", "image", "command", "args", "env", "container_port", "limits", "liveness", "readiness", "startup")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DRIVER_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_PORT_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_FIELD_NUMBER: _ClassVar[int]
    READINESS_FIELD_NUMBER: _ClassVar[int]
    STARTUP_FIELD_NUMBER: _ClassVar[int]
    driver: str
    image: str
    command: _containers.RepeatedScalarFieldContainer[str]
    args: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    container_port: int
    limits: _types_pb2.Resources
    liveness: Probe
    readiness: Probe
    startup: Probe
    def __init__(self, driver: _Optional[str] = ..., image: _Optional[str] = ..., command: _Optional[_Iterable[str]] = ..., args: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ..., container_port: _Optional[int] = ..., limits: _Optional[_Union[_types_pb2.Resources, _Mapping]] = ..., liveness: _Optional[_Union[Probe, _Mapping]] = ..., readiness: _Optional[_Union[Probe, _Mapping]] = ..., startup: _Optional[_Union[Probe, _Mapping]] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("replica_id", "deployment", "generation", "host_port", "spec")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    HOST_PORT_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    deployment: str
    generation: int
    host_port: int
    spec: RunSpec
    def __init__(self, replica_id: _Optional[str] = ..., deployment: _Optional[str] = ..., generation: _Optional[int] = ..., host_port: _Optional[int] = ..., spec: _Optional[_Union[RunSpec, _Mapping]] = ...) -> None: ...

class Assignments(_message.Message):
    __slots__ = ("term", "revision", "assignments")
    TERM_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    term: int
    revision: int
    assignments: _containers.RepeatedCompositeFieldContainer[Assignment]
    def __init__(self, term: _Optional[int] = ..., revision: _Optional[int] = ..., assignments: _Optional[_Iterable[_Union[Assignment, _Mapping]]] = ...) -> None: ...

class Tables(_message.Message):
    __slots__ = ("revision", "tables")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    revision: int
    tables: _containers.RepeatedCompositeFieldContainer[_types_pb2.Table]
    def __init__(self, revision: _Optional[int] = ..., tables: _Optional[_Iterable[_Union[_types_pb2.Table, _Mapping]]] = ...) -> None: ...

class LeaderMessage(_message.Message):
    __slots__ = ("assignments", "tables")
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    assignments: Assignments
    tables: Tables
    def __init__(self, assignments: _Optional[_Union[Assignments, _Mapping]] = ..., tables: _Optional[_Union[Tables, _Mapping]] = ...) -> None: ...
