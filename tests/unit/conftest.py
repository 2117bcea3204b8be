"""Fixtures of the unit tests: a tiny random Llama model, spans of it, and BlockHandlers serving them."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from handler_kit import HIDDEN, NUM_BLOCKS, handler_config
from peers.handler import BlockHandler, HandlerFactory
from swarm.blocks import BlockSpan


TINY_LLAMA = dict(
    hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=NUM_BLOCKS, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=128, initializer_range=0.1, attn_implementation="sdpa",
)



@pytest.fixture(scope="module")
def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()


@pytest.fixture
def make_span(tiny_llama) -> Callable[[], BlockSpan]:
    """Builds blocks 0:NUM_BLOCKS with their own copy of the weights (a handler may change them in place)."""

    def build(start: int = 0, end: int = NUM_BLOCKS) -> BlockSpan:
        span = BlockSpan(tiny_llama.config, start, end)
        span.load_blocks(lambda i: {k: v.clone() for k, v in tiny_llama.model.layers[i].state_dict().items()})
        return span

    return build


@pytest.fixture
def make_handler(make_span):
    """`make_handler(factory=BlockHandler, cache_tokens=48, **config)`: a handler on a fresh tiny span, shut down after."""
    made: list[BlockHandler] = []

    def build(factory: HandlerFactory = BlockHandler, cache_tokens: int = 48, throughput: float = 100.0, **config):
        handler = factory(make_span(), handler_config(**config), throughput, cache_tokens)
        made.append(handler)
        return handler

    yield build
    for handler in made:
        handler.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread; two OpenMP threads on a busy 2-core machine stall for seconds."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
