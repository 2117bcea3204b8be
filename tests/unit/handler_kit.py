"""Helpers for driving a peer's BlockHandler in-process (fixtures in conftest.py): requests, replies,
a fake RPC context and an inference stream."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
import torch

from peers.handler import BlockHandler, HandlerConfig
from swarm import protocol
from swarm.protocol import SpanRequest, BlocksReply, StepRequest

HIDDEN = 64
NUM_BLOCKS = 3


def handler_config(**overrides) -> HandlerConfig:
    settings = dict(dht_prefix="tiny@test", dtype=torch.float32, device=torch.device("cpu"), hidden_size=HIDDEN,
                    max_length=32, max_batch=4, max_tokens_per_request=64, max_sessions=2, session_idle_timeout=600.0)
    return HandlerConfig(**{**settings, **overrides})


@dataclass(frozen=True)
class FakeContext:
    """All the handler reads of hivemind's P2PContext."""

    remote_id: str = "QmTestClient"


def hidden(batch: int = 1, tokens: int = 4, seed: int = 0, size: int = HIDDEN) -> torch.Tensor:
    return torch.randn(batch, tokens, size, generator=torch.Generator().manual_seed(seed))


def read_reply(reply) -> tuple[BlocksReply, list[torch.Tensor]]:
    return protocol.unpack(reply.metadata, BlocksReply), protocol.deserialize_tensors(reply.tensors)


def forward(handler: BlockHandler, x: torch.Tensor, start: int = 0, end: int = NUM_BLOCKS, request=None):
    """One rpc_forward: (BlocksReply, tensors)."""
    request = request if request is not None else protocol.make_request("", SpanRequest(start=start, end=end), x)
    return read_reply(asyncio.run(handler.rpc_forward(request, FakeContext())))


class Stream:
    """One rpc_inference stream into a handler, driven step by step inside a running event loop."""

    def __init__(self, handler: BlockHandler):
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._replies = handler.rpc_inference(self._requests(), FakeContext())

    async def _requests(self):
        while (request := await self._outbox.get()) is not None:
            yield request

    async def send(self, request) -> tuple[BlocksReply, list[torch.Tensor]]:
        self._outbox.put_nowait(request)
        return read_reply(await anext(self._replies))

    async def step(self, session: str, position: int, *tensors: torch.Tensor, start: int = 0, end: int = NUM_BLOCKS,
                   max_length: int = 16, close: bool = False) -> tuple[BlocksReply, list[torch.Tensor]]:
        meta = StepRequest(session_id=session, start=start, end=end, position=position, max_length=max_length,
                           close=close)
        return await self.send(protocol.make_request("", meta, *tensors))

    async def close(self) -> None:
        """End the stream as a client does; the handler frees its sessions."""
        self._outbox.put_nowait(None)
        with pytest.raises(StopAsyncIteration):
            await anext(self._replies)
