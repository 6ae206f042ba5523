"""The gossip wire adapter: every message round-trips, packing respects the size limit,
and hostile bytes raise only the typed `WireError`s (never anything else)."""

from __future__ import annotations

import random
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.agent import gossip_wire as wire
from shoal.agent.gossip_wire import (
    DropReason,
    ForeignCluster,
    MalformedPacket,
    OversizedPacket,
    TruncatedPacket,
    WireError,
)
from shoal.agent.swim.member import State
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
    PushPullRequest,
    PushPullResponse,
    Suspect,
    approx_size,
)
from shoal.v1 import gossip_pb2 as pb

CLUSTER = "prod-eu.1"
U64 = 2**64 - 1

STATES = tuple(
    MemberState(name=f"m{i}", address=(host, 7421 + i), incarnation=inc, state=state, meta=meta)
    for i, (host, inc, state, meta) in enumerate(
        [
            ("10.0.0.1", 0, State.ALIVE, (("role", "server"), ("version", "0.1.0"))),
            ("fe80::1", 7, State.SUSPECT, ()),
            ("198.18.0.3", U64, State.DEAD, (("zone", "é-ü"),)),
            ("::1", 3, State.LEFT, (("", ""),)),
        ]
    )
)

DATAGRAM_MESSAGES: list[Message] = [
    Ping(seq=1, target="node-b", source="node-a"),
    Ping(seq=U64, target="node-b"),  # no source
    Ack(seq=0),
    Ack(seq=U64),
    Nack(seq=42),
    PingReq(seq=9, target="node-c", target_address=("10.1.2.3", 65535), nack=True),
    PingReq(seq=10, target="node-c", target_address=("2001:db8::7", 1), nack=False),
    Alive(name="node-a", address=("127.0.0.1", 7421), incarnation=0),
    Alive(
        name="nødé",
        address=("10.0.0.9", 7421),
        incarnation=U64,
        meta=(("grpc", "10.0.0.9:7420"), ("role", "client"), ("zone", "a" * 200)),
    ),
    Suspect(name="node-b", incarnation=3, accuser="node-a"),
    Dead(name="node-b", incarnation=4, accuser="node-c"),
    Dead(name="node-b", incarnation=4, accuser="node-b"),  # a leave
]
STREAM_MESSAGES: list[Message] = [
    PushPullRequest(sender="node-a", states=STATES, join=True),
    PushPullRequest(sender="node-a", states=(), join=False),
    PushPullResponse(sender="node-b", states=STATES),
    PushPullResponse(sender="node-b", states=STATES[:1]),
]


def _frame_roundtrip(message: Message, cluster: str = CLUSTER) -> Message:
    frame = wire.encode_frame(message, cluster)  # type: ignore[arg-type]
    n = wire.frame_length(frame[: wire.FRAME_HEADER])
    assert len(frame) == wire.FRAME_HEADER + n
    return wire.decode_frame(frame[wire.FRAME_HEADER :], cluster)


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("message", DATAGRAM_MESSAGES, ids=lambda m: type(m).__name__)
def test_datagram_roundtrip(message: Message) -> None:
    enc = wire.encode_packets([message], CLUSTER)
    assert enc.too_large == 0 and len(enc.datagrams) == 1
    assert wire.decode(enc.datagrams[0], CLUSTER) == [message]


@pytest.mark.parametrize("message", STREAM_MESSAGES, ids=lambda m: type(m).__name__)
def test_frame_roundtrip(message: Message) -> None:
    assert _frame_roundtrip(message) == message


@pytest.mark.parametrize("message", DATAGRAM_MESSAGES + STREAM_MESSAGES, ids=lambda m: type(m).__name__)
def test_proto_roundtrip(message: Message) -> None:
    assert wire.from_proto(wire.to_proto(message)) == message


