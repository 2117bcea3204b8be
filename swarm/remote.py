"""The hivemind implementation of `swarm.transport.Transport`: the peer RPCs over a P2P instance.

Every reply is decoded and checked inside the same `try` as the call, so an undecodable, mis-shaped or
non-finite answer becomes a `BadReplyError` blaming its sender, and a dead peer a `PeerUnreachableError`.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import torch
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2

from swarm import protocol
from swarm.errors import BadReplyError, PeerUnreachableError, ProtocolError, RemoteError
from swarm.protocol import PeerInfo, SpanRequest, BlocksReply, StepRequest
from swarm.transport import Reply, check_output


class BlockService(ServicerBase):
    """The RPC signatures the peer implements (peers.handler.BlockHandler); used here to build stubs.

    The peer's handler subclasses it; handler names are fixed here (hivemind would name them after
    the subclass) so that stubs built from this class reach them.
    """

    @classmethod
    def _get_handle_name(cls, namespace: str | None, method_name: str) -> str:
        name = f"efedllm.BlockService.{method_name}"
        return name if namespace is None else f"{namespace}::{name}"

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        raise NotImplementedError

    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        raise NotImplementedError

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        raise NotImplementedError
        yield  # pragma: no cover  (makes this an async generator, as the annotation says)


def _stub(p2p: P2P, peer_id: PeerID):
    return BlockService.get_stub(p2p, peer_id)


def read_reply(peer_id: PeerID, reply: runtime_pb2.ExpertResponse, expected_shape: torch.Size) -> Reply:
    """A checked `Reply`; `RemoteError` for the peer's own error, `BadReplyError` for anything invalid."""
    try:
        meta = protocol.unpack(reply.metadata, BlocksReply)
    except ProtocolError as e:
        raise BadReplyError(str(peer_id), str(e)) from None
    if meta.error is not None:
        raise RemoteError(str(peer_id), meta.error.kind, meta.error.message)
    try:
        tensors = protocol.deserialize_tensors(reply.tensors)
    except ProtocolError as e:
        raise BadReplyError(str(peer_id), str(e)) from None
    return Reply(check_output(peer_id, tensors, expected_shape), meta.receipt, meta.length)


async def call_info(p2p: P2P, peer_id: PeerID, timeout: float = 5.0) -> tuple[PeerInfo, float]:
    """The peer's info and the round-trip time in seconds."""
    began = time.perf_counter()
    try:
        reply = await _stub(p2p, peer_id).rpc_info(runtime_pb2.ExpertUID(uid=""), timeout=timeout)
    except asyncio.TimeoutError:
        raise PeerUnreachableError(str(peer_id), f"peer {peer_id} did not answer within {timeout:.0f} s") from None
    except Exception as e:  # p2pd reports unreachable peers with several error types
        raise PeerUnreachableError(str(peer_id), f"peer {peer_id} is unreachable: {e}") from None
    rtt = time.perf_counter() - began
    try:
        return protocol.unpack(reply.serialized_info, PeerInfo), rtt
    except ProtocolError as e:
        raise BadReplyError(str(peer_id), str(e)) from None


async def call_forward(
    p2p: P2P, peer_id: PeerID, start: int, end: int, hidden: torch.Tensor, timeout: float = 60.0
) -> Reply:
    """Hidden states through the peer's blocks [start, end), with the peer's signed receipt."""
    request = protocol.make_request("", SpanRequest(start=start, end=end), hidden)
    try:
        reply = await _stub(p2p, peer_id).rpc_forward(request, timeout=timeout)
    except asyncio.TimeoutError:
        raise PeerUnreachableError(str(peer_id), f"peer {peer_id} did not answer within {timeout:.0f} s") from None
    except Exception as e:  # p2pd reports unreachable peers with several error types
        raise PeerUnreachableError(str(peer_id), f"peer {peer_id} is unreachable: {e}") from None
    return read_reply(peer_id, reply, hidden.shape)


class InferenceStream:
    """One open `rpc_inference` stream to a peer: send a step, await its checked reply, in order."""

    def __init__(self, p2p: P2P, peer_id: PeerID):
        self.peer_id = peer_id
        self._p2p = p2p
        self._outbox: asyncio.Queue[runtime_pb2.ExpertRequest | None] = asyncio.Queue()
        self._replies: AsyncIterator[runtime_pb2.ExpertResponse] | None = None

    async def _requests(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        while True:
            request = await self._outbox.get()
            if request is None:
                return
            yield request

    async def open(self) -> None:
        try:
            self._replies = await _stub(self._p2p, self.peer_id).rpc_inference(self._requests())
        except Exception as e:  # p2pd reports unreachable peers with several error types
            raise PeerUnreachableError(str(self.peer_id), f"cannot open a stream to peer {self.peer_id}: {e}") from None

    async def send(self, meta: StepRequest, *tensors: torch.Tensor, timeout: float | None = None) -> runtime_pb2.ExpertResponse:
        """One raw request and its raw reply (for closing messages and tests of malformed input)."""
        if self._replies is None:
            await self.open()
        self._outbox.put_nowait(protocol.make_request("", meta, *tensors))
        try:
            return await asyncio.wait_for(anext(self._replies), timeout=timeout)
        except StopAsyncIteration:
            raise PeerUnreachableError(str(self.peer_id), f"peer {self.peer_id} closed the stream") from None
        except asyncio.TimeoutError:
            raise PeerUnreachableError(str(self.peer_id), f"peer {self.peer_id} did not answer within {timeout:.0f} s") from None
        except Exception as e:  # the stream broke: the peer died or the connection dropped
            raise PeerUnreachableError(str(self.peer_id), f"lost the stream to peer {self.peer_id}: {e}") from None

    async def step(self, meta: StepRequest, hidden: torch.Tensor, mask: torch.Tensor | None = None,
                   timeout: float | None = None) -> Reply:
        extra = () if mask is None else (mask,)
        reply = await self.send(meta, hidden, *extra, timeout=timeout)
        return read_reply(self.peer_id, reply, hidden.shape)

    async def close(self) -> None:
        self._outbox.put_nowait(None)
        if self._replies is not None:
            await self._replies.aclose()
            self._replies = None


class HivemindTransport:
    """`swarm.transport.Transport` over a hivemind P2P instance."""

    def __init__(self, p2p: P2P):
        self.p2p = p2p

    @property
    def peer_id(self) -> PeerID:
        return self.p2p.peer_id

    async def info(self, peer_id: PeerID, timeout: float = 5.0) -> tuple[PeerInfo, float]:
        return await call_info(self.p2p, peer_id, timeout)

    async def forward(self, peer_id: PeerID, start: int, end: int, hidden: torch.Tensor, timeout: float = 60.0) -> Reply:
        return await call_forward(self.p2p, peer_id, start, end, hidden, timeout)

    def open_stream(self, peer_id: PeerID) -> InferenceStream:
        return InferenceStream(self.p2p, peer_id)
