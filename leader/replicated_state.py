"""The replicated state machine: `ClusterState` plus client sessions, fed committed entries.

Rules:
- A committed NORMAL entry carries a `Command`: a client id, the client's sequence
  number for this write, the lowest sequence number it still awaits an answer for
  (`first_unacked`), and the `Txn` (as `Txn.to_json()`). Encoding (big-endian):
  version u8 | len(client id) u16 | client id utf-8 | seq u64 | first_unacked u64 |
  txn JSON. No pickle, no eval; an unknown version is refused.
- Exactly once (Raft thesis §6.3): each client has a session holding the outcome of its
  recent writes by sequence number. A command whose seq already has an outcome is a
  retry: it is not applied again and answers with the first outcome. A seq below the
  session's floor was answered and forgotten: it is ignored. The floor rises to the
  client's `first_unacked`, so the session keeps exactly the writes the client may
  still retry; `MAX_RESULTS` caps a client that never raises it.
- Sessions are evicted least-recently-used beyond `MAX_SESSIONS`, by apply order, so
  every server evicts the same ones.
- A transaction that `ClusterState.apply` refuses (an unknown kind) changes nothing
  and records its error as the outcome, identically on every server.
- Everything here is deterministic: the same entries in the same order give the same
  state, sessions and snapshot bytes on every server.
- The server table (Raft id → the server's address) is replicated too: it changes when
  a membership change is applied (`set_server`/`remove_server`, from the change's
  context), so every server, and one that joins later from a snapshot, knows where its
  peers are.
- Snapshot bytes: `MAGIC` | len(sessions JSON) u32 | sessions JSON (with the server
  table under "servers") | the ClusterState snapshot. `restore` also accepts a bare
  ClusterState snapshot (no sessions) and empty bytes (the empty state).
"""

from __future__ import annotations

import json
import struct
from collections import OrderedDict
from dataclasses import dataclass

from shoal.errors import Conflict
from shoal.leader.state import ClusterState, Txn

__all__ = [
    "MAX_SESSIONS",
    "MAX_RESULTS",
    "Command",
    "Outcome",
    "encode_command",
    "decode_command",
    "Sessions",
    "ReplicatedState",
]

MAX_SESSIONS = 4096
"""Clients remembered. Every server process is one client of its own store, and API
callers that retry are a few more each; 4,096 outlives any realistic churn."""

MAX_RESULTS = 4096
"""Outcomes kept per client when it never raises its floor (more writes in flight
than this from one client would be a bug in that client)."""

_VERSION = 1
_HEAD = struct.Struct(">BH")
_SEQS = struct.Struct(">QQ")
_SNAP_MAGIC = b"SHOALSM1"
_LEN = struct.Struct(">I")


