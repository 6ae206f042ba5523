from shoal.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Document(_message.Message):
    __slots__ = ("source", "content")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    source: str
    content: str
    def __init__(self, source: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ApplyRequest(_message.Message):
    __slots__ = ("documents", "dry_run")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[Document]
    dry_run: bool
    def __init__(self, documents: _Optional[_Iterable[_Union[Document, _Mapping]]] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class AppliedObject(_message.Message):
    __slots__ = ("kind", "name", "action")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    action: str
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., action: _Optional[str] = ...) -> None: ...

class ApplyResponse(_message.Message):
    __slots__ = ("objects",)
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    objects: _containers.RepeatedCompositeFieldContainer[AppliedObject]
    def __init__(self, objects: _Optional[_Iterable[_Union[AppliedObject, _Mapping]]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("kind", "name")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("deployments", "services", "pods", "endpoints", "nodes", "events")
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    PODS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    deployments: _containers.RepeatedCompositeFieldContainer[_types_pb2.Deployment]
    services: _containers.RepeatedCompositeFieldContainer[_types_pb2.Service]
    pods: _containers.RepeatedCompositeFieldContainer[_types_pb2.Pod]
    endpoints: _containers.RepeatedCompositeFieldContainer[_types_pb2.Table]
    nodes: _containers.RepeatedCompositeFieldContainer[_types_pb2.Node]
    events: _containers.RepeatedCompositeFieldContainer[_types_pb2.Event]
    def __init__(self, deployments: _Optional[_Iterable[_Union[_types_pb2.Deployment, _Mapping]]] = ..., services: _Optional[_Iterable[_Union[_types_pb2.Service, _Mapping]]] = ..., pods: _Optional[_Iterable[_Union[_types_pb2.Pod, _Mapping]]] = ..., endpoints: _Optional[_Iterable[_Union[_types_pb2.Table, _Mapping]]] = ..., nodes: _Optional[_Iterable[_Union[_types_pb2.Node, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[_types_pb2.Event, _Mapping]]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("kind", "name")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("kind", "name")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class ScaleRequest(_message.Message):
    __slots__ = ("deployment", "replicas")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    replicas: int
    def __init__(self, deployment: _Optional[str] = ..., replicas: _Optional[int] = ...) -> None: ...

class ScaleResponse(_message.Message):
    __slots__ = ("deployment", "replicas")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    replicas: int
    def __init__(self, deployment: _Optional[str] = ..., replicas: _Optional[int] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("since", "follow", "object")
    SINCE_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    since: int
    follow: bool
    object: str
    def __init__(self, since: _Optional[int] = ..., follow: _Optional[bool] = ..., object: _Optional[str] = ...) -> None: ...

class LogsRequest(_message.Message):
    __slots__ = ("pod", "follow", "tail")
    POD_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    pod: str
    follow: bool
    tail: int
    def __init__(self, pod: _Optional[str] = ..., follow: _Optional[bool] = ..., tail: _Optional[int] = ...) -> None: ...

class LogChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class MembersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Member(_message.Message):
    __slots__ = ("name", "address", "role", "state", "incarnation", "heard_ago", "grpc", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    HEARD_AGO_FIELD_NUMBER: _ClassVar[int]
    GRPC_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    role: str
    state: str
    incarnation: int
    heard_ago: float
    grpc: str
    version: str
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., role: _Optional[str] = ..., state: _Optional[str] = ..., incarnation: _Optional[int] = ..., heard_ago: _Optional[float] = ..., grpc: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class MembersResponse(_message.Message):
    __slots__ = ("members",)
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[Member]
    def __init__(self, members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ...) -> None: ...

class ServersRequest(_message.Message):
    __slots__ = ("local",)
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    local: bool
    def __init__(self, local: _Optional[bool] = ...) -> None: ...

class Server(_message.Message):
    __slots__ = ("id", "name", "address", "suffrage", "role", "term", "commit", "applied", "match", "lag", "cluster", "leader")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SUFFRAGE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    MATCH_FIELD_NUMBER: _ClassVar[int]
    LAG_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    id: int
    name: str
    address: str
    suffrage: str
    role: str
    term: int
    commit: int
    applied: int
    match: int
    lag: int
    cluster: str
    leader: int
    def __init__(self, id: _Optional[int] = ..., name: _Optional[str] = ..., address: _Optional[str] = ..., suffrage: _Optional[str] = ..., role: _Optional[str] = ..., term: _Optional[int] = ..., commit: _Optional[int] = ..., applied: _Optional[int] = ..., match: _Optional[int] = ..., lag: _Optional[int] = ..., cluster: _Optional[str] = ..., leader: _Optional[int] = ...) -> None: ...

class ServersResponse(_message.Message):
    __slots__ = ("servers",)
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    servers: _containers.RepeatedCompositeFieldContainer[Server]
    def __init__(self, servers: _Optional[_Iterable[_Union[Server, _Mapping]]] = ...) -> None: ...

class AddServerRequest(_message.Message):
    __slots__ = ("address", "id")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    address: str
    id: int
    def __init__(self, address: _Optional[str] = ..., id: _Optional[int] = ...) -> None: ...

class AddServerResponse(_message.Message):
    __slots__ = ("id", "cluster", "servers")
    ID_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    id: int
    cluster: str
    servers: _containers.RepeatedCompositeFieldContainer[Server]
    def __init__(self, id: _Optional[int] = ..., cluster: _Optional[str] = ..., servers: _Optional[_Iterable[_Union[Server, _Mapping]]] = ...) -> None: ...

class RemoveServerRequest(_message.Message):
    __slots__ = ("id", "name")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    id: int
    name: str
    def __init__(self, id: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class RemoveServerResponse(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class CordonRequest(_message.Message):
    __slots__ = ("node", "cordon", "drain")
    NODE_FIELD_NUMBER: _ClassVar[int]
    CORDON_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    node: str
    cordon: bool
    drain: bool
    def __init__(self, node: _Optional[str] = ..., cordon: _Optional[bool] = ..., drain: _Optional[bool] = ...) -> None: ...

class CordonResponse(_message.Message):
    __slots__ = ("node", "replicas")
    NODE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    node: str
    replicas: int
    def __init__(self, node: _Optional[str] = ..., replicas: _Optional[int] = ...) -> None: ...

class Placement(_message.Message):
    __slots__ = ("deployment", "replica", "node", "host_port")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    HOST_PORT_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    replica: str
    node: str
    host_port: int
    def __init__(self, deployment: _Optional[str] = ..., replica: _Optional[str] = ..., node: _Optional[str] = ..., host_port: _Optional[int] = ...) -> None: ...

class Unplaced(_message.Message):
    __slots__ = ("deployment", "reason", "placed")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PLACED_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    reason: str
    placed: int
    def __init__(self, deployment: _Optional[str] = ..., reason: _Optional[str] = ..., placed: _Optional[int] = ...) -> None: ...

class PlanResponse(_message.Message):
    __slots__ = ("objects", "placements", "unplaced")
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENTS_FIELD_NUMBER: _ClassVar[int]
    UNPLACED_FIELD_NUMBER: _ClassVar[int]
    objects: _containers.RepeatedCompositeFieldContainer[AppliedObject]
    placements: _containers.RepeatedCompositeFieldContainer[Placement]
    unplaced: _containers.RepeatedCompositeFieldContainer[Unplaced]
    def __init__(self, objects: _Optional[_Iterable[_Union[AppliedObject, _Mapping]]] = ..., placements: _Optional[_Iterable[_Union[Placement, _Mapping]]] = ..., unplaced: _Optional[_Iterable[_Union[Unplaced, _Mapping]]] = ...) -> None: ...

class WatchTableRequest(_message.Message):
    __slots__ = ("service",)
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: str
    def __init__(self, service: _Optional[str] = ...) -> None: ...
