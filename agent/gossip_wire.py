"""The gossip wire format: the one adapter between SWIM messages and protobuf bytes.

Rules:
- Every datagram and every stream frame is one `shoal.v1.Packet` (gossip.proto) behind
  a fixed header, and names its cluster. Nothing else converts SWIM messages.

      datagram:  0x53 'S' | version 1 | payload length, 2 bytes big-endian | Packet
      frame:     0x53 'S' | version 1 | payload length, 4 bytes big-endian | Packet

  The length is what makes a truncated datagram recognisable (protobuf alone would
  parse a datagram cut at a field boundary as a shorter, valid one); the version byte
  leaves room for encrypted packets later.
- A datagram carries failure-detection and dissemination messages (several, packed in
  order, at most `max_bytes` in all); a frame carries exactly one push-pull message.
  Push-pull never travels in a datagram: a spoofed UDP source could otherwise make a
  member open TCP connections to a victim.
- Input is hostile. `decode` and `decode_frame` either return messages the core can
  take as they are or raise a `WireError` subclass whose `reason` says why
  (`DropReason`): longer than the limit (oversized), shorter than its header says
  (truncated), not ours or not valid (malformed), another cluster's (foreign). They
  raise nothing else, whatever the bytes. Valid means: every address is an IP literal
  with a port in 1..65535, every name is non-empty, every state is a known one.
- A message kind this version does not know (the oneof is empty to us) is skipped, not
  fatal: a newer agent may add kinds without cutting older ones off its gossip.

How it works: each message is serialized once as a `GossipMessage`, then datagrams are
built by concatenating protobuf field records (tag, length, bytes), which is exactly
how protobuf encodes a repeated field; so packing is a byte count, not a re-encode, and
`message_size` is the exact cost the shell injects into the core (`Swim(size_of=...)`).
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

from google.protobuf.message import DecodeError

from shoal.agent.swim.member import Address, State, make_meta
from shoal.agent.swim.messages import (
    Ack,
    Alive,
    Compound,
    Dead,
    MemberState,
    Message,
    Nack,
    Ping,
    PingReq,
    PushPull,
    PushPullRequest,
    PushPullResponse,
    Suspect,
)
from shoal.errors import ShoalError
from shoal.v1 import gossip_pb2 as pb

__all__ = [
    "MAGIC",
    "VERSION",
    "DATAGRAM_HEADER",
    "FRAME_HEADER",
    "DEFAULT_MAX_BYTES",
    "MAX_DATAGRAM",
    "MAX_FRAME",
    "MAX_CLUSTER_NAME",
    "DropReason",
    "WireError",
    "TruncatedPacket",
    "OversizedPacket",
    "MalformedPacket",
    "ForeignCluster",
    "Encoded",
    "encode_packets",
    "decode",
    "encode_frame",
    "frame_length",
    "decode_frame",
    "message_size",
    "packet_overhead",
    "to_proto",
    "from_proto",
]

MAGIC = 0x53  # 'S'
VERSION = 1
DATAGRAM_HEADER = 4  # magic, version, 2-byte length
FRAME_HEADER = 6  # magic, version, 4-byte length
# A safe datagram below a 1500-byte Ethernet MTU, IP and UDP headers included.
DEFAULT_MAX_BYTES = 1400
# No legitimate datagram comes near this (senders stay below the MTU); anything longer is
# refused before it is parsed. UDP itself cannot carry more than 65,507 bytes over IPv4.
MAX_DATAGRAM = 64 * 1024
# A push-pull frame carries the full view: 10,000 members with the 512-byte metadata cap
# are about 6 MB, so 16 MiB leaves headroom while bounding what a peer can make us buffer.
MAX_FRAME = 16 * 1024 * 1024
# The cluster name goes in every datagram: 32 bytes keeps a full 1,400-byte payload plus
# header and name below 1,452 bytes, the UDP payload of a 1500-byte MTU over IPv6.
MAX_CLUSTER_NAME = 32

_PACKET_CLUSTER_TAG = b"\x0a"  # Packet.cluster: field 1, length-delimited
_PACKET_MESSAGE_TAG = b"\x12"  # Packet.messages: field 2, length-delimited


class DropReason(enum.Enum):
    """Why an incoming datagram or frame was dropped (the label of the drop counters)."""

    MALFORMED = "malformed"
    TRUNCATED = "truncated"
    OVERSIZED = "oversized"
    FOREIGN_CLUSTER = "foreign_cluster"


class WireError(ShoalError):
    """Incoming gossip bytes that cannot be accepted; `reason` says which kind of bad."""

    reason: ClassVar[DropReason]

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"dropped a gossip packet ({self.reason.value}): {detail}")


class TruncatedPacket(WireError):
    """Shorter than its header says: cut in transit or by a buggy sender."""

    reason = DropReason.TRUNCATED


class OversizedPacket(WireError):
    """Longer than the limit; refused before parsing."""

    reason = DropReason.OVERSIZED

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"{size} bytes, more than the limit of {limit}")


class MalformedPacket(WireError):
    """Not a shoal gossip packet, or one whose content is invalid."""

    reason = DropReason.MALFORMED


class ForeignCluster(WireError):
    """A valid packet of another cluster (a misconfigured or neighbouring agent)."""

    reason = DropReason.FOREIGN_CLUSTER

    def __init__(self, cluster: str, expected: str) -> None:
        self.cluster = cluster
        self.expected = expected
        super().__init__(f"cluster {cluster[:64]!r}, this agent is in {expected!r}")


@dataclass(frozen=True, slots=True)
class Encoded:
    """Datagrams ready to send, and how many messages were too large to send at all."""

    datagrams: tuple[bytes, ...]
    too_large: int = 0


# ---------------------------------------------------------------------------- encoding


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _record(tag: bytes, body: bytes) -> bytes:
    """One length-delimited protobuf field: tag, length, bytes."""
    return tag + _varint(len(body)) + body


def _cluster_field(cluster: str) -> bytes:
    raw = cluster.encode()
    return _record(_PACKET_CLUSTER_TAG, raw) if raw else b""


def packet_overhead(cluster: str) -> int:
    """Bytes of a datagram that are not messages: the header and the cluster name."""
    return DATAGRAM_HEADER + len(_cluster_field(cluster))


def _address_pb(address: Address) -> pb.GossipAddress:
    return pb.GossipAddress(host=address[0], port=address[1])


_STATE_TO_PB: Mapping[State, int] = MappingProxyType({
    State.ALIVE: pb.GOSSIP_MEMBER_STATUS_ALIVE,
    State.SUSPECT: pb.GOSSIP_MEMBER_STATUS_SUSPECT,
    State.DEAD: pb.GOSSIP_MEMBER_STATUS_DEAD,
    State.LEFT: pb.GOSSIP_MEMBER_STATUS_LEFT,
})
_PB_TO_STATE: Mapping[int, State] = MappingProxyType({v: k for k, v in _STATE_TO_PB.items()})


def _member_state_pb(s: MemberState) -> pb.GossipMemberState:
    return pb.GossipMemberState(
        name=s.name,
        address=_address_pb(s.address),
        incarnation=s.incarnation,
        state=_STATE_TO_PB[s.state],  # type: ignore[arg-type]
        meta=dict(s.meta),
    )


def to_proto(message: Message) -> pb.GossipMessage:
    """The protobuf twin of one core message (a `Compound` is not one message)."""
    match message:
        case Ping():
            return pb.GossipMessage(ping=pb.GossipPing(seq=message.seq, target=message.target, source=message.source))
        case Ack():
            return pb.GossipMessage(ack=pb.GossipAck(seq=message.seq))
        case Nack():
            return pb.GossipMessage(nack=pb.GossipNack(seq=message.seq))
        case PingReq():
            return pb.GossipMessage(
                ping_req=pb.GossipPingReq(
                    seq=message.seq,
                    target=message.target,
                    target_address=_address_pb(message.target_address),
                    nack=message.nack,
                )
            )
        case Alive():
            return pb.GossipMessage(
                alive=pb.GossipAlive(
                    name=message.name,
                    address=_address_pb(message.address),
                    incarnation=message.incarnation,
                    meta=dict(message.meta),
                )
            )
        case Suspect():
            return pb.GossipMessage(
                suspect=pb.GossipSuspect(name=message.name, incarnation=message.incarnation, accuser=message.accuser)
            )
        case Dead():
            return pb.GossipMessage(
                dead=pb.GossipDead(name=message.name, incarnation=message.incarnation, accuser=message.accuser)
            )
        case PushPullRequest():
            return pb.GossipMessage(
                push_pull_request=pb.GossipPushPullRequest(
                    sender=message.sender,
                    states=[_member_state_pb(s) for s in message.states],
                    join=message.join,
                )
            )
        case PushPullResponse():
            return pb.GossipMessage(
                push_pull_response=pb.GossipPushPullResponse(
                    sender=message.sender, states=[_member_state_pb(s) for s in message.states]
                )
            )
    raise TypeError(f"not a single gossip message: {type(message).__name__}")


def _serialize(message: Message) -> bytes:
    # deterministic=True sorts map entries (meta), so equal messages give equal bytes.
    data: bytes = to_proto(message).SerializeToString(deterministic=True)
    return data


def message_size(message: Message) -> int:
    """Exact bytes `message` adds to a datagram (its field record: tag, length, body).

    The shell passes this to `Swim(size_of=...)`. The core adds its own 2-byte estimate
    of the same framing on top, so its packing is conservative by 2 bytes per message.
    """
    n = len(_serialize(message))
    return 1 + len(_varint(n)) + n


def _flatten(messages: Iterable[Message]) -> Iterable[Message]:
    for m in messages:
        if isinstance(m, Compound):
            yield from _flatten(m.messages)
        else:
            yield m


def encode_packets(messages: Iterable[Message], cluster: str, max_bytes: int = DEFAULT_MAX_BYTES) -> Encoded:
    """Pack `messages`, in order, into as few datagrams of at most `max_bytes` as it takes.

    Messages are never reordered; a new datagram starts when the next one does not fit.
    A message that does not fit even in an empty datagram is dropped and counted in
    `too_large` (the core keeps single messages far below the MTU; this is the guard).
    Push-pull messages are stream-only and raise `TypeError`: that is a bug, not input.
    """
    head = _cluster_field(cluster)
    room = max_bytes - DATAGRAM_HEADER - len(head)
    if room <= 0:
        raise ValueError(f"max_bytes={max_bytes} leaves no room for messages after the header")
    datagrams: list[bytes] = []
    too_large = 0
    current: list[bytes] = []
    used = 0
    for m in _flatten(messages):
        if isinstance(m, (PushPullRequest, PushPullResponse)):
            raise TypeError("push-pull messages travel in stream frames (encode_frame), not datagrams")
        rec = _record(_PACKET_MESSAGE_TAG, _serialize(m))
        if len(rec) > room:
            too_large += 1
            continue
        if used + len(rec) > room:
            datagrams.append(_datagram(head, current))
            current, used = [], 0
        current.append(rec)
        used += len(rec)
    if current:
        datagrams.append(_datagram(head, current))
    return Encoded(tuple(datagrams), too_large)


def _datagram(head: bytes, records: list[bytes]) -> bytes:
    payload = head + b"".join(records)
    return bytes((MAGIC, VERSION)) + len(payload).to_bytes(2, "big") + payload


def encode_frame(message: PushPull, cluster: str) -> bytes:
    """One stream frame (header included) carrying one push-pull message."""
    if not isinstance(message, (PushPullRequest, PushPullResponse)):
        raise TypeError(f"only push-pull messages travel in stream frames, not {type(message).__name__}")
    payload = _cluster_field(cluster) + _record(_PACKET_MESSAGE_TAG, _serialize(message))
    return bytes((MAGIC, VERSION)) + len(payload).to_bytes(4, "big") + payload


# ---------------------------------------------------------------------------- decoding


class _Invalid(Exception):
    """A field that a valid message cannot have; becomes `MalformedPacket`."""


def _name(value: str, what: str) -> str:
    if not value:
        raise _Invalid(f"empty {what}")
    return value


def _address(a: pb.GossipAddress, what: str) -> Address:
    host, port = a.host, a.port
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise _Invalid(f"{what} host {host[:64]!r} is not an IP address") from None
    if not 0 < port < 65536:
        raise _Invalid(f"{what} port {port} is out of range")
    return (host, port)


def _member_state(s: pb.GossipMemberState) -> MemberState:
    state = _PB_TO_STATE.get(s.state)
    if state is None:
        raise _Invalid(f"member {s.name[:64]!r} has an unknown state ({s.state})")
    return MemberState(
        name=_name(s.name, "member name"),
        address=_address(s.address, "member"),
        incarnation=s.incarnation,
        state=state,
        meta=make_meta(s.meta.items()),
    )


def from_proto(gm: pb.GossipMessage) -> Message | None:
    """The core message of a `GossipMessage`; None for a kind this version does not know.

    Raises `MalformedPacket` for a known kind with invalid content.
    """
    try:
        return _from_proto(gm)
    except _Invalid as exc:
        raise MalformedPacket(str(exc)) from None


def _from_proto(gm: pb.GossipMessage) -> Message | None:
    kind = gm.WhichOneof("kind")
    if kind == "ping":
        p = gm.ping
        return Ping(seq=p.seq, target=_name(p.target, "ping target"), source=p.source)
    if kind == "ack":
        return Ack(seq=gm.ack.seq)
    if kind == "nack":
        return Nack(seq=gm.nack.seq)
    if kind == "ping_req":
        r = gm.ping_req
        return PingReq(
            seq=r.seq,
            target=_name(r.target, "ping-req target"),
            target_address=_address(r.target_address, "ping-req target"),
            nack=r.nack,
        )
    if kind == "alive":
        a = gm.alive
        return Alive(
            name=_name(a.name, "alive name"),
            address=_address(a.address, "alive"),
            incarnation=a.incarnation,
            meta=make_meta(a.meta.items()),
        )
    if kind == "suspect":
        s = gm.suspect
        return Suspect(
            name=_name(s.name, "suspect name"), incarnation=s.incarnation, accuser=_name(s.accuser, "accuser")
        )
    if kind == "dead":
        d = gm.dead
        return Dead(name=_name(d.name, "dead name"), incarnation=d.incarnation, accuser=_name(d.accuser, "accuser"))
    if kind == "push_pull_request":
        q = gm.push_pull_request
        return PushPullRequest(
            sender=_name(q.sender, "push-pull sender"),
            states=tuple(_member_state(s) for s in q.states),
            join=q.join,
        )
    if kind == "push_pull_response":
        r2 = gm.push_pull_response
        return PushPullResponse(
            sender=_name(r2.sender, "push-pull sender"), states=tuple(_member_state(s) for s in r2.states)
        )
    return None


def _parse(payload: bytes, cluster: str) -> list[Message]:
    """Parse a Packet, check its cluster, convert its messages (unknown kinds skipped)."""
    try:
        packet = pb.Packet.FromString(payload)
    except (DecodeError, ValueError, RecursionError, OverflowError) as exc:
        # protobuf signals bad wire data (and invalid UTF-8 in strings) as DecodeError;
        # the others are here because the input is hostile and the parser not ours.
        raise MalformedPacket(f"not a valid Packet ({type(exc).__name__})") from None
    if packet.cluster != cluster:
        raise ForeignCluster(packet.cluster, cluster)
    out: list[Message] = []
    for gm in packet.messages:
        m = from_proto(gm)
        if m is not None:
            out.append(m)
    return out


def _check_magic(data: bytes) -> None:
    if data[0] != MAGIC:
        raise MalformedPacket(f"not a shoal gossip packet (first byte 0x{data[0]:02x})")
    if data[1] != VERSION:
        raise MalformedPacket(f"unsupported wire version {data[1]} (this agent speaks {VERSION})")


def decode(datagram: bytes, cluster: str, *, max_bytes: int = MAX_DATAGRAM) -> list[Message]:
    """The messages of one datagram, in order; raises only `WireError` subclasses.

    Push-pull messages are refused (malformed): they are stream-only.
    """
    size = len(datagram)
    if size > max_bytes:
        raise OversizedPacket(size, max_bytes)
    if size < DATAGRAM_HEADER:
        raise TruncatedPacket(f"{size} bytes, shorter than the {DATAGRAM_HEADER}-byte header")
    _check_magic(datagram)
    length = int.from_bytes(datagram[2:4], "big")
    if DATAGRAM_HEADER + length > size:
        raise TruncatedPacket(f"{size - DATAGRAM_HEADER} payload bytes of the {length} announced")
    if DATAGRAM_HEADER + length < size:
        raise MalformedPacket(f"{size - DATAGRAM_HEADER - length} bytes after the announced payload")
    messages = _parse(datagram[DATAGRAM_HEADER:], cluster)
    for m in messages:
        if isinstance(m, (PushPullRequest, PushPullResponse)):
            raise MalformedPacket("a push-pull message in a datagram (it is stream-only)")
    return messages


def frame_length(header: bytes, *, max_bytes: int = MAX_FRAME) -> int:
    """The payload length announced by a stream frame's `FRAME_HEADER` bytes.

    Raises `TruncatedPacket` for a short header, `MalformedPacket` for a foreign one and
    `OversizedPacket` when the payload would exceed `max_bytes` (before reading it).
    """
    if len(header) < FRAME_HEADER:
        raise TruncatedPacket(f"{len(header)} bytes, shorter than the {FRAME_HEADER}-byte frame header")
    _check_magic(header)
    length = int.from_bytes(header[2:FRAME_HEADER], "big")
    if length > max_bytes:
        raise OversizedPacket(length, max_bytes)
    return length


def decode_frame(payload: bytes, cluster: str) -> PushPull:
    """The push-pull message of one frame's payload (after `frame_length`)."""
    messages = _parse(payload, cluster)
    if len(messages) != 1:
        raise MalformedPacket(f"a stream frame must carry one push-pull message, not {len(messages)}")
    m = messages[0]
    if not isinstance(m, (PushPullRequest, PushPullResponse)):
        raise MalformedPacket(f"a {type(m).__name__} in a stream frame (only push-pull travels there)")
    return m
