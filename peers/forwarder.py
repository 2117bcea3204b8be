"""A relay's side of `swarm.relays`: registrations of peers that cannot be dialled, and forwarding to them.

Bootstrap nodes and directly reachable peers run a `Forwarder` unless started with `--no-relay-service`. Requests
and replies are passed on as they come (only the target's id in the request's uid is cleared), so forwarding costs
the relay no tensor decoding. `Registry` holds the bookkeeping and the limits, as plain state with a clock.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2

from swarm.relays import REGISTRATION_TTL, RegisterReply, RelayLimits, RelayService, register_reply
from swarm.remote import BlockService
from swarm.streams import open_reply_stream

logger = logging.getLogger(__name__)

INFO_TIMEOUT = 10.0  # seconds a forwarded info call may take
FORWARD_TIMEOUT = 120.0  # seconds a forwarded forward call may take


class RelayRefused(Exception):
    """The relay will not forward this (the client's call fails with this message; it tries another relay)."""


@dataclass
class Registry:
    """Who may be reached through this relay, and the forwarded streams open to each."""

    limits: RelayLimits = field(default_factory=RelayLimits)
    ttl: float = REGISTRATION_TTL
    expiry: dict[PeerID, float] = field(default_factory=dict)  # registered peer -> clock time it lapses
    streams: Counter = field(default_factory=Counter)  # registered peer -> forwarded streams open to it

    def register(self, peer_id: PeerID, now: float) -> RegisterReply:
        self._expire(now)
        if peer_id not in self.expiry and len(self.expiry) >= self.limits.max_registered:
            return RegisterReply(ok=False, error=f"this relay already forwards to {self.limits.max_registered} peers")
        self.expiry[peer_id] = now + self.ttl
        return RegisterReply(ok=True, ttl=self.ttl)

    def target(self, uid: str, now: float) -> PeerID:
        """The registered peer a request names; RelayRefused otherwise."""
        self._expire(now)
        try:
            peer_id = PeerID.from_base58(uid)
        except Exception:  # not a peer id
            raise RelayRefused(f"{uid[:64]!r} is not a peer id") from None
        if peer_id not in self.expiry:
            raise RelayRefused(f"peer {uid} is not registered with this relay")
        return peer_id

    def open_stream(self, peer_id: PeerID) -> None:
        if self.streams[peer_id] >= self.limits.max_streams_per_peer:
            raise RelayRefused(f"this relay already forwards {self.limits.max_streams_per_peer} streams to {peer_id}")
        if sum(self.streams.values()) >= self.limits.max_streams:
            raise RelayRefused(f"this relay already forwards {self.limits.max_streams} streams")
        self.streams[peer_id] += 1

    def close_stream(self, peer_id: PeerID) -> None:
        self.streams[peer_id] -= 1
        if self.streams[peer_id] <= 0:
            del self.streams[peer_id]

    def _expire(self, now: float) -> None:
        for peer_id in [p for p, until in self.expiry.items() if until <= now]:
            del self.expiry[peer_id]
            logger.info(f"No longer relaying for {peer_id}: its registration lapsed")


@dataclass
class StreamBudget:
    """One forwarded stream's allowance of bytes and time."""

    limits: RelayLimits
    began: float
    used: int = 0

    def spend(self, nbytes: int, now: float) -> None:
        self.used += nbytes
        if self.used > self.limits.max_stream_bytes:
            raise RelayRefused(f"the stream passed this relay's limit of {self.limits.max_stream_bytes} bytes")
        if now - self.began > self.limits.max_stream_seconds:
            raise RelayRefused(f"the stream passed this relay's limit of {self.limits.max_stream_seconds:.0f} s")


class Forwarder(RelayService):
    """The `rpc_relay_*` handlers (see `swarm.relays`)."""

    def __init__(self, limits: RelayLimits | None = None, clock: Callable[[], float] = time.monotonic):
        self.registry = Registry(limits or RelayLimits())
        self.clock = clock
        self._p2p: P2P | None = None

    async def add_p2p_handlers(self, p2p: P2P, *args, **kwargs) -> None:
        self._p2p = p2p
        await super().add_p2p_handlers(p2p, *args, **kwargs)

    async def rpc_relay_register(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        known = context.remote_id in self.registry.expiry
        reply = self.registry.register(context.remote_id, self.clock())
        if reply.ok and not known:
            logger.info(f"Relaying for {context.remote_id}, which cannot be dialled")
        return register_reply(reply)

    async def rpc_relay_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        target = self.registry.target(request.uid, self.clock())
        return await BlockService.get_stub(self._p2p, target).rpc_info(runtime_pb2.ExpertUID(uid=""), timeout=INFO_TIMEOUT)

    async def rpc_relay_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        target = self.registry.target(request.uid, self.clock())
        StreamBudget(self.registry.limits, self.clock()).spend(request.ByteSize(), self.clock())
        forwarded = runtime_pb2.ExpertRequest(uid="", metadata=request.metadata, tensors=request.tensors)
        return await BlockService.get_stub(self._p2p, target).rpc_forward(forwarded, timeout=FORWARD_TIMEOUT)

    async def rpc_relay_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        try:
            first = await anext(requests)
        except StopAsyncIteration:
            return
        target = self.registry.target(first.uid, self.clock())
        self.registry.open_stream(target)
        budget = StreamBudget(self.registry.limits, self.clock())

        async def upstream() -> AsyncIterator[runtime_pb2.ExpertRequest]:
            request = first
            while True:
                budget.used += request.ByteSize()  # checked at the next reply (raising here would hang the stream)
                yield runtime_pb2.ExpertRequest(uid="", metadata=request.metadata, tensors=request.tensors)
                try:
                    request = await anext(requests)
                except StopAsyncIteration:
                    return

        replies = None
        try:
            replies = await open_reply_stream(self._p2p, target, BlockService, "rpc_inference", upstream())
            async for reply in replies:
                budget.spend(reply.ByteSize(), self.clock())
                yield reply
        finally:
            self.registry.close_stream(target)
            if replies is not None:
                await _close(replies)


async def _close(replies) -> None:
    try:
        await replies.aclose()
    except Exception:  # closing is best effort: the peer frees the session when the stream drops
        logger.debug("Closing a forwarded stream failed", exc_info=True)
