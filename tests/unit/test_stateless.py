"""Stateless runs of any length (swarm.stateless) over the fake transport: one forward when the input fits in a
message, a temporary inference session fed chunk by chunk otherwise; the same output either way."""

from __future__ import annotations

import asyncio

import pytest
import torch

from fake_swarm import HIDDEN, FakePeer, FakeSwarm, run_blocks
from swarm.errors import PeerUnreachableError
from swarm.routing import RouteHop
from swarm.stateless import chunk_tokens, run_blocks_chunked, run_route

CAP = 4 * 8 * HIDDEN  # a message cap of eight fp32 tokens of the fake model


def test_chunk_tokens_keeps_each_message_within_the_budget():
    assert chunk_tokens(1, 4096) == 128  # 2 MiB / (4096 x 4 bytes)
    assert chunk_tokens(2, 4096, element_size=2) == 128
    assert chunk_tokens(64, 8192) == 1  # at least one token
    assert chunk_tokens(1, 8) == 4096  # and within a peer's tokens-per-request limit


def test_a_short_input_goes_as_one_forward():
    swarm = FakeSwarm(FakePeer("a", 0, 3))
    x = torch.randn(1, 5, HIDDEN)
    run = asyncio.run(run_blocks_chunked(swarm, swarm.by_name("a").peer_id, 0, 3, x, chunk_bytes=CAP))
    assert run.messages == 1 and [c[0] for c in swarm.calls] == ["forward"]
    torch.testing.assert_close(run.output, run_blocks(0, 3, x))


@pytest.mark.parametrize("padded", [False, True])
def test_a_long_input_travels_in_chunks_and_gives_the_same_output(padded):
    swarm = FakeSwarm(FakePeer("a", 0, 3), max_message_bytes=CAP)
    x = torch.randn(2, 30, HIDDEN)
    mask = torch.ones(2, 30, dtype=torch.int64)
    if padded:
        mask[0, :7] = 0
    peer = swarm.by_name("a")
    with pytest.raises(PeerUnreachableError):  # one message would be refused
        asyncio.run(swarm.forward(peer.peer_id, 0, 3, x))
    run = asyncio.run(run_blocks_chunked(swarm, peer.peer_id, 0, 3, x, mask if padded else None, chunk_bytes=CAP))
    assert run.messages == 8  # 4 tokens of batch 2 per message
    assert [c[2] for c in swarm.calls if c[0] == "step"] == list(range(0, 30, 4))  # increasing positions
    torch.testing.assert_close(run.output, run_blocks(0, 3, x, mask if padded else None))
    assert run.receipt_from == 28


def test_a_route_chains_its_hops():
    swarm = FakeSwarm(FakePeer("a", 0, 2), FakePeer("b", 1, 4), max_message_bytes=CAP)
    x = torch.randn(1, 20, HIDDEN)
    route = [RouteHop(swarm.by_name("a").peer_id, 0, 2), RouteHop(swarm.by_name("b").peer_id, 2, 4)]
    runs = asyncio.run(run_route(swarm, route, x, chunk_bytes=CAP))
    torch.testing.assert_close(runs[-1].output, run_blocks(0, 4, x))
