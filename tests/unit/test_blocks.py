"""Tests of swarm.blocks: spans of transformer blocks reproduce the local model, with and without a KV cache.

Every test builds a tiny random model in-process (seeded) and compares the spans against the model's own
forward pass, so the reference is transformers itself.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from swarm.blocks import BlockSpan, SpanCache, SpanInput
from swarm.errors import UnsupportedModelError

NUM_LAYERS = 4
ATOL = 1e-5
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    initializer_range=0.1,  # larger than the default so logits differ visibly between tokens
    attn_implementation="sdpa",
)
ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}

@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread; two OpenMP threads on a busy 2-core machine stall for seconds."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def build_model(model_type: str) -> PreTrainedModel:
    config_cls, model_cls = ARCHITECTURES[model_type]
    torch.manual_seed(0)
    return model_cls(config_cls(**TINY)).eval()


@pytest.fixture(scope="module")
def llama() -> PreTrainedModel:
    return build_model("llama")


def make_span(model: PreTrainedModel, start: int, end: int) -> BlockSpan:
    span = BlockSpan(copy.deepcopy(model.config), start, end)
    span.load_blocks(lambda i: model.model.layers[i].state_dict())
    return span


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def logits_through(model: PreTrainedModel, spans: list[BlockSpan], caches: list[SpanCache], ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Embed `ids`, run them through the spans (appending to their caches), then norm + lm_head."""
    hidden = model.model.embed_tokens(ids)  # (batch, new, hidden)
    span_input = SpanInput(attention_mask=attention_mask, start_position=caches[0].length)
    for span, cache in zip(spans, caches):
        hidden = span(hidden, cache, span_input)
    with torch.no_grad():
        return model.lm_head(model.model.norm(hidden))  # (batch, new, vocab)


