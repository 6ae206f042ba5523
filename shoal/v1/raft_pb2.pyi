from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RaftEntryKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RAFT_ENTRY_NORMAL: _ClassVar[RaftEntryKind]
    RAFT_ENTRY_CONF_CHANGE: _ClassVar[RaftEntryKind]
RAFT_ENTRY_NORMAL: RaftEntryKind
RAFT_ENTRY_CONF_CHANGE: RaftEntryKind

class RaftAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RaftBatch(_message.Message):
    __slots__ = ("cluster_id", "from_id", "to_id", "messages")
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_ID_FIELD_NUMBER: _ClassVar[int]
    TO_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    from_id: int
    to_id: int
    messages: _containers.RepeatedCompositeFieldContainer[RaftMessage]
    def __init__(self, cluster_id: _Optional[str] = ..., from_id: _Optional[int] = ..., to_id: _Optional[int] = ..., messages: _Optional[_Iterable[_Union[RaftMessage, _Mapping]]] = ...) -> None: ...

class RaftEntry(_message.Message):
    __slots__ = ("term", "index", "kind", "data")
    TERM_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    term: int
    index: int
    kind: RaftEntryKind
    data: bytes
    def __init__(self, term: _Optional[int] = ..., index: _Optional[int] = ..., kind: _Optional[_Union[RaftEntryKind, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class RaftMessage(_message.Message):
    __slots__ = ("term", "propose", "append", "append_response", "vote", "vote_response", "pre_vote", "pre_vote_response", "heartbeat", "heartbeat_response", "read_index", "read_index_response", "timeout_now", "transfer_leader")
    TERM_FIELD_NUMBER: _ClassVar[int]
    PROPOSE_FIELD_NUMBER: _ClassVar[int]
    APPEND_FIELD_NUMBER: _ClassVar[int]
    APPEND_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    VOTE_FIELD_NUMBER: _ClassVar[int]
    VOTE_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    PRE_VOTE_FIELD_NUMBER: _ClassVar[int]
    PRE_VOTE_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    READ_INDEX_FIELD_NUMBER: _ClassVar[int]
    READ_INDEX_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_NOW_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_LEADER_FIELD_NUMBER: _ClassVar[int]
    term: int
    propose: RaftPropose
    append: RaftAppend
    append_response: RaftAppendResponse
    vote: RaftVote
    vote_response: RaftVoteResponse
    pre_vote: RaftPreVote
    pre_vote_response: RaftPreVoteResponse
    heartbeat: RaftHeartbeat
    heartbeat_response: RaftHeartbeatResponse
    read_index: RaftReadIndex
    read_index_response: RaftReadIndexResponse
    timeout_now: RaftTimeoutNow
    transfer_leader: RaftTransferLeader
    def __init__(self, term: _Optional[int] = ..., propose: _Optional[_Union[RaftPropose, _Mapping]] = ..., append: _Optional[_Union[RaftAppend, _Mapping]] = ..., append_response: _Optional[_Union[RaftAppendResponse, _Mapping]] = ..., vote: _Optional[_Union[RaftVote, _Mapping]] = ..., vote_response: _Optional[_Union[RaftVoteResponse, _Mapping]] = ..., pre_vote: _Optional[_Union[RaftPreVote, _Mapping]] = ..., pre_vote_response: _Optional[_Union[RaftPreVoteResponse, _Mapping]] = ..., heartbeat: _Optional[_Union[RaftHeartbeat, _Mapping]] = ..., heartbeat_response: _Optional[_Union[RaftHeartbeatResponse, _Mapping]] = ..., read_index: _Optional[_Union[RaftReadIndex, _Mapping]] = ..., read_index_response: _Optional[_Union[RaftReadIndexResponse, _Mapping]] = ..., timeout_now: _Optional[_Union[RaftTimeoutNow, _Mapping]] = ..., transfer_leader: _Optional[_Union[RaftTransferLeader, _Mapping]] = ...) -> None: ...

class RaftPropose(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[RaftEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[RaftEntry, _Mapping]]] = ...) -> None: ...

class RaftAppend(_message.Message):
    __slots__ = ("log_term", "index", "entries", "commit")
    LOG_TERM_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    log_term: int
    index: int
    entries: _containers.RepeatedCompositeFieldContainer[RaftEntry]
    commit: int
    def __init__(self, log_term: _Optional[int] = ..., index: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[RaftEntry, _Mapping]]] = ..., commit: _Optional[int] = ...) -> None: ...

