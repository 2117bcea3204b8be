"""Relays: how a client reaches a peer that nobody can dial (behind NAT, no inbound ports).

The hidden peer connects out to a few relays (bootstrap nodes and public peers) and registers with each; it keeps
those connections open. A relay can open streams on a connection the hidden peer opened, so it forwards a client's
block RPCs to the peer over it, one forwarded stream per client stream, each message passed on unchanged (tensors
are not decoded). The peer announces its relays' peer ids in its record; clients send its RPCs through one of them.

Why not libp2p's circuit relay v2, which the bundled p2pd also has (`/p2p/<relay>/p2p-circuit`): measured here, its
relayed connections stop carrying data after 128 KiB in a direction (go-libp2p's "limited relay" defaults, meant for
hole punching; the daemon's `-relayDataLimit` and other `-relay*` limit flags are accepted but change nothing in the
bundled build), which is less than one session's prompt. The stall leaves the stream hanging until a timeout.

RPCs of `RelayService` (handler: `peers.forwarder.Forwarder`; callers: below and `swarm.remote`):

- `rpc_relay_register`   unary, hidden peer -> relay: forward to me for `ttl` seconds (renewed while it serves)
- `rpc_relay_info`       unary: the target's `rpc_info` (the request's uid is the target's peer id)
- `rpc_relay_forward`    unary: the target's `rpc_forward` (uid: the target's peer id)
- `rpc_relay_inference`  stream: the target's `rpc_inference` (uid of each request: the target's peer id)

A relay refuses (the call fails, and the client tries the peer's next relay) a target that has not registered, and
whatever is over its `RelayLimits`, so one relay cannot be drowned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator

from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2
from pydantic import Field

from swarm.protocol import PROTOCOL_VERSION, WireModel, handle_name, pack, unpack

REGISTRATION_TTL = 60.0  # seconds a registration lasts unless renewed
RENEW_PERIOD = 20.0  # seconds between a hidden peer's renewals (also keeps its connections to relays open)


@dataclass(frozen=True)
class RelayLimits:
    """What one relay grants: past a limit it refuses, or ends the forwarded stream."""

    max_registered: int = 128  # hidden peers it forwards to at once
    max_streams_per_peer: int = 16  # forwarded streams open at once to one hidden peer
    max_streams: int = 256  # forwarded streams open at once in all
    max_stream_bytes: int = 4 * 2**30  # bytes one forwarded stream may carry (both directions together)
    max_stream_seconds: float = 3600.0  # how long one forwarded stream may last


class RegisterReply(WireModel):
    version: int = PROTOCOL_VERSION
    ok: bool
    ttl: float = 0.0  # seconds until the registration lapses unless renewed
    error: str = Field(default="", max_length=512)


class RelayService(ServicerBase):
    """The relay's RPC signatures (peers.forwarder.Forwarder implements them); used here to build stubs."""

    @classmethod
    def _get_handle_name(cls, namespace: str | None, method_name: str) -> str:
        return handle_name("Relay", namespace, method_name)

    async def rpc_relay_register(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        raise NotImplementedError

    async def rpc_relay_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        raise NotImplementedError

    async def rpc_relay_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        raise NotImplementedError

    async def rpc_relay_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        raise NotImplementedError
        yield  # pragma: no cover  (makes this an async generator, as the annotation says)


def relay_stub(p2p: P2P, relay: PeerID):
    return RelayService.get_stub(p2p, relay)


async def call_register(p2p: P2P, relay: PeerID, timeout: float = 10.0) -> RegisterReply:
    """Ask `relay` to forward to this node; raises whatever the call raises when the relay cannot be reached."""
    reply = await relay_stub(p2p, relay).rpc_relay_register(runtime_pb2.ExpertUID(uid=""), timeout=timeout)
    return unpack(reply.serialized_info, RegisterReply)


def register_reply(reply: RegisterReply) -> runtime_pb2.ExpertInfo:
    return runtime_pb2.ExpertInfo(serialized_info=pack(reply))