@torch.no_grad()
def reference_logits(model: PreTrainedModel, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    if attention_mask is None:
        return model(ids).logits
    # positions count only real tokens, as transformers' generate computes them for left padding
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    return model(ids, attention_mask=attention_mask, position_ids=position_ids).logits


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_prefill_through_two_spans_reproduces_the_model(model_type):
    model = build_model(model_type)
    spans = [make_span(model, 0, 2), make_span(model, 2, NUM_LAYERS)]
    ids = random_ids(2, 9)
    caches = [s.new_cache() for s in spans]
    logits = logits_through(model, spans, caches, ids)
    torch.testing.assert_close(logits, reference_logits(model, ids), atol=ATOL, rtol=0)
    assert [c.length for c in caches] == [9, 9]


def test_middle_span_matches_the_model_hidden_states(llama):
    span = make_span(llama, 1, 3)  # blocks [1, 3), weights from model.layers[1] and model.layers[2]
    ids = random_ids(1, 6)
    with torch.no_grad():
        states = llama(ids, output_hidden_states=True).hidden_states  # states[i]: the input of layer i
    out = span(states[1], span.new_cache(), SpanInput(None, 0))
    torch.testing.assert_close(out, states[3], atol=ATOL, rtol=0)
    assert not torch.allclose(states[1], states[3], atol=1e-3)  # the blocks do change the hidden states


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_incremental_decoding_matches_the_full_forward(model_type):
    model = build_model(model_type)
    spans = [make_span(model, 0, 2), make_span(model, 2, NUM_LAYERS)]
    caches = [s.new_cache() for s in spans]
    ids = random_ids(2, 36)
    reference = reference_logits(model, ids)
    prompt = 30  # then one token at a time, past the cache's first capacity (32 tokens)
    logits = logits_through(model, spans, caches, ids[:, :prompt])
    torch.testing.assert_close(logits, reference[:, :prompt], atol=ATOL, rtol=0)
    for position in range(prompt, ids.shape[1]):
        step = logits_through(model, spans, caches, ids[:, position : position + 1])
        torch.testing.assert_close(step[:, 0], reference[:, position], atol=ATOL, rtol=0)
        assert caches[0].length == caches[1].length == position + 1


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_several_tokens_after_a_cached_prefix_match_the_full_forward(model_type):
    """A chat turn: a multi-token chunk after cached history, without a padding mask."""
    model = build_model(model_type)
    spans = [make_span(model, 0, 2), make_span(model, 2, NUM_LAYERS)]
    caches = [s.new_cache() for s in spans]
    ids = random_ids(2, 12)
    reference = reference_logits(model, ids)
    for start, end in [(0, 5), (5, 8), (8, 9), (9, 12)]:
        logits = logits_through(model, spans, caches, ids[:, start:end])
        torch.testing.assert_close(logits, reference[:, start:end], atol=ATOL, rtol=0)


def test_left_padded_batch_matches_the_model_with_its_attention_mask(llama):
    spans = [make_span(llama, 0, 2), make_span(llama, 2, NUM_LAYERS)]
    caches = [s.new_cache() for s in spans]
    ids = random_ids(2, 9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # the second prompt is 3 tokens shorter, padded on the left
    ids[1, :3] = 0

    logits = logits_through(llama, spans, caches, ids[:, :6], mask[:, :6])
    reference = reference_logits(llama, ids, mask)
    real = mask[:, :6].bool()
    torch.testing.assert_close(logits[real], reference[:, :6][real], atol=ATOL, rtol=0)
    # the padded row also equals that prompt run alone, unpadded
    alone = reference_logits(llama, ids[1:, 3:])
    torch.testing.assert_close(logits[1, 3:6], alone[0, :3], atol=ATOL, rtol=0)

    for position in range(6, 9):  # decode steps carry the mask of everything so far
        step = logits_through(llama, spans, caches, ids[:, position : position + 1], mask[:, : position + 1])
        torch.testing.assert_close(step[:, 0], reference[:, position], atol=ATOL, rtol=0)
        torch.testing.assert_close(step[1, 0], alone[0, position - 3], atol=ATOL, rtol=0)


def test_crop_then_refeed_equals_never_feeding_the_cropped_tokens(llama):
    spans = [make_span(llama, 0, 2), make_span(llama, 2, NUM_LAYERS)]
    first, discarded, second = random_ids(1, 5, seed=2), random_ids(1, 4, seed=3), random_ids(1, 3, seed=4)

    caches = [s.new_cache() for s in spans]
    logits_through(llama, spans, caches, first)
    logits_through(llama, spans, caches, discarded)
    assert caches[0].length == 9
    for cache in caches:
        cache.crop(5)
    assert [c.length for c in caches] == [5, 5]
    rolled_back = logits_through(llama, spans, caches, second)

    fresh = [s.new_cache() for s in spans]
    logits_through(llama, spans, fresh, first)
    never_fed = logits_through(llama, spans, fresh, second)
    torch.testing.assert_close(rolled_back, never_fed, atol=ATOL, rtol=0)
    torch.testing.assert_close(never_fed[0], reference_logits(llama, torch.cat([first, second], 1))[0, 5:], atol=ATOL, rtol=0)


def test_crop_beyond_the_length_keeps_everything():
    cache = SpanCache(num_layers=2)
    key = torch.zeros(1, 2, 3, 4)
    cache.update(key, key, 0)
    cache.update(key, key, 1)
    cache.crop(10)
    assert cache.length == 3


def test_sub_range_of_a_span_with_its_own_cache(llama):
    whole = make_span(llama, 0, NUM_LAYERS)
    ids = random_ids(1, 8)
    with torch.no_grad():
        states = llama(ids, output_hidden_states=True).hidden_states
    cache = whole.new_cache(1, 3)
    out = whole(states[1][:, :6], cache, SpanInput(None, 0), start=1, end=3)
    torch.testing.assert_close(out, states[3][:, :6], atol=ATOL, rtol=0)
    for position in (6, 7):  # and incrementally, with the sub-range's cache
        step = whole(states[1][:, position : position + 1], cache, SpanInput(None, cache.length), start=1, end=3)
        torch.testing.assert_close(step[:, 0], states[3][:, position], atol=ATOL, rtol=0)
    assert cache.length == 8

    inner = make_span(llama, 1, 3)  # the same sub-range at the end of another span
    tail_cache = inner.new_cache(2, 3)
    out = inner(states[2], tail_cache, SpanInput(None, 0), start=2, end=3)
    torch.testing.assert_close(out, states[3], atol=ATOL, rtol=0)


@pytest.mark.parametrize("start, end", [(0, 2), (1, 1), (2, 1), (1, 4), (3, 4), (-1, 2)])
def test_invalid_sub_ranges_raise(llama, start, end):
    span = make_span(llama, 1, 3)
    with pytest.raises(ValueError, match="outside this span"):
        span.new_cache(start, end)
    with pytest.raises(ValueError, match="outside this span"):
        span(torch.zeros(1, 1, TINY["hidden_size"]), span.new_cache(), SpanInput(None, 0), start=start, end=end)


@pytest.mark.parametrize("start, end", [(2, 2), (3, 1), (-1, 2), (0, NUM_LAYERS + 1)])
def test_invalid_spans_raise(llama, start, end):
    with pytest.raises(ValueError, match="invalid block span"):
        BlockSpan(copy.deepcopy(llama.config), start, end)


def test_load_blocks_with_a_missing_key_raises(llama):
    span = BlockSpan(copy.deepcopy(llama.config), 1, 3)

    def without_one_key(i: int) -> dict[str, torch.Tensor]:
        state = dict(llama.model.layers[i].state_dict())
        if i == 2:
            del state["mlp.down_proj.weight"]
        return state

    with pytest.raises(ValueError, match=r"block 2: missing \['mlp.down_proj.weight'\]"):
        span.load_blocks(without_one_key)


def test_load_blocks_with_an_unexpected_key_raises(llama):
    span = BlockSpan(copy.deepcopy(llama.config), 0, 1)
    state = {**llama.model.layers[0].state_dict(), "extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="unexpected"):
        span.load_blocks(lambda i: state)


def test_unsupported_model_type_raises():
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        BlockSpan(GPT2Config(n_layer=2, n_embd=16, n_head=2), 0, 1)


def test_cache_size_grows_with_the_tokens(llama):
    span = make_span(llama, 0, 2)
    cache = span.new_cache()
    assert cache.length == 0 and cache.nbytes == 0
    span(torch.randn(1, 3, TINY["hidden_size"]), cache, SpanInput(None, 0))
    kv_heads, head_dim = TINY["num_key_value_heads"], TINY["hidden_size"] // TINY["num_attention_heads"]
    minimum = 2 * 2 * 3 * kv_heads * head_dim * 4  # keys and values of 2 layers, 3 tokens, float32
    assert cache.length == 3 and cache.nbytes >= minimum
