"""The messages SWIM members exchange: values only, no encoding.

Rules:
- Every message is a frozen, slotted, keyword-only dataclass. The wire format (protobuf,
  a cluster name in every packet, several messages packed into one datagram) lives in the
  shell's adapter module; the core never sees bytes.
- Failure detection (sent to one member, never re-gossiped): `Ping`, `Ack`, `Nack`,
  `PingReq`. `seq` ties an ack or nack to the probe that asked for it.
- Dissemination (gossiped and piggybacked, retransmitted a limited number of times):
  `Alive`, `Suspect`, `Dead`. A graceful leave is a `Dead` whose `accuser` is the member
  itself (`Dead.is_leave`).
- State sync over a stream (TCP): `PushPullRequest` carries the sender's full view, the
  answer `PushPullResponse` carries the responder's view *after* merging the request.
- `Compound` is several messages that arrived in one datagram; the core unpacks it.

How it works: `approx_size` estimates an encoded size so the broadcast queue can pack a
datagram below the MTU when the shell does not inject its exact size function.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.agent.swim.member import Address, Meta, State

__all__ = [
    "Ping",
    "Ack",
    "Nack",
    "PingReq",
    "Alive",
    "Suspect",
    "Dead",
    "MemberState",
    "PushPullRequest",
    "PushPullResponse",
    "Compound",
    "Message",
    "Broadcast",
    "PushPull",
    "approx_size",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping:
    """Are you alive? `target` is the name the sender means, so a reused address is caught.

    `source` names the sender: a member pinged by one it does not know (it missed that
    join) or thinks dead (a healed partition) syncs with it at once.
    """

    seq: int
    target: str
    source: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack:
    """Yes: the answer to the `Ping` (or relayed `PingReq`) with the same `seq`."""

    seq: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Nack:
    """Lifeguard: the helper of a `PingReq` got no ack from the target in time.

    It tells the prober that the helper, at least, is reachable: a prober that misses
    nacks it expected learns that the problem may be its own.
    """

    seq: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PingReq:
    """Please ping `target` for me and relay its ack (and a nack if `nack` and it fails)."""

    seq: int
    target: str
    target_address: Address
    nack: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class Alive:
    """`name` is alive at `incarnation`, reachable at `address`, with `meta`."""

    name: str
    address: Address
    incarnation: int
    meta: Meta = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Suspect:
    """`accuser` could not reach `name` (at `incarnation`); it may refute."""

    name: str
    incarnation: int
    accuser: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Dead:
    """`name` (at `incarnation`) is failed — or has left, when `accuser == name`."""

    name: str
    incarnation: int
    accuser: str

    @property
    def is_leave(self) -> bool:
        """A dead-from-self: the member announces its own graceful departure."""
        return self.accuser == self.name


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberState:
    """One member in a full-state push-pull exchange."""

    name: str
    address: Address
    incarnation: int
    state: State
    meta: Meta = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class PushPullRequest:
    """The sender's full view; `join` is set on the first exchange of a joining member."""

    sender: str
    states: tuple[MemberState, ...]
    join: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class PushPullResponse:
    """The responder's full view, taken after it merged the request."""

    sender: str
    states: tuple[MemberState, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Compound:
    """Several messages that travelled in one datagram, in the order they were packed."""

    messages: tuple[Message, ...]


Broadcast = Alive | Suspect | Dead
"""A message that is gossiped (retransmit-limited) rather than sent to one member."""

PushPull = PushPullRequest | PushPullResponse
"""A message that travels over a stream (TCP), never in a datagram."""

Message = Ping | Ack | Nack | PingReq | Alive | Suspect | Dead | PushPullRequest | PushPullResponse | Compound
"""Anything `Swim.step` accepts."""

# Rough per-field costs of a protobuf-like encoding: a tag and a length or varint each.
_HEADER = 2
_FIELD = 2
_VARINT = 5


def approx_size(message: Message) -> int:
    """Estimated encoded bytes of one message (an upper bound for typical values)."""
    if isinstance(message, (Ping, Ack, Nack)):
        extra = len(message.target) + len(message.source) + 2 * _FIELD if isinstance(message, Ping) else 0
        return _HEADER + _FIELD + _VARINT + extra
    if isinstance(message, PingReq):
        return _HEADER + 3 * _FIELD + 2 * _VARINT + len(message.target) + len(message.target_address[0]) + 1
    if isinstance(message, Alive):
        meta = sum(len(k) + len(v) + 2 * _FIELD for k, v in message.meta)
        return (
            _HEADER + 4 * _FIELD + 2 * _VARINT + len(message.name) + len(message.address[0]) + meta
        )
    if isinstance(message, (Suspect, Dead)):
        return _HEADER + 3 * _FIELD + _VARINT + len(message.name) + len(message.accuser)
    if isinstance(message, (PushPullRequest, PushPullResponse)):
        per = sum(
            _HEADER + 5 * _FIELD + 3 * _VARINT + len(s.name) + len(s.address[0])
            + sum(len(k) + len(v) + 2 * _FIELD for k, v in s.meta)
            for s in message.states
        )
        return _HEADER + _FIELD + len(message.sender) + per
    return _HEADER + sum(approx_size(m) + _FIELD for m in message.messages)