def test_every_message_type_and_every_oneof_field_is_covered() -> None:
    """The adapter and gossip.proto cannot drift apart: each core message type has a
    sample here, and each oneof field of GossipMessage is produced by one of them."""
    core_types = {t for t in typing.get_args(Message) if t is not Compound}
    samples = DATAGRAM_MESSAGES + STREAM_MESSAGES
    assert core_types == {type(m) for m in samples}
    fields = {f.name for f in pb.GossipMessage.DESCRIPTOR.oneofs_by_name["kind"].fields}
    assert fields == {wire.to_proto(m).WhichOneof("kind") for m in samples}


def test_every_state_maps_both_ways() -> None:
    for state in State:
        s = MemberState(name="x", address=("10.0.0.1", 1), incarnation=1, state=state)
        assert _frame_roundtrip(PushPullResponse(sender="y", states=(s,))) == PushPullResponse(sender="y", states=(s,))


def test_meta_comes_back_sorted_whatever_the_order_on_the_wire() -> None:
    gm = pb.GossipMessage(
        alive=pb.GossipAlive(
            name="a", address=pb.GossipAddress(host="10.0.0.1", port=1), meta={"z": "1", "a": "2", "m": "3"}
        )
    )
    m = wire.from_proto(gm)
    assert isinstance(m, Alive) and m.meta == (("a", "2"), ("m", "3"), ("z", "1"))


def test_empty_cluster_name_roundtrips() -> None:
    enc = wire.encode_packets([Ack(seq=1)], "")
    assert wire.decode(enc.datagrams[0], "") == [Ack(seq=1)]
    with pytest.raises(ForeignCluster):
        wire.decode(enc.datagrams[0], CLUSTER)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.builds(Ping, seq=st.integers(0, U64), target=st.text(min_size=1), source=st.text()),
            st.builds(Ack, seq=st.integers(0, U64)),
            st.builds(Nack, seq=st.integers(0, U64)),
            st.builds(
                Alive,
                name=st.text(min_size=1, max_size=40),
                address=st.tuples(st.ip_addresses().map(str), st.integers(1, 65535)),
                incarnation=st.integers(0, U64),
                meta=st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=5).map(
                    lambda d: tuple(sorted(d.items()))
                ),
            ),
            st.builds(Suspect, name=st.text(min_size=1), incarnation=st.integers(0, U64), accuser=st.text(min_size=1)),
            st.builds(Dead, name=st.text(min_size=1), incarnation=st.integers(0, U64), accuser=st.text(min_size=1)),
        ),
        max_size=40,
    ),
    st.integers(300, 1400),
)
def test_packing_property(messages: list[Message], max_bytes: int) -> None:
    """Any messages: every datagram within the limit, order kept, nothing lost but the
    too-large, and `message_size` is exactly what a message adds to a datagram."""
    enc = wire.encode_packets(messages, CLUSTER, max_bytes)
    room = max_bytes - wire.packet_overhead(CLUSTER)
    fitting = [m for m in messages if wire.message_size(m) <= room]
    assert enc.too_large == len(messages) - len(fitting)
    decoded: list[Message] = []
    for d in enc.datagrams:
        assert len(d) <= max_bytes
        decoded.extend(wire.decode(d, CLUSTER))
    assert decoded == fitting
    for m in fitting[:3]:
        assert len(wire.encode_packets([m], CLUSTER).datagrams[0]) == wire.packet_overhead(CLUSTER) + wire.message_size(m)


# ---------------------------------------------------------------------------- packing


def test_many_messages_split_across_datagrams_in_order() -> None:
    msgs: list[Message] = [
        Alive(name=f"member-{i:04d}", address=("10.0.0.1", 7421), incarnation=i, meta=(("role", "client"),))
        for i in range(200)
    ]
    enc = wire.encode_packets(msgs, CLUSTER)
    assert len(enc.datagrams) > 1 and enc.too_large == 0
    assert all(len(d) <= wire.DEFAULT_MAX_BYTES for d in enc.datagrams)
    # Packed tight: every datagram but the last was full enough not to take the next one.
    assert all(len(d) > wire.DEFAULT_MAX_BYTES - wire.message_size(msgs[0]) for d in enc.datagrams[:-1])
    assert [m for d in enc.datagrams for m in wire.decode(d, CLUSTER)] == msgs


