"""Training passes through a fake swarm (`swarm.training`): gradients equal local autograd over the same blocks,
through any route, and a peer that dies between the forward and the backward is replaced. Also the tensors-in-parts
codec (`swarm.parts`) and the peer's checks of training requests (`peers.training`)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from fake_swarm import HIDDEN, FakePeer, FakeSwarm, block
from peers.training import TooManyTokens, read_train_tensors
from swarm.config import ClientConfig
from swarm.errors import ProtocolError
from swarm.parts import PartsReader, to_messages
from swarm.protocol import TrainRequest
from swarm.sequence import RemoteSequence
from swarm.training import RemoteBlocks, RemoteBlocksFunction, micro_batch_rows

CFG = ClientConfig(initial_peers=(), missing_blocks_timeout=0.0, request_timeout=5.0)
LENGTH = 2  # prompt tokens


def remote_blocks(swarm: FakeSwarm) -> RemoteBlocks:
    return RemoteBlocks(RemoteSequence(swarm, swarm, "fake", 6, CFG), swarm)


def local_loss(hidden: torch.Tensor, deep: torch.Tensor | None, mask=None) -> torch.Tensor:
    out = hidden
    for index in range(6):
        if deep is not None:
            out = torch.cat([out[:, :LENGTH] + deep[index], out[:, LENGTH:]], dim=1)
        out = block(index, out, mask)
    return (out ** 2).mean()


def gradients(blocks: RemoteBlocks, hidden: torch.Tensor, deep: torch.Tensor | None, mask=None, micro_batches=1):
    hidden = hidden.clone().requires_grad_(True)
    prompts = torch.empty(0) if deep is None else deep.clone().requires_grad_(True)
    loop = asyncio.new_event_loop()
    try:
        out = RemoteBlocksFunction.apply(hidden, prompts, blocks, loop.run_until_complete, mask, micro_batches)
        (out ** 2).mean().backward()
    finally:
        loop.close()
    return hidden.grad, (None if deep is None else prompts.grad)


def expected_gradients(hidden, deep, mask=None):
    hidden = hidden.clone().requires_grad_(True)
    wrt = [hidden] if deep is None else [hidden, deep.clone().requires_grad_(True)]
    return torch.autograd.grad(local_loss(*wrt, mask) if deep is not None else local_loss(wrt[0], None, mask), wrt)


@pytest.mark.parametrize("deep", [False, True])
def test_gradients_through_three_hops_equal_local_autograd(deep):
    swarm = FakeSwarm(FakePeer("a", 0, 2), FakePeer("b", 2, 4), FakePeer("c", 4, 6))
    hidden = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(0))
    prompts = torch.randn(6, LENGTH, HIDDEN) * 0.1 if deep else None
    got = gradients(remote_blocks(swarm), hidden, prompts)
    expected = expected_gradients(hidden, prompts)
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=1e-6)
    assert [c[0] for c in swarm.calls] == ["forward"] * 3 + ["backward"] * 3
    assert [c[1] for c in swarm.calls if c[0] == "backward"] == ["c", "b", "a"]


@pytest.mark.parametrize("micro_batches", [2, 3, 5])
def test_micro_batches_give_the_same_gradients_and_interleave_on_the_peers(micro_batches):
    swarm = FakeSwarm(FakePeer("a", 0, 2), FakePeer("b", 2, 4), FakePeer("c", 4, 6))
    hidden = torch.randn(3, 5, HIDDEN, generator=torch.Generator().manual_seed(4))
    prompts = torch.randn(6, LENGTH, HIDDEN) * 0.1
    mask = torch.ones(3, 5, dtype=torch.int64)
    mask[1, :2] = 0
    got = gradients(remote_blocks(swarm), hidden, prompts, mask, micro_batches=micro_batches)
    for g, e in zip(got, expected_gradients(hidden, prompts, mask)):
        assert torch.allclose(g, e, atol=1e-6)
    parts = min(micro_batches, 3)
    assert [c[0] for c in swarm.calls] == ["forward"] * 3 * parts + ["backward"] * 3 * parts
    # sent together: the first peer gets every micro-batch's forward before the last peer gets any
    forwards = [c[1] for c in swarm.calls if c[0] == "forward"]
    assert forwards[:parts] == ["a"] * parts and forwards[-parts:] == ["c"] * parts


def test_micro_batch_rows_split_near_evenly():
    assert micro_batch_rows(8, 3) == [slice(0, 3), slice(3, 5), slice(5, 8)]
    assert micro_batch_rows(2, 4) == [slice(0, 1), slice(1, 2)]
    assert micro_batch_rows(5, 1) == [slice(0, 5)]


def test_padded_rows_keep_their_mask_in_both_passes():
    swarm = FakeSwarm(FakePeer("a", 0, 3), FakePeer("b", 3, 6))
    hidden = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 5, dtype=torch.int64)
    mask[0, :2] = 0
    got, _ = gradients(remote_blocks(swarm), hidden, None, mask)
    (expected,) = expected_gradients(hidden, None, mask)
    assert torch.allclose(got, expected, atol=1e-6)


def test_a_peer_that_dies_between_forward_and_backward_is_replaced_by_a_route_over_its_blocks():
    # b serves 2:4 and dies after its forward; b2 (2:3) and b3 (3:4) take over: their forward is re-run first
    swarm = FakeSwarm(FakePeer("a", 0, 2), FakePeer("b", 2, 4, fail_after=1, throughput=1000.0),
                      FakePeer("b2", 2, 3, throughput=1.0), FakePeer("b3", 3, 4, throughput=1.0),
                      FakePeer("c", 4, 6))
    blocks = remote_blocks(swarm)
    hidden = torch.randn(1, 4, HIDDEN, generator=torch.Generator().manual_seed(2))
    prompts = torch.randn(6, LENGTH, HIDDEN) * 0.1
    got = gradients(blocks, hidden, prompts)
    expected = expected_gradients(hidden, prompts)
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=1e-6)
    assert blocks.failovers == 1
    assert ("forward", "b2", 2, 3) in swarm.calls and ("backward", "b3", 3, 4) in swarm.calls


def test_a_peer_that_dies_during_the_forward_is_routed_around_from_its_first_block():
    swarm = FakeSwarm(FakePeer("a", 0, 3, fail_after=0, throughput=1000.0), FakePeer("a2", 0, 3, throughput=1.0),
                      FakePeer("b", 3, 6))
    blocks = remote_blocks(swarm)
    hidden = torch.randn(1, 4, HIDDEN, generator=torch.Generator().manual_seed(3))
    got, _ = gradients(blocks, hidden, None)
    (expected,) = expected_gradients(hidden, None)
    assert torch.allclose(got, expected, atol=1e-6) and blocks.failovers == 1


def test_tensors_in_parts_round_trip_over_messages_within_the_limit():
    tensors = [torch.randn(3, 700, 64), torch.ones(3, 700, dtype=torch.int64), torch.randn(2, 2, 64)]
    messages = to_messages(tensors, part_bytes=50_000, message_bytes=120_000)
    assert len(messages) > 3
    assert all(sum(len(p.buffer) for p in m) <= 120_000 for m in messages)
    reader = PartsReader(len(tensors), max_bytes=10**7)
    for message in messages:
        reader.feed(message)
    assert reader.done
    for got, sent in zip(reader.tensors(), tensors):
        assert torch.equal(got, sent)


def test_parts_over_the_readers_limit_or_count_are_refused():
    messages = to_messages([torch.randn(100, 100)], part_bytes=10_000)
    with pytest.raises(ProtocolError, match="over the limit"):
        reader = PartsReader(1, max_bytes=20_000)
        for message in messages:
            reader.feed(message)
    reader = PartsReader(1, max_bytes=10**6)
    with pytest.raises(ProtocolError, match="more tensor parts"):
        for message in messages + messages:
            reader.feed(message)
    reader = PartsReader(2, max_bytes=10**6)
    for message in messages:
        reader.feed(message)
    with pytest.raises(ProtocolError, match="ended with 1 of 2"):
        reader.tensors()


def _meta(kind="backward", **fields) -> TrainRequest:
    count = fields.pop("tensors", 1 + (kind == "backward") + fields.get("mask", False) + fields.get("prompts", False))
    return TrainRequest(kind=kind, request_id="r", start=0, end=3, tensors=count, **fields)


def test_training_requests_are_checked_before_any_compute():
    hidden = torch.randn(2, 5, 8)
    hidden_, grad, mask, prompts = read_train_tensors(_meta(prompts=True), [hidden, hidden, torch.zeros(3, 2, 8)], 8, 100)
    assert mask is None and prompts.shape == (3, 2, 8)
    bad = [
        (_meta(), [hidden], "carries 2 tensors"),
        (_meta(), [hidden, hidden[:, :4]], "gradient must match"),
        (_meta("forward"), [hidden.long()], "floating point"),
        (_meta("forward", mask=True), [hidden, torch.full((2, 5), 2)], "0/1"),
        (_meta(prompts=True), [hidden, hidden, torch.zeros(2, 2, 8)], "deep prompts must be"),
        (_meta(prompts=True), [hidden, hidden, torch.zeros(3, 6, 8)], "deep prompts must be"),  # longer than the input
        (_meta(), [hidden, hidden.masked_fill(hidden > 0, float("inf"))], "NaN or infinity"),
    ]
    for meta, tensors, message in bad:
        with pytest.raises(ProtocolError, match=message):
            read_train_tensors(meta, tensors, 8, 100)
    with pytest.raises(TooManyTokens, match="--max-train-tokens 9"):
        read_train_tensors(_meta("forward"), [hidden], 8, 9)


def _tiny_span():
    from transformers import LlamaConfig, LlamaForCausalLM

    from swarm.blocks import BlockSpan

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    layers = LlamaForCausalLM(config).model.layers
    span = BlockSpan(config, 0, 2)
    span.load_blocks(lambda i: {k: v.detach().clone() for k, v in layers[i].state_dict().items()})
    return span


def test_a_kept_forward_serves_its_backward_with_the_gradients_a_recompute_gives():
    from peers.training import ForwardGraphs, train_step

    span, graphs = _tiny_span(), ForwardGraphs(max_tokens=100)
    hidden, grad = torch.randn(1, 6, 32), torch.randn(1, 6, 32)
    prompts = torch.randn(2, 2, 32) * 0.1
    args = (None, prompts, torch.device("cpu"), torch.float32)
    forward = TrainRequest(kind="forward", request_id="f1", start=0, end=2, tensors=2, prompts=True, keep=True)
    (output,) = train_step(span, forward, hidden, None, *args, graphs=graphs, client="me")
    backward = TrainRequest(kind="backward", request_id="b1", start=0, end=2, tensors=3, prompts=True, forward_id="f1")
    kept = train_step(span, backward, hidden, grad, *args, graphs=graphs, client="me")
    assert graphs.hits == 1
    recomputed = train_step(span, backward, hidden, grad, *args, graphs=graphs, client="me")  # taken already
    assert graphs.misses == 1
    for a, b in zip(kept, recomputed):
        assert torch.allclose(a, b, atol=1e-6)
    assert output.shape == hidden.shape and not output.requires_grad


def test_kept_forwards_are_bounded_and_never_used_for_other_inputs_or_clients():
    from peers.training import ForwardGraphs, KeptForward

    now = [0.0]
    graphs = ForwardGraphs(max_tokens=10, ttl=60.0, clock=lambda: now[0])
    x = torch.zeros(1, 4, 2)

    def kept(at: float) -> KeptForward:
        return KeptForward((x, None, None), x, None, x, 4, at)

    graphs.keep(("me", "a"), kept(0.0))
    assert graphs.take(("other", "a"), x, None, None) is None  # another client cannot claim it
    assert graphs.take(("me", "a"), x + 1, None, None) is None  # nor a backward of other inputs (and it is dropped)
    for name in "bcd":
        graphs.keep(("me", name), kept(0.0))
    assert graphs.tokens <= 10 and graphs.take(("me", "b"), x, None, None) is None  # the oldest made room
    now[0] = 61.0
    assert graphs.take(("me", "d"), x, None, None) is None  # too old
