from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GossipMemberStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GOSSIP_MEMBER_STATUS_UNSPECIFIED: _ClassVar[GossipMemberStatus]
    GOSSIP_MEMBER_STATUS_ALIVE: _ClassVar[GossipMemberStatus]
    GOSSIP_MEMBER_STATUS_SUSPECT: _ClassVar[GossipMemberStatus]
    GOSSIP_MEMBER_STATUS_DEAD: _ClassVar[GossipMemberStatus]
    GOSSIP_MEMBER_STATUS_LEFT: _ClassVar[GossipMemberStatus]
GOSSIP_MEMBER_STATUS_UNSPECIFIED: GossipMemberStatus
GOSSIP_MEMBER_STATUS_ALIVE: GossipMemberStatus
GOSSIP_MEMBER_STATUS_SUSPECT: GossipMemberStatus
GOSSIP_MEMBER_STATUS_DEAD: GossipMemberStatus
GOSSIP_MEMBER_STATUS_LEFT: GossipMemberStatus

class Packet(_message.Message):
    __slots__ = ("cluster", "messages")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    messages: _containers.RepeatedCompositeFieldContainer[GossipMessage]
    def __init__(self, cluster: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[GossipMessage, _Mapping]]] = ...) -> None: ...

class GossipMessage(_message.Message):
    __slots__ = ("ping", "ack", "nack", "ping_req", "alive", "suspect", "dead", "push_pull_request", "push_pull_response")
    PING_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    NACK_FIELD_NUMBER: _ClassVar[int]
    PING_REQ_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    SUSPECT_FIELD_NUMBER: _ClassVar[int]
    DEAD_FIELD_NUMBER: _ClassVar[int]
    PUSH_PULL_REQUEST_FIELD_NUMBER: _ClassVar[int]
    PUSH_PULL_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ping: GossipPing
    ack: GossipAck
    nack: GossipNack
    ping_req: GossipPingReq
    alive: GossipAlive
    suspect: GossipSuspect
    dead: GossipDead
    push_pull_request: GossipPushPullRequest
    push_pull_response: GossipPushPullResponse
    def __init__(self, ping: _Optional[_Union[GossipPing, _Mapping]] = ..., ack: _Optional[_Union[GossipAck, _Mapping]] = ..., nack: _Optional[_Union[GossipNack, _Mapping]] = ..., ping_req: _Optional[_Union[GossipPingReq, _Mapping]] = ..., alive: _Optional[_Union[GossipAlive, _Mapping]] = ..., suspect: _Optional[_Union[GossipSuspect, _Mapping]] = ..., dead: _Optional[_Union[GossipDead, _Mapping]] = ..., push_pull_request: _Optional[_Union[GossipPushPullRequest, _Mapping]] = ..., push_pull_response: _Optional[_Union[GossipPushPullResponse, _Mapping]] = ...) -> None: ...

class GossipAddress(_message.Message):
    __slots__ = ("host", "port")
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    host: str
    port: int
    def __init__(self, host: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class GossipPing(_message.Message):
    __slots__ = ("seq", "target", "source")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    target: str
    source: str
    def __init__(self, seq: _Optional[int] = ..., target: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class GossipAck(_message.Message):
    __slots__ = ("seq",)
    SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    def __init__(self, seq: _Optional[int] = ...) -> None: ...

class GossipNack(_message.Message):
    __slots__ = ("seq",)
    SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    def __init__(self, seq: _Optional[int] = ...) -> None: ...

class GossipPingReq(_message.Message):
    __slots__ = ("seq", "target", "target_address", "nack")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TARGET_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NACK_FIELD_NUMBER: _ClassVar[int]
    seq: int
    target: str
    target_address: GossipAddress
    nack: bool
    def __init__(self, seq: _Optional[int] = ..., target: _Optional[str] = ..., target_address: _Optional[_Union[GossipAddress, _Mapping]] = ..., nack: _Optional[bool] = ...) -> None: ...

class GossipAlive(_message.Message):
    __slots__ = ("name", "address", "incarnation", "meta")
    class MetaEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: GossipAddress
    incarnation: int
    meta: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., address: _Optional[_Union[GossipAddress, _Mapping]] = ..., incarnation: _Optional[int] = ..., meta: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GossipSuspect(_message.Message):
    __slots__ = ("name", "incarnation", "accuser")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    ACCUSER_FIELD_NUMBER: _ClassVar[int]
    name: str
    incarnation: int
    accuser: str
    def __init__(self, name: _Optional[str] = ..., incarnation: _Optional[int] = ..., accuser: _Optional[str] = ...) -> None: ...

class GossipDead(_message.Message):
    __slots__ = ("name", "incarnation", "accuser")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    ACCUSER_FIELD_NUMBER: _ClassVar[int]
    name: str
    incarnation: int
    accuser: str
    def __init__(self, name: _Optional[str] = ..., incarnation: _Optional[int] = ..., accuser: _Optional[str] = ...) -> None: ...

class GossipMemberState(_message.Message):
    __slots__ = ("name", "address", "incarnation", "state", "meta")
    class MetaEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: GossipAddress
    incarnation: int
    state: GossipMemberStatus
    meta: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., address: _Optional[_Union[GossipAddress, _Mapping]] = ..., incarnation: _Optional[int] = ..., state: _Optional[_Union[GossipMemberStatus, str]] = ..., meta: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GossipPushPullRequest(_message.Message):
    __slots__ = ("sender", "states", "join")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    JOIN_FIELD_NUMBER: _ClassVar[int]
    sender: str
    states: _containers.RepeatedCompositeFieldContainer[GossipMemberState]
    join: bool
    def __init__(self, sender: _Optional[str] = ..., states: _Optional[_Iterable[_Union[GossipMemberState, _Mapping]]] = ..., join: _Optional[bool] = ...) -> None: ...

class GossipPushPullResponse(_message.Message):
    __slots__ = ("sender", "states")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    sender: str
    states: _containers.RepeatedCompositeFieldContainer[GossipMemberState]
    def __init__(self, sender: _Optional[str] = ..., states: _Optional[_Iterable[_Union[GossipMemberState, _Mapping]]] = ...) -> None: ...