def test_a_message_larger_than_the_limit_is_dropped_and_counted() -> None:
    huge = Alive(name="big", address=("10.0.0.1", 1), incarnation=1, meta=(("blob", "x" * 2000),))
    small = [Ack(seq=1), Ack(seq=2)]
    enc = wire.encode_packets([small[0], huge, small[1]], CLUSTER)
    assert enc.too_large == 1
    assert [m for d in enc.datagrams for m in wire.decode(d, CLUSTER)] == small


def test_compound_is_flattened_and_push_pull_refused_in_datagrams() -> None:
    enc = wire.encode_packets([Compound(messages=(Ack(seq=1), Nack(seq=2)))], CLUSTER)
    assert wire.decode(enc.datagrams[0], CLUSTER) == [Ack(seq=1), Nack(seq=2)]
    with pytest.raises(TypeError):
        wire.encode_packets([STREAM_MESSAGES[0]], CLUSTER)
    with pytest.raises(TypeError):
        wire.encode_frame(Ack(seq=1), CLUSTER)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        wire.encode_packets([Ack(seq=1)], CLUSTER, max_bytes=wire.packet_overhead(CLUSTER))


def test_nothing_to_send_is_no_datagram() -> None:
    assert wire.encode_packets([], CLUSTER) == wire.Encoded(datagrams=(), too_large=0)


@pytest.mark.parametrize("message", DATAGRAM_MESSAGES + STREAM_MESSAGES, ids=lambda m: type(m).__name__)
def test_message_size_bounds_the_core_estimate(message: Message) -> None:
    """The exact size the shell injects and the core's own estimate stay close."""
    assert abs(wire.message_size(message) - approx_size(message)) <= max(16, approx_size(message) // 4)


# ---------------------------------------------------------------------------- refusals


def _valid(messages: list[Message] | None = None, cluster: str = CLUSTER) -> bytes:
    return wire.encode_packets(messages or [Alive(name="x", address=("10.0.0.1", 7421), incarnation=1)], cluster).datagrams[0]


def _raw(packet: pb.Packet) -> bytes:
    payload = packet.SerializeToString()
    return bytes((wire.MAGIC, wire.VERSION)) + len(payload).to_bytes(2, "big") + payload


def test_each_refusal_has_its_reason() -> None:
    assert TruncatedPacket("x").reason is DropReason.TRUNCATED
    assert OversizedPacket(2, 1).reason is DropReason.OVERSIZED
    assert MalformedPacket("x").reason is DropReason.MALFORMED
    assert ForeignCluster("a", "b").reason is DropReason.FOREIGN_CLUSTER
    assert {c.reason for c in (TruncatedPacket, OversizedPacket, MalformedPacket, ForeignCluster)} == set(DropReason)


def test_oversized() -> None:
    with pytest.raises(OversizedPacket) as info:
        wire.decode(_valid() + b"\x00" * (64 * 1024), CLUSTER)
    assert info.value.limit == 64 * 1024
    assert "oversized" in str(info.value)
    with pytest.raises(OversizedPacket):
        wire.decode(_valid(), CLUSTER, max_bytes=10)
    with pytest.raises(OversizedPacket):
        wire.frame_length(bytes((wire.MAGIC, wire.VERSION)) + (wire.MAX_FRAME + 1).to_bytes(4, "big"))


def test_every_truncation_is_truncated() -> None:
    data = _valid([Ping(seq=5, target="b", source="a"), Alive(name="x", address=("10.0.0.1", 1), incarnation=2)])
    for cut in range(len(data)):
        with pytest.raises(TruncatedPacket):
            wire.decode(data[:cut], CLUSTER)
    frame = wire.encode_frame(STREAM_MESSAGES[0], CLUSTER)  # type: ignore[arg-type]
    with pytest.raises(TruncatedPacket):
        wire.frame_length(frame[:3])


def test_foreign_cluster() -> None:
    with pytest.raises(ForeignCluster) as info:
        wire.decode(_valid(cluster="staging"), CLUSTER)
    assert info.value.cluster == "staging" and info.value.expected == CLUSTER
    frame = wire.encode_frame(STREAM_MESSAGES[0], "staging")  # type: ignore[arg-type]
    with pytest.raises(ForeignCluster):
        wire.decode_frame(frame[wire.FRAME_HEADER :], CLUSTER)


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        bytes((0x00, wire.VERSION, 0, 0)),
        bytes((wire.MAGIC, 99, 0, 0)),  # a future version
        _valid() + b"\x00",  # bytes after the announced payload
        bytes((wire.MAGIC, wire.VERSION, 0, 3)) + b"\xff\xff\xff",  # not protobuf
        bytes((wire.MAGIC, wire.VERSION, 0, 3)) + b"\x0a\x01\xff",  # cluster not UTF-8
    ],
    ids=["http", "magic", "version", "trailing", "garbage", "utf8"],
)
def test_malformed_framing(data: bytes) -> None:
    with pytest.raises(MalformedPacket):
        wire.decode(data, CLUSTER)