class RaftAppendResponse(_message.Message):
    __slots__ = ("index", "reject", "reject_hint", "log_term")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REJECT_FIELD_NUMBER: _ClassVar[int]
    REJECT_HINT_FIELD_NUMBER: _ClassVar[int]
    LOG_TERM_FIELD_NUMBER: _ClassVar[int]
    index: int
    reject: bool
    reject_hint: int
    log_term: int
    def __init__(self, index: _Optional[int] = ..., reject: _Optional[bool] = ..., reject_hint: _Optional[int] = ..., log_term: _Optional[int] = ...) -> None: ...

class RaftVote(_message.Message):
    __slots__ = ("last_index", "last_term", "transfer")
    LAST_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAST_TERM_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    last_index: int
    last_term: int
    transfer: bool
    def __init__(self, last_index: _Optional[int] = ..., last_term: _Optional[int] = ..., transfer: _Optional[bool] = ...) -> None: ...

class RaftVoteResponse(_message.Message):
    __slots__ = ("reject",)
    REJECT_FIELD_NUMBER: _ClassVar[int]
    reject: bool
    def __init__(self, reject: _Optional[bool] = ...) -> None: ...

class RaftPreVote(_message.Message):
    __slots__ = ("last_index", "last_term")
    LAST_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAST_TERM_FIELD_NUMBER: _ClassVar[int]
    last_index: int
    last_term: int
    def __init__(self, last_index: _Optional[int] = ..., last_term: _Optional[int] = ...) -> None: ...

class RaftPreVoteResponse(_message.Message):
    __slots__ = ("reject",)
    REJECT_FIELD_NUMBER: _ClassVar[int]
    reject: bool
    def __init__(self, reject: _Optional[bool] = ...) -> None: ...

class RaftHeartbeat(_message.Message):
    __slots__ = ("commit", "context")
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    commit: int
    context: bytes
    def __init__(self, commit: _Optional[int] = ..., context: _Optional[bytes] = ...) -> None: ...

class RaftHeartbeatResponse(_message.Message):
    __slots__ = ("context",)
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    context: bytes
    def __init__(self, context: _Optional[bytes] = ...) -> None: ...

class RaftReadIndex(_message.Message):
    __slots__ = ("context",)
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    context: bytes
    def __init__(self, context: _Optional[bytes] = ...) -> None: ...

class RaftReadIndexResponse(_message.Message):
    __slots__ = ("index", "context")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    index: int
    context: bytes
    def __init__(self, index: _Optional[int] = ..., context: _Optional[bytes] = ...) -> None: ...

class RaftTimeoutNow(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RaftTransferLeader(_message.Message):
    __slots__ = ("transferee",)
    TRANSFEREE_FIELD_NUMBER: _ClassVar[int]
    transferee: int
    def __init__(self, transferee: _Optional[int] = ...) -> None: ...

class RaftSnapshotHeader(_message.Message):
    __slots__ = ("term", "index", "snapshot_term", "voters", "learners", "size", "sha256")
    TERM_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_TERM_FIELD_NUMBER: _ClassVar[int]
    VOTERS_FIELD_NUMBER: _ClassVar[int]
    LEARNERS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    term: int
    index: int
    snapshot_term: int
    voters: _containers.RepeatedScalarFieldContainer[int]
    learners: _containers.RepeatedScalarFieldContainer[int]
    size: int
    sha256: bytes
    def __init__(self, term: _Optional[int] = ..., index: _Optional[int] = ..., snapshot_term: _Optional[int] = ..., voters: _Optional[_Iterable[int]] = ..., learners: _Optional[_Iterable[int]] = ..., size: _Optional[int] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class RaftSnapshotChunk(_message.Message):
    __slots__ = ("cluster_id", "from_id", "to_id", "header", "data")
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_ID_FIELD_NUMBER: _ClassVar[int]
    TO_ID_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    from_id: int
    to_id: int
    header: RaftSnapshotHeader
    data: bytes
    def __init__(self, cluster_id: _Optional[str] = ..., from_id: _Optional[int] = ..., to_id: _Optional[int] = ..., header: _Optional[_Union[RaftSnapshotHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...
