"""`RaftTransport`: Raft messages between servers over the `shoal.v1.Raft` gRPC service.

Rules:
- Inbound: a servicer (`add_to_server`) checks every batch and snapshot chunk before its
  messages reach the node: the cluster id must be ours (FAILED_PRECONDITION), the
  receiver must be us (FAILED_PRECONDITION), the sender a known member
  (PERMISSION_DENIED); a malformed message is INVALID_ARGUMENT. A follower's
  forwarded proposals (`MsgProp`) travel like any other message. A rejected stream is
  aborted with a sentence saying which cluster/member it came from, so a misconfigured
  server learns why; nothing of it is stepped, so a forged term from a stranger cannot
  depose a leader.
- Outbound: one long-lived `Send` stream per peer, fed by a bounded queue. `send()`
  never blocks the Ready loop: a full queue drops the message and reports the peer
  unreachable (Raft re-sends what matters: the leader probes, heartbeats repeat).
  Each write carries everything queued for that peer (a batch per Ready, or more under
  load), so a busy leader pays one gRPC message per follower per Ready.
- A failed stream drops what was queued, reports the peer unreachable
  (`report_unreachable`: the leader stops pipelining to it and probes), and reconnects
  after a jittered exponential back-off (`backoff_initial` .. `backoff_max`); the
  channel's own reconnect back-off is capped the same way so a restarted server is
  reached within about a second.
- `MsgSnap` goes on its own `SendSnapshot` stream (chunked, so appends and heartbeats
  are never stuck behind it); when it ends the node hears `report_snapshot(peer, ok)`.
- Handler callbacks run on the event loop that owns the transport, never concurrently.

How it works: `_Peer` holds the queue, the channel and a task running `_pump`; the
servicer is a thin class calling back into the transport for checks and delivery.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import structlog

from shoal.errors import ConfigError
from shoal.leader.raft.messages import Message, MsgSnap
from shoal.leader.raft_convert import (
    SNAPSHOT_CHUNK_SIZE,
    SnapshotAssembler,
    WireError,
    batch_from_proto,
    batch_to_proto,
    snapshot_chunks,
)
from shoal.v1 import raft_pb2, raft_pb2_grpc

__all__ = ["RaftHandler", "TransportConfig", "RaftTransport", "SERVER_OPTIONS", "channel_options"]

MAX_MESSAGE_BYTES = 64 << 20
"""gRPC message limit on Raft links: a MsgApp is at most `max_size_per_msg` (1 MiB) of
entries plus framing, a snapshot chunk 1 MiB; 64 MiB leaves room for a batch of them."""

SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Accept the peers' keepalive pings (below); the default policy answers pings more
    # frequent than every 5 minutes with GOAWAY.
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]
"""Options a gRPC server carrying the Raft service needs (pass to `grpc.aio.server`)."""


def channel_options(config: TransportConfig) -> list[tuple[str, Any]]:
    """Options of the channel to one peer."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.enable_http_proxy", 0),
        ("grpc.enable_retries", 0),
        # A peer that stops answering (SIGSTOP, partition) is noticed by keepalive, not
        # by TCP's multi-minute timeouts.
        ("grpc.keepalive_time_ms", int(config.keepalive_interval * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_interval * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", int(config.backoff_initial * 1000)),
        ("grpc.min_reconnect_backoff_ms", int(config.backoff_initial * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(config.backoff_max * 1000)),
    ]


class RaftHandler(Protocol):
    """What the transport calls back into (the Raft shell)."""

    def deliver(self, messages: Sequence[Message]) -> None:
        """Step messages received from a peer (already checked)."""
        ...

    def report_unreachable(self, id: int) -> None:
        """Messages to `id` were lost: the connection failed or its queue was full."""
        ...

    def report_snapshot(self, id: int, ok: bool) -> None:
        """Sending a snapshot to `id` finished (`ok`) or failed."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportConfig:
    """Settings of the Raft transport. Times in seconds."""

    queue_size: int = 4096
    """Messages queued per peer before `send` drops. A leader queues one MsgApp and one
    heartbeat per Ready per follower; 4,096 is minutes of heartbeats, or a burst of
    pipelined appends far beyond `max_inflight_msgs`, so only a dead link fills it."""

    max_batch: int = 1024
    """Most messages in one RaftBatch, bounding one gRPC message (with 1 MiB MsgApps)."""

    backoff_initial: float = 0.05
    """First reconnect delay after a failed stream; doubles up to `backoff_max`."""

    backoff_max: float = 1.0
    """Longest reconnect delay: a restarted server is reached within about this long."""

    keepalive_interval: float = 2.0
    """HTTP/2 ping interval and timeout on a peer link: a silent peer is dropped (and
    reported unreachable) within about twice this."""

    snapshot_chunk_size: int = SNAPSHOT_CHUNK_SIZE
    """Data bytes per snapshot chunk."""

    snapshot_timeout: float = 60.0
    """A snapshot stream that takes longer is abandoned and reported failed."""

    def validate(self) -> None:
        if self.queue_size < 1 or self.max_batch < 1:
            raise ConfigError("raft transport: queue_size and max_batch must be ≥ 1")
        if not 0 < self.backoff_initial <= self.backoff_max:
            raise ConfigError("raft transport: need 0 < backoff_initial ≤ backoff_max")
        if self.keepalive_interval <= 0 or self.snapshot_timeout <= 0 or self.snapshot_chunk_size < 1:
            raise ConfigError("raft transport: keepalive_interval, snapshot_timeout and snapshot_chunk_size must be > 0")


class _Peer:
    __slots__ = ("id", "address", "queue", "channel", "task", "snapshot_task", "connected")

    def __init__(self, id: int, address: str, queue_size: int) -> None:
        self.id = id
        self.address = address
        self.queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=queue_size)
        self.channel: grpc.aio.Channel | None = None
        self.task: asyncio.Task[None] | None = None
        self.snapshot_task: asyncio.Task[None] | None = None
        self.connected = False


class _Servicer(raft_pb2_grpc.RaftServicer):
    def __init__(self, transport: RaftTransport) -> None:
        self._t = transport

    async def Send(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[raft_pb2.RaftBatch], context: grpc.aio.ServicerContext
    ) -> raft_pb2.RaftAck:
        async for batch in request_iterator:
            await self._t._check(batch.cluster_id, batch.from_id, batch.to_id, context)
            try:
                messages = batch_from_proto(batch)
            except WireError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            self._t._handler.deliver(messages)
        return raft_pb2.RaftAck()

    async def SendSnapshot(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[raft_pb2.RaftSnapshotChunk], context: grpc.aio.ServicerContext
    ) -> raft_pb2.RaftAck:
        assembler = SnapshotAssembler()
        async for chunk in request_iterator:
            await self._t._check(chunk.cluster_id, chunk.from_id, chunk.to_id, context)
            try:
                assembler.add(chunk)
            except WireError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            msg = assembler.finish()
        except WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self._t._log.info("raft.transport.snapshot_received", src=msg.src, index=msg.snapshot.index,
                          bytes=len(msg.snapshot.data))
        self._t._handler.deliver([msg])
        return raft_pb2.RaftAck()


class RaftTransport:
    """Sends and receives Raft messages for node `node_id` of cluster `cluster_id`."""

    def __init__(
        self,
        *,
        cluster_id: str,
        node_id: int,
        peers: Mapping[int, str],
        handler: RaftHandler,
        config: TransportConfig | None = None,
        logger: Any = None,
        rng: random.Random | None = None,
    ) -> None:
        self.cluster_id = cluster_id
        self.node_id = node_id
        self.config = config or TransportConfig()
        self.config.validate()
        self._handler = handler
        self._log = logger if logger is not None else structlog.get_logger("shoal.raft.transport")
        self._rng = rng or random.Random()
        self._peers: dict[int, _Peer] = {}
        self._members: dict[int, str] = dict(peers)
        self._started = False
        self._closed = False
        for id, address in peers.items():
            if id != node_id:
                self._peers[id] = _Peer(id, address, self.config.queue_size)

    # --- inbound ---------------------------------------------------------------------

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register the Raft service on `server` (before it starts)."""
        raft_pb2_grpc.add_RaftServicer_to_server(self.servicer(), server)

    def servicer(self) -> raft_pb2_grpc.RaftServicer:
        """The Raft service's handlers, for a server that registers them itself."""
        return _Servicer(self)

    async def _check(self, cluster_id: str, src: int, dst: int, context: grpc.aio.ServicerContext) -> None:
        if cluster_id != self.cluster_id:
            self._log.warning("raft.transport.rejected", reason="cluster", cluster=cluster_id, src=src)
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"server {self.node_id} belongs to Raft cluster {self.cluster_id!r}, "
                f"not {cluster_id!r}: check the servers' --join addresses",
            )
        if dst != self.node_id:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this is server {self.node_id}, not {dst}: the sender's member table is out of date",
            )
        if src not in self._members or src == self.node_id:
            self._log.warning("raft.transport.rejected", reason="unknown_member", src=src)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"server {src} is not a member of Raft cluster {self.cluster_id!r}; "
                "add it to the cluster before it can take part",
            )

    # --- outbound --------------------------------------------------------------------

    async def start(self) -> None:
        """Start the per-peer streams (call from the event loop that will run them)."""
        self._started = True
        for peer in self._peers.values():
            self._start_peer(peer)

    def _start_peer(self, peer: _Peer) -> None:
        peer.task = asyncio.create_task(self._pump(peer), name=f"raft-peer-{peer.id}")

    def set_peer(self, id: int, address: str) -> None:
        """Add a member, or change its address."""
        self._members[id] = address
        if id == self.node_id:
            return
        old = self._peers.get(id)
        if old is not None and old.address == address:
            return
        if old is not None:
            self._stop_peer(old)
        peer = _Peer(id, address, self.config.queue_size)
        self._peers[id] = peer
        if self._started and not self._closed:
            self._start_peer(peer)

    def remove_peer(self, id: int) -> None:
        self._members.pop(id, None)
        peer = self._peers.pop(id, None)
        if peer is not None:
            self._stop_peer(peer)

    @property
    def members(self) -> Mapping[int, str]:
        return dict(self._members)

    def connected(self, id: int) -> bool:
        peer = self._peers.get(id)
        return peer is not None and peer.connected

    def send(self, messages: Iterable[Message]) -> None:
        """Queue messages for their receivers; never blocks, drops when a queue is full."""
        full: set[int] = set()
        for m in messages:
            peer = self._peers.get(m.dst)
            if peer is None:
                self._log.debug("raft.transport.no_route", dst=m.dst)
                continue
            if isinstance(m, MsgSnap):
                self._start_snapshot(peer, m)
                continue
            try:
                peer.queue.put_nowait(m)
            except asyncio.QueueFull:
                full.add(m.dst)
        for id in full:
            self._log.warning("raft.transport.queue_full", peer=id)
            self._handler.report_unreachable(id)

    async def _pump(self, peer: _Peer) -> None:
        cfg = self.config
        backoff = cfg.backoff_initial
        # An idle stream to a peer that restarted is found broken only by the next write,
        # which would lose that batch (often the first vote request after a leader
        # failure: a whole extra election round). Such a batch is carried over and sent
        # once more, at once, on a new stream; Raft tolerates a late or repeated message.
        carry: list[Message] = []
        while not self._closed:
            if peer.channel is None:
                peer.channel = grpc.aio.insecure_channel(peer.address, options=channel_options(cfg))
            stub = raft_pb2_grpc.RaftStub(peer.channel)
            call = stub.Send()
            retry_now = False
            try:
                while True:
                    if carry:
                        batch, carry = carry, []
                        retried = True
                    else:
                        first = await peer.queue.get()
                        batch = [first]
                        while len(batch) < cfg.max_batch and not peer.queue.empty():
                            batch.append(peer.queue.get_nowait())
                        retried = False
                    try:
                        await call.write(batch_to_proto(self.cluster_id, self.node_id, peer.id, batch))
                    except Exception:
                        if not retried and peer.connected:
                            carry, retry_now = batch, True
                        raise
                    if not peer.connected:
                        peer.connected = True
                        self._log.info("raft.transport.peer_connected", peer=peer.id, address=peer.address)
                    backoff = cfg.backoff_initial
            except asyncio.CancelledError:
                call.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - any failure of the stream: reconnect
                code, detail = await _failure(call, exc)
                call.cancel()
                self._on_stream_failed(peer, code, detail)
            if retry_now:
                # A fresh channel: the old one may sit in gRPC's own reconnect back-off.
                if peer.channel is not None:
                    await peer.channel.close()
                    peer.channel = None
                continue
            # Stale messages are worth nothing after the back-off: Raft resends.
            while not peer.queue.empty():
                peer.queue.get_nowait()
            delay = backoff * (0.5 + self._rng.random() / 2)
            backoff = min(backoff * 2, cfg.backoff_max)
            await asyncio.sleep(delay)

    def _on_stream_failed(self, peer: _Peer, code: grpc.StatusCode | None, detail: str) -> None:
        if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED):
            self._log.error("raft.transport.rejected_by_peer", peer=peer.id, address=peer.address, error=detail)
        elif peer.connected:
            self._log.warning("raft.transport.peer_unreachable", peer=peer.id, address=peer.address, error=detail)
        peer.connected = False
        self._handler.report_unreachable(peer.id)

    def _start_snapshot(self, peer: _Peer, m: MsgSnap) -> None:
        if peer.snapshot_task is not None and not peer.snapshot_task.done():
            peer.snapshot_task.cancel()  # the core only sends a newer one on purpose
        peer.snapshot_task = asyncio.create_task(self._send_snapshot(peer, m), name=f"raft-snapshot-{peer.id}")

    async def _send_snapshot(self, peer: _Peer, m: MsgSnap) -> None:
        if peer.channel is None:
            peer.channel = grpc.aio.insecure_channel(peer.address, options=channel_options(self.config))
        stub = raft_pb2_grpc.RaftStub(peer.channel)
        ok = False
        try:
            chunks = snapshot_chunks(self.cluster_id, m, self.config.snapshot_chunk_size)
            await asyncio.wait_for(stub.SendSnapshot(chunks), self.config.snapshot_timeout)
            ok = True
            self._log.info("raft.transport.snapshot_sent", peer=peer.id, index=m.snapshot.index,
                           bytes=len(m.snapshot.data))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported to the core, which retries later
            self._log.warning("raft.transport.snapshot_failed", peer=peer.id, index=m.snapshot.index, error=repr(exc))
        if not self._closed:
            self._handler.report_snapshot(peer.id, ok)

    def _stop_peer(self, peer: _Peer) -> None:
        for task in (peer.task, peer.snapshot_task):
            if task is not None:
                task.cancel()
        if peer.channel is not None:
            channel = peer.channel
            peer.channel = None
            asyncio.get_running_loop().create_task(channel.close())

    async def close(self) -> None:
        """Stop every outbound stream and close the channels."""
        self._closed = True
        tasks = []
        for peer in self._peers.values():
            for task in (peer.task, peer.snapshot_task):
                if task is not None:
                    task.cancel()
                    tasks.append(task)
        await asyncio.gather(*tasks, return_exceptions=True)
        for peer in self._peers.values():
            if peer.channel is not None:
                await peer.channel.close()
                peer.channel = None


async def _failure(call: Any, exc: BaseException) -> tuple[grpc.StatusCode | None, str]:
    """The status that ended a stream: a write to a finished call raises
    InvalidStateError, and the reason is on the call itself."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or ""
    if call.done():
        try:
            return await call.code(), (await call.details()) or ""
        except Exception:  # noqa: BLE001 - best effort, for the log line only
            pass
    return None, repr(exc)