def _gm(**kind: object) -> pb.GossipMessage:
    return pb.GossipMessage(**kind)  # type: ignore[arg-type]


ADDR = pb.GossipAddress(host="10.0.0.1", port=7421)


@pytest.mark.parametrize(
    "gm",
    [
        _gm(ping=pb.GossipPing(seq=1, target="")),
        _gm(ping_req=pb.GossipPingReq(seq=1, target="x", target_address=pb.GossipAddress(host="x.example", port=1))),
        _gm(ping_req=pb.GossipPingReq(seq=1, target="x")),  # no address: empty host
        _gm(alive=pb.GossipAlive(name="", address=ADDR)),
        _gm(alive=pb.GossipAlive(name="a", address=pb.GossipAddress(host="10.0.0.1", port=0))),
        _gm(alive=pb.GossipAlive(name="a", address=pb.GossipAddress(host="10.0.0.1", port=70000))),
        _gm(alive=pb.GossipAlive(name="a", address=pb.GossipAddress(host="localhost", port=1))),
        _gm(suspect=pb.GossipSuspect(name="a", incarnation=1, accuser="")),
        _gm(dead=pb.GossipDead(name="", incarnation=1, accuser="b")),
        # push-pull is stream-only, even when valid
        _gm(push_pull_request=pb.GossipPushPullRequest(sender="a")),
        _gm(push_pull_response=pb.GossipPushPullResponse(sender="a")),
    ],
    ids=[
        "ping-no-target", "pingreq-hostname", "pingreq-no-address", "alive-no-name", "port-0",
        "port-70000", "alive-hostname", "suspect-no-accuser", "dead-no-name", "pp-request", "pp-response",
    ],
)
def test_malformed_content_in_a_datagram(gm: pb.GossipMessage) -> None:
    with pytest.raises(MalformedPacket):
        wire.decode(_raw(pb.Packet(cluster=CLUSTER, messages=[_gm(ack=pb.GossipAck(seq=1)), gm])), CLUSTER)


@pytest.mark.parametrize("state", [0, 5, 99])
def test_unknown_member_state_is_malformed(state: int) -> None:
    bad = pb.GossipMemberState(name="a", address=ADDR, incarnation=1, state=state)  # type: ignore[arg-type]
    packet = pb.Packet(cluster=CLUSTER, messages=[_gm(push_pull_response=pb.GossipPushPullResponse(sender="b", states=[bad]))])
    with pytest.raises(MalformedPacket):
        wire.decode_frame(packet.SerializeToString(), CLUSTER)


def test_stream_frames_carry_exactly_one_push_pull() -> None:
    two = pb.Packet(
        cluster=CLUSTER,
        messages=[wire.to_proto(STREAM_MESSAGES[1]), wire.to_proto(STREAM_MESSAGES[1])],
    )
    for packet in (two, pb.Packet(cluster=CLUSTER), pb.Packet(cluster=CLUSTER, messages=[wire.to_proto(Ack(seq=1))])):
        with pytest.raises(MalformedPacket):
            wire.decode_frame(packet.SerializeToString(), CLUSTER)
    with pytest.raises(MalformedPacket):
        wire.frame_length(b"\x00" * wire.FRAME_HEADER)


