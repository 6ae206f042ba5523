"""shoal's Raft: a sans-I/O consensus core in the shape of etcd-io/raft, and its proof kit.

Modules, one concept each:
- `config`      Config (every default with its reason), profiles, timeout formulas
- `messages`    entries, hard state, snapshots, membership changes, messages (values)
- `storage`     the Storage protocol the core reads, and MemoryStorage, its twin
- `log`         the log as the core sees it: storage + unstable tail + cursors
- `progress`    per-follower replication state and the inflights window
- `quorum`      majority commit index and vote tallies
- `readonly`    ReadIndex bookkeeping
- `confchange`  single-server membership changes and cluster bootstrap
- `raft`        the state machine: roles, elections, replication
- `node`        the facade the shell drives: tick/step/propose → Ready → advance
- `sim`         a deterministic cluster simulator (network faults, crashes, clients)
- `linearizability`  a Wing–Gong/Porcupine-style checker for key-value histories

Nothing here does I/O, reads a clock or uses the global random generator.
"""

from .config import Config, election_timeout_seconds, failover_quantile
from .confchange import bootstrap_entries
from .errors import (
    ConfChangeRefused,
    IllegalTransition,
    LogCompacted,
    LogUnavailable,
    NotLeader,
    ProposalDropped,
    RaftInvariantError,
    SnapshotOutOfDate,
    SnapshotTemporarilyUnavailable,
)
from .logger import Logger, NullLogger
from .messages import (
    NONE,
    ConfChange,
    ConfChangeKind,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Message,
    MsgApp,
    MsgAppResp,
    MsgHeartbeat,
    MsgHeartbeatResp,
    MsgPreVote,
    MsgPreVoteResp,
    MsgProp,
    MsgReadIndex,
    MsgReadIndexResp,
    MsgSnap,
    MsgTimeoutNow,
    MsgTransferLeader,
    MsgVote,
    MsgVoteResp,
    Snapshot,
    SnapshotMeta,
)
from .node import Node, ProgressStatus, Ready, SoftState, Status
from .progress import ProgressState
from .raft import Role
from .readonly import ReadState
from .storage import MemoryStorage, Storage, WritableStorage

__all__ = [
    "Config",
    "election_timeout_seconds",
    "failover_quantile",
    "bootstrap_entries",
    "ConfChangeRefused",
    "IllegalTransition",
    "LogCompacted",
    "LogUnavailable",
    "NotLeader",
    "ProposalDropped",
    "RaftInvariantError",
    "SnapshotOutOfDate",
    "SnapshotTemporarilyUnavailable",
    "Logger",
    "NullLogger",
    "NONE",
    "ConfChange",
    "ConfChangeKind",
    "ConfState",
    "Entry",
    "EntryKind",
    "HardState",
    "Message",
    "MsgApp",
    "MsgAppResp",
    "MsgHeartbeat",
    "MsgHeartbeatResp",
    "MsgPreVote",
    "MsgPreVoteResp",
    "MsgProp",
    "MsgReadIndex",
    "MsgReadIndexResp",
    "MsgSnap",
    "MsgTimeoutNow",
    "MsgTransferLeader",
    "MsgVote",
    "MsgVoteResp",
    "Snapshot",
    "SnapshotMeta",
    "Node",
    "ProgressStatus",
    "Ready",
    "SoftState",
    "Status",
    "ProgressState",
    "Role",
    "ReadState",
    "MemoryStorage",
    "Storage",
    "WritableStorage",
]
