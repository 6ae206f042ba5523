"""The cluster state: a deterministic state machine over JSON documents.

Rules:
- The state is a set of collections (`deployments`, `services`, `replicas`, `nodes`,
  `tables`), each a map from name to a JSON-compatible dict, plus an append-only event
  log with sequence numbers, of which the newest `EVENTS_KEPT` are kept.
- It changes only through `apply(txn)`: a `Txn` is a list of `Put`/`Delete` ops and
  events, applied all together or (if an op is invalid) not at all. Applying the same
  transactions in the same order gives the same state on every server: this is the state
  machine the replicated log (Raft) drives, and what the single-node SQLite store drives
  today.
- Every applied transaction bumps `revision` by one; watchers wait on it. Each object
  remembers the revision that last changed it (`mod_revision`), and a transaction may
  carry expectations (`Txn.expect`: kind, name, mod_revision); if any object changed
  since, the whole transaction is refused with `Conflict` (optimistic concurrency: a
  read-modify-write never overwrites a change it did not see). `Txn.guarded(state)`
  adds the expectations for every object a transaction writes.

Records are plain dicts on purpose: they travel through the log and the database as JSON
(never pickle), and the typed views (`shoal.leader.records`) are built at the edges.
"""

from __future__ import annotations

import copy
import json
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from shoal.errors import Conflict

__all__ = ["KINDS", "EVENTS_KEPT", "Put", "Delete", "NewEvent", "Txn", "ClusterState"]

KINDS = ("deployments", "services", "replicas", "nodes", "tables")
# Events are for people reading `shoal events`: a few thousand cover hours of a busy
# cluster without making the state (and so snapshots) large.
EVENTS_KEPT = 2000

JSON = dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class Put:
    kind: str
    name: str
    value: JSON


@dataclass(frozen=True, slots=True, kw_only=True)
class Delete:
    kind: str
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class NewEvent:
    """An event to record; its sequence number is assigned when applied."""

    time: float
    type: str  # Normal | Warning
    reason: str
    object: str
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Txn:
    ops: tuple[Put | Delete, ...] = ()
    events: tuple[NewEvent, ...] = ()
    expect: tuple[tuple[str, str, int], ...] = ()  # (kind, name, mod_revision) as read

    def __bool__(self) -> bool:
        return bool(self.ops or self.events)

    def guarded(self, state: ClusterState) -> Txn:
        """This transaction, valid only if nothing it writes changed since `state`."""
        seen = sorted({(op.kind, op.name) for op in self.ops})
        return Txn(ops=self.ops, events=self.events,
                   expect=tuple((k, n, state.mod_revision(k, n)) for k, n in seen))

    def to_json(self) -> str:
        return json.dumps(
            {
                "ops": [
                    {"op": "put", "kind": o.kind, "name": o.name, "value": o.value}
                    if isinstance(o, Put)
                    else {"op": "delete", "kind": o.kind, "name": o.name}
                    for o in self.ops
                ],
                "events": [
                    {"time": e.time, "type": e.type, "reason": e.reason, "object": e.object, "message": e.message}
                    for e in self.events
                ],
                **({"expect": [list(x) for x in self.expect]} if self.expect else {}),
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> Txn:
        data = json.loads(text)
        ops: list[Put | Delete] = []
        for o in data.get("ops", []):
            if o["op"] == "put":
                ops.append(Put(kind=o["kind"], name=o["name"], value=o["value"]))
            elif o["op"] == "delete":
                ops.append(Delete(kind=o["kind"], name=o["name"]))
            else:
                raise ValueError(f"unknown op {o['op']!r}")
        events = tuple(NewEvent(**e) for e in data.get("events", []))
        expect = tuple((str(k), str(n), int(r)) for k, n, r in data.get("expect", []))
        return cls(ops=tuple(ops), events=events, expect=expect)


@dataclass(slots=True)
class ClusterState:
    revision: int = 0
    next_event_seq: int = 1
    collections: dict[str, dict[str, JSON]] = field(default_factory=lambda: {k: {} for k in KINDS})
    events: deque[JSON] = field(default_factory=lambda: deque(maxlen=EVENTS_KEPT))
    mods: dict[str, dict[str, int]] = field(default_factory=lambda: {k: {} for k in KINDS})

    def mod_revision(self, kind: str, name: str) -> int:
        """The revision that last changed this object (0: it does not exist)."""
        return self.mods[kind].get(name, 0)

    def check(self, txn: Txn) -> None:
        """Raise if `txn` cannot apply: an unknown kind (ValueError) or an object changed
        since it was read (`Conflict`)."""
        for op in txn.ops:
            if op.kind not in self.collections:
                raise ValueError(f"unknown kind {op.kind!r}")
        for kind, name, rev in txn.expect:
            if kind not in self.mods:
                raise ValueError(f"unknown kind {kind!r}")
            now = self.mod_revision(kind, name)
            if now != rev:
                raise Conflict(f"conflict: {kind}/{name} changed at revision {now} after it was read "
                               f"(at {rev}); read it again and retry")

    def apply(self, txn: Txn) -> int:
        """Apply a transaction atomically; returns the new revision."""
        self.check(txn)
        new = self.revision + 1
        for op in txn.ops:
            if isinstance(op, Put):
                self.collections[op.kind][op.name] = copy.deepcopy(op.value)
                self.mods[op.kind][op.name] = new
            else:
                self.collections[op.kind].pop(op.name, None)
                self.mods[op.kind].pop(op.name, None)
        for e in txn.events:
            self.events.append(
                {
                    "seq": self.next_event_seq,
                    "time": e.time,
                    "type": e.type,
                    "reason": e.reason,
                    "object": e.object,
                    "message": e.message,
                }
            )
            self.next_event_seq += 1
        self.revision += 1
        return self.revision

    def get(self, kind: str, name: str) -> JSON | None:
        value = self.collections[kind].get(name)
        return copy.deepcopy(value) if value is not None else None

    def list(self, kind: str) -> list[JSON]:
        return [copy.deepcopy(v) for _, v in sorted(self.collections[kind].items())]

    def names(self, kind: str) -> Iterator[str]:
        return iter(sorted(self.collections[kind]))

    def events_since(self, seq: int) -> list[JSON]:
        return [dict(e) for e in self.events if e["seq"] > seq]

    def to_snapshot(self) -> bytes:
        """The whole state as canonical JSON (the Raft snapshot format)."""
        return json.dumps(
            {
                "revision": self.revision,
                "next_event_seq": self.next_event_seq,
                "collections": self.collections,
                "events": list(self.events),
                "mods": self.mods,
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_snapshot(cls, data: bytes) -> ClusterState:
        raw = json.loads(data)
        state = cls(revision=raw["revision"], next_event_seq=raw["next_event_seq"])
        for kind in KINDS:
            state.collections[kind] = dict(raw["collections"].get(kind, {}))
            state.mods[kind] = {n: int(r) for n, r in raw.get("mods", {}).get(kind, {}).items()}
        state.events.extend(raw["events"])
        return state