def test_an_unknown_message_kind_is_skipped_not_fatal() -> None:
    """A newer agent's message kind (an empty oneof to us) does not cost the gossip
    piggybacked with it."""
    packet = pb.Packet(cluster=CLUSTER, messages=[pb.GossipMessage(), wire.to_proto(Ack(seq=7))])
    assert wire.decode(_raw(packet), CLUSTER) == [Ack(seq=7)]
    # A field number this version does not know, inside the oneof's message: ignored too.
    unknown = b"\xfa\x01\x02\x08\x01"  # field 31, length-delimited, 2 bytes
    payload = wire._cluster_field(CLUSTER) + wire._record(b"\x12", unknown)
    data = bytes((wire.MAGIC, wire.VERSION)) + len(payload).to_bytes(2, "big") + payload
    assert wire.decode(data, CLUSTER) == []


# ---------------------------------------------------------------------------- fuzz


def _only_wire_errors(fn: typing.Callable[[], object]) -> DropReason | None:
    try:
        result = fn()
    except WireError as exc:
        return exc.reason
    assert isinstance(result, list)
    return None


def test_fuzz_random_bytes_raise_only_wire_errors() -> None:
    rng = random.Random(20240611)
    reasons: dict[DropReason | None, int] = {}
    for i in range(3000):
        n = rng.choice([0, 1, 3, 4, 5, 16, 100, 600, 1400]) if i % 2 else rng.randrange(0, 2000)
        data = rng.randbytes(n)
        if i % 3 == 0 and n >= 4:
            # Past the header check, so the protobuf parser itself gets the junk.
            data = bytes((wire.MAGIC, wire.VERSION)) + (n - 4).to_bytes(2, "big") + data[4:]
        r = _only_wire_errors(lambda: wire.decode(data, CLUSTER))
        reasons[r] = reasons.get(r, 0) + 1
    assert reasons.get(DropReason.MALFORMED, 0) > 1000
    assert reasons.get(DropReason.TRUNCATED, 0) > 100


def test_fuzz_mutations_of_valid_packets_raise_only_wire_errors() -> None:
    rng = random.Random(7)
    seeds = [
        _valid(DATAGRAM_MESSAGES[i : i + 4]) for i in range(0, len(DATAGRAM_MESSAGES), 4)
    ]
    for _ in range(4000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(4)
            pos = rng.randrange(len(data))
            if op == 0:
                data[pos] = rng.randrange(256)  # flip a byte
            elif op == 1:
                del data[pos : pos + rng.randint(1, 8)]  # lose bytes
            elif op == 2:
                data[pos:pos] = rng.randbytes(rng.randint(1, 8))  # gain bytes
            else:
                data = data[:pos]  # truncate
            if not data:
                break
        if len(data) >= 4 and rng.random() < 0.5:
            # Fix the length so mutations reach the parser instead of the length check.
            data[2:4] = (len(data) - 4).to_bytes(2, "big")
        frozen = bytes(data)
        result = _only_wire_errors(lambda: wire.decode(frozen, CLUSTER))
        if result is None:
            for m in wire.decode(frozen, CLUSTER):
                assert type(m) in typing.get_args(Message)


def test_fuzz_frames_raise_only_wire_errors() -> None:
    rng = random.Random(11)
    frame = wire.encode_frame(STREAM_MESSAGES[0], CLUSTER)  # type: ignore[arg-type]
    payload = frame[wire.FRAME_HEADER :]
    for i in range(2000):
        if i % 2:
            data = rng.randbytes(rng.randrange(0, 400))
        else:
            b = bytearray(payload)
            for _ in range(rng.randint(1, 3)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            data = bytes(b)
        try:
            wire.decode_frame(data, CLUSTER)
        except WireError:
            pass
        try:
            wire.frame_length(rng.randbytes(rng.randrange(0, 8)))
        except WireError:
            pass