@dataclass(frozen=True, slots=True, kw_only=True)
class Command:
    """A client write as it travels through the log."""

    client_id: str
    seq: int
    first_unacked: int
    txn_json: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What applying a command did: the revision it produced, or why it did nothing."""

    client_id: str
    seq: int
    revision: int
    duplicate: bool = False
    error: str | None = None


def encode_command(client_id: str, seq: int, first_unacked: int, txn: Txn | str) -> bytes:
    client = client_id.encode()
    if not client or len(client) > 0xFFFF:
        raise ValueError("a client id must be 1..65535 bytes of UTF-8")
    if seq < 1 or not 0 <= first_unacked <= seq:
        raise ValueError(f"need seq ≥ 1 and 0 ≤ first_unacked ≤ seq, got {seq}, {first_unacked}")
    body = txn if isinstance(txn, str) else txn.to_json()
    return _HEAD.pack(_VERSION, len(client)) + client + _SEQS.pack(seq, first_unacked) + body.encode()


def decode_command(data: bytes) -> Command:
    if len(data) < _HEAD.size:
        raise ValueError("a command shorter than its header")
    version, n = _HEAD.unpack_from(data)
    if version != _VERSION:
        raise ValueError(f"command encoding version {version} is not supported")
    off = _HEAD.size
    client = data[off : off + n].decode()
    off += n
    seq, first_unacked = _SEQS.unpack_from(data, off)
    off += _SEQS.size
    return Command(client_id=client, seq=seq, first_unacked=first_unacked, txn_json=data[off:].decode())


class _Session:
    __slots__ = ("floor", "results")

    def __init__(self, floor: int = 0) -> None:
        self.floor = floor
        # seq -> (revision, error or None), in seq order of application
        self.results: OrderedDict[int, tuple[int, str | None]] = OrderedDict()


class Sessions:
    """Per-client outcomes of recent writes, for exactly-once application."""

    __slots__ = ("_clients",)

    def __init__(self) -> None:
        self._clients: OrderedDict[str, _Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._clients)

    def lookup(self, client_id: str, seq: int) -> Outcome | None:
        """The outcome recorded for (client, seq), if it is still known."""
        s = self._clients.get(client_id)
        if s is None:
            return None
        r = s.results.get(seq)
        if r is None:
            return None
        return Outcome(client_id=client_id, seq=seq, revision=r[0], duplicate=True, error=r[1])

    def is_stale(self, client_id: str, seq: int) -> bool:
        s = self._clients.get(client_id)
        return s is not None and seq < s.floor

    def record(self, client_id: str, seq: int, first_unacked: int, revision: int, error: str | None) -> None:
        s = self._clients.pop(client_id, None) or _Session()
        self._clients[client_id] = s  # most recently used last
        s.results[seq] = (revision, error)
        if first_unacked > s.floor:
            s.floor = first_unacked
            # Results are kept in application order, which for one client is its seq
            # order: drop from the front (a scan of every result would cost O(results)
            # per write). A straggler below the floor behind a higher seq goes with the
            # MAX_RESULTS cap; the same on every server either way.
            while s.results and next(iter(s.results)) < s.floor:
                s.results.popitem(last=False)
        while len(s.results) > MAX_RESULTS:
            s.results.popitem(last=False)
        while len(self._clients) > MAX_SESSIONS:
            self._clients.popitem(last=False)

    def to_json(self) -> dict[str, object]:
        return {
            "clients": [
                [client, s.floor, [[seq, rev, err] for seq, (rev, err) in s.results.items()]]
                for client, s in self._clients.items()
            ]
        }

    @classmethod
    def from_json(cls, raw: dict[str, object]) -> Sessions:
        sessions = cls()
        clients = raw.get("clients", [])
        assert isinstance(clients, list)
        for client, floor, results in clients:
            s = _Session(floor)
            for seq, rev, err in results:
                s.results[seq] = (rev, err)
            sessions._clients[client] = s
        return sessions


class ReplicatedState:
    """ClusterState + Sessions + the last applied index: what every server agrees on."""

    __slots__ = ("state", "sessions", "applied", "servers")

    def __init__(self) -> None:
        self.state = ClusterState()
        self.sessions = Sessions()
        self.applied = 0
        self.servers: dict[int, str] = {}

    def set_server(self, index: int, node_id: int, address: str) -> None:
        """A membership change at `index` added (or re-addressed) server `node_id`."""
        self.servers[node_id] = address
        self.applied = index

    def remove_server(self, index: int, node_id: int) -> None:
        self.servers.pop(node_id, None)
        self.applied = index

    def apply_noop(self, index: int) -> None:
        """An entry with no command (a leader's no-op, a membership change)."""
        self.applied = index

    def apply(self, index: int, data: bytes) -> Outcome:
        """Apply the command in a committed NORMAL entry at `index`."""
        self.applied = index
        try:
            cmd = decode_command(data)
        except (ValueError, UnicodeDecodeError, struct.error) as exc:
            # Deterministic on every server; the proposer validated it, so this is damage
            # or a newer encoding: it changes nothing.
            return Outcome(client_id="", seq=0, revision=self.state.revision, error=f"undecodable command: {exc}")
        known = self.sessions.lookup(cmd.client_id, cmd.seq)
        if known is not None:
            return known
        if self.sessions.is_stale(cmd.client_id, cmd.seq):
            return Outcome(client_id=cmd.client_id, seq=cmd.seq, revision=self.state.revision, duplicate=True)
        error: str | None = None
        try:
            self.state.apply(Txn.from_json(cmd.txn_json))
        except Conflict as exc:
            error = str(exc)  # "conflict: ...": the caller reads again and retries
        except (ValueError, KeyError, TypeError) as exc:
            error = f"transaction refused: {exc}"
        revision = self.state.revision
        self.sessions.record(cmd.client_id, cmd.seq, cmd.first_unacked, revision, error)
        return Outcome(client_id=cmd.client_id, seq=cmd.seq, revision=revision, error=error)

    def snapshot(self) -> bytes:
        raw = self.sessions.to_json()
        raw["servers"] = [[id, addr] for id, addr in sorted(self.servers.items())]
        sessions = json.dumps(raw, separators=(",", ":")).encode()
        return _SNAP_MAGIC + _LEN.pack(len(sessions)) + sessions + self.state.to_snapshot()

    def restore(self, data: bytes, index: int) -> None:
        if not data:
            self.state, self.sessions, self.servers = ClusterState(), Sessions(), {}
        elif data.startswith(_SNAP_MAGIC):
            off = len(_SNAP_MAGIC)
            (n,) = _LEN.unpack_from(data, off)
            off += _LEN.size
            raw = json.loads(data[off : off + n])
            self.sessions = Sessions.from_json(raw)
            self.servers = {int(id): str(addr) for id, addr in raw.get("servers", [])}
            self.state = ClusterState.from_snapshot(data[off + n :])
        else:
            self.state, self.sessions, self.servers = ClusterState.from_snapshot(data), Sessions(), {}
        self.applied = index
