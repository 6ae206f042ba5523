from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Resources(_message.Message):
    __slots__ = ("cpu_millis", "memory_bytes")
    CPU_MILLIS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    cpu_millis: int
    memory_bytes: int
    def __init__(self, cpu_millis: _Optional[int] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class Deployment(_message.Message):
    __slots__ = ("name", "generation", "manifest_json", "replicas", "running", "ready", "updated", "image", "driver", "created_at", "conditions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    DRIVER_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    generation: int
    manifest_json: str
    replicas: int
    running: int
    ready: int
    updated: int
    image: str
    driver: str
    created_at: float
    conditions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., generation: _Optional[int] = ..., manifest_json: _Optional[str] = ..., replicas: _Optional[int] = ..., running: _Optional[int] = ..., ready: _Optional[int] = ..., updated: _Optional[int] = ..., image: _Optional[str] = ..., driver: _Optional[str] = ..., created_at: _Optional[float] = ..., conditions: _Optional[_Iterable[str]] = ...) -> None: ...

class ServicePort(_message.Message):
    __slots__ = ("name", "port", "target_port", "node_port", "protocol", "app_protocol")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    TARGET_PORT_FIELD_NUMBER: _ClassVar[int]
    NODE_PORT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    APP_PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    name: str
    port: int
    target_port: str
    node_port: int
    protocol: str
    app_protocol: str
    def __init__(self, name: _Optional[str] = ..., port: _Optional[int] = ..., target_port: _Optional[str] = ..., node_port: _Optional[int] = ..., protocol: _Optional[str] = ..., app_protocol: _Optional[str] = ...) -> None: ...

class Service(_message.Message):
    __slots__ = ("name", "manifest_json", "type", "ports", "algorithm", "selector", "endpoints", "created_at")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PORTS_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    manifest_json: str
    type: str
    ports: _containers.RepeatedCompositeFieldContainer[ServicePort]
    algorithm: str
    selector: _containers.ScalarMap[str, str]
    endpoints: int
    created_at: float
    def __init__(self, name: _Optional[str] = ..., manifest_json: _Optional[str] = ..., type: _Optional[str] = ..., ports: _Optional[_Iterable[_Union[ServicePort, _Mapping]]] = ..., algorithm: _Optional[str] = ..., selector: _Optional[_Mapping[str, str]] = ..., endpoints: _Optional[int] = ..., created_at: _Optional[float] = ...) -> None: ...

class Pod(_message.Message):
    __slots__ = ("name", "deployment", "generation", "node", "host_ip", "host_port", "phase", "ready", "restarts", "container_id", "message", "driver", "image", "created_at", "started_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    HOST_IP_FIELD_NUMBER: _ClassVar[int]
    HOST_PORT_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DRIVER_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    deployment: str
    generation: int
    node: str
    host_ip: str
    host_port: int
    phase: str
    ready: bool
    restarts: int
    container_id: str
    message: str
    driver: str
    image: str
    created_at: float
    started_at: float
    def __init__(self, name: _Optional[str] = ..., deployment: _Optional[str] = ..., generation: _Optional[int] = ..., node: _Optional[str] = ..., host_ip: _Optional[str] = ..., host_port: _Optional[int] = ..., phase: _Optional[str] = ..., ready: _Optional[bool] = ..., restarts: _Optional[int] = ..., container_id: _Optional[str] = ..., message: _Optional[str] = ..., driver: _Optional[str] = ..., image: _Optional[str] = ..., created_at: _Optional[float] = ..., started_at: _Optional[float] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("pod", "address", "port", "weight")
    POD_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    pod: str
    address: str
    port: int
    weight: int
    def __init__(self, pod: _Optional[str] = ..., address: _Optional[str] = ..., port: _Optional[int] = ..., weight: _Optional[int] = ...) -> None: ...

class Table(_message.Message):
    __slots__ = ("service", "algorithm", "version", "endpoints", "ports", "dataplane", "hash_header")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    PORTS_FIELD_NUMBER: _ClassVar[int]
    DATAPLANE_FIELD_NUMBER: _ClassVar[int]
    HASH_HEADER_FIELD_NUMBER: _ClassVar[int]
    service: str
    algorithm: str
    version: int
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    ports: _containers.RepeatedCompositeFieldContainer[ServicePort]
    dataplane: str
    hash_header: str
    def __init__(self, service: _Optional[str] = ..., algorithm: _Optional[str] = ..., version: _Optional[int] = ..., endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., ports: _Optional[_Iterable[_Union[ServicePort, _Mapping]]] = ..., dataplane: _Optional[str] = ..., hash_header: _Optional[str] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ("name", "address", "role", "status", "cordoned", "capacity", "allocated", "labels", "pods", "last_seen", "version", "draining", "usage", "metrics_port")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CORDONED_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    PODS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    METRICS_PORT_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    role: str
    status: str
    cordoned: bool
    capacity: Resources
    allocated: Resources
    labels: _containers.ScalarMap[str, str]
    pods: int
    last_seen: float
    version: str
    draining: bool
    usage: Usage
    metrics_port: int
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., role: _Optional[str] = ..., status: _Optional[str] = ..., cordoned: _Optional[bool] = ..., capacity: _Optional[_Union[Resources, _Mapping]] = ..., allocated: _Optional[_Union[Resources, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., pods: _Optional[int] = ..., last_seen: _Optional[float] = ..., version: _Optional[str] = ..., draining: _Optional[bool] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., metrics_port: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("cpu_percent", "memory_used_bytes", "disk_used_bytes", "disk_total_bytes")
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    cpu_percent: float
    memory_used_bytes: int
    disk_used_bytes: int
    disk_total_bytes: int
    def __init__(self, cpu_percent: _Optional[float] = ..., memory_used_bytes: _Optional[int] = ..., disk_used_bytes: _Optional[int] = ..., disk_total_bytes: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("seq", "time", "type", "reason", "object", "message")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    time: float
    type: str
    reason: str
    object: str
    message: str
    def __init__(self, seq: _Optional[int] = ..., time: _Optional[float] = ..., type: _Optional[str] = ..., reason: _Optional[str] = ..., object: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...
