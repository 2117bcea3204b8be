"""Tests of swarm.local_blocks: blocks a client loads on demand, within a memory budget, to verify hops itself.

A tiny random Llama (seeded) is the model; its blocks' states stand in for the block cache, and the reference
is one `BlockSpan` over the same blocks.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from swarm.blocks import BlockSpan, SpanInput
from swarm.local_blocks import LocalBlocks

CONFIG = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=128, initializer_range=0.1)


@pytest.fixture(scope="module")
def states() -> dict[int, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG).eval()
    return {i: {k: v.detach().clone() for k, v in layer.state_dict().items()} for i, layer in enumerate(model.model.layers)}


def local_blocks(states, budget_blocks: float) -> tuple[LocalBlocks, list[int]]:
    loads: list[int] = []

    def load_state(index: int) -> dict[str, torch.Tensor]:
        loads.append(index)
        return states[index]

    def nbytes(index: int) -> int:
        return sum(t.numel() * t.element_size() for t in states[index].values())

    return LocalBlocks(CONFIG, load_state, nbytes, budget_bytes=int(budget_blocks * nbytes(0))), loads


def test_local_blocks_compute_what_one_span_of_the_same_blocks_computes(states):
    blocks, _ = local_blocks(states, budget_blocks=4)
    hidden = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 5, dtype=torch.int64)
    mask[1, :2] = 0  # the second row is left-padded
    reference = BlockSpan(CONFIG, 1, 4)
    reference.load_blocks(lambda i: states[i])
    expected = reference(hidden, None, SpanInput(mask, 0))
    assert torch.allclose(blocks.run(1, 4, hidden, mask), expected, atol=1e-5)


def test_blocks_load_on_demand_and_the_least_recently_used_make_room_within_the_budget(states):
    blocks, loads = local_blocks(states, budget_blocks=2.5)
    hidden = torch.randn(1, 3, 64)
    blocks.run(0, 2, hidden)
    blocks.run(0, 2, hidden)
    assert loads == [0, 1]  # loaded once, kept
    blocks.run(2, 3, hidden)
    assert blocks.loaded_blocks == [1, 2] and blocks.loaded_bytes <= blocks.budget_bytes  # block 0 made room
    assert loads == [0, 1, 2]


def test_a_span_larger_than_the_budget_does_not_fit_and_is_refused(states):
    blocks, loads = local_blocks(states, budget_blocks=2.5)
    assert blocks.fits(1, 3) and not blocks.fits(0, 3)
    with pytest.raises(ValueError, match="do not fit"):
        blocks.run(0, 3, torch.randn(1, 3, 64))
    assert loads == []
