"""Tolerance: a real small Llama block (random weights, d=64) in fp32 vs bf16 passes; cheats fail."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from reputation.errors import UnknownProfileError
from reputation.tolerance import Agreement, compare_updates, judge, profile_for

TOKENS, HIDDEN = 32, 64


def _run(layer: LlamaDecoderLayer, rotary: LlamaRotaryEmbedding, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    layer = layer.to(dtype)
    h = x.to(dtype)
    positions = torch.arange(x.shape[1])[None]
    with torch.no_grad():
        out = layer(h, position_embeddings=rotary(h, positions), attention_mask=None, position_ids=positions)
    return (out[0] if isinstance(out, tuple) else out).float()


@pytest.fixture(scope="module")
def block_runs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input, fp32 output, bf16 output) of one random-weight Llama block on the same bf16-representable input."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=172, num_attention_heads=4, num_key_value_heads=4,
        num_hidden_layers=1, vocab_size=32,
    )
    config._attn_implementation = "eager"
    layer, rotary = LlamaDecoderLayer(config, 0).eval(), LlamaRotaryEmbedding(config)
    x = torch.randn(1, TOKENS, HIDDEN).to(torch.bfloat16).float()  # (B, T, C)
    fp32 = _run(layer, rotary, x, torch.float32)
    bf16 = _run(layer, rotary, x, torch.bfloat16)
    return x, fp32, bf16


def test_honest_fp32_vs_bf16_passes(block_runs) -> None:
    x, fp32, bf16 = block_runs
    for profile in (profile_for("float32"), profile_for("bfloat16")):
        assert judge(compare_updates(x, fp32, bf16), profile) == "pass"
        assert judge(compare_updates(x, bf16, fp32), profile) == "pass"


def test_identical_outputs_agree_perfectly(block_runs) -> None:
    x, fp32, _ = block_runs
    agreement = compare_updates(x, fp32, fp32.clone())
    assert agreement.rel_l2 == 0.0 and agreement.min_token_cosine == pytest.approx(1.0, abs=1e-6)


def _cheats(x: torch.Tensor, honest: torch.Tensor) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    delta = honest - x
    partial = honest.clone()
    partial[:, : TOKENS // 10 + 1] = x[:, : TOKENS // 10 + 1]  # skip compute on ~10% of the tokens
    return {
        "skip block": x.clone(),
        "random output": torch.randn(x.shape, generator=g) * honest.std(),
        "noise added": honest + 0.3 * delta.std() * torch.randn(x.shape, generator=g),
        "cheat on 10% of tokens": partial,
        "scaled update": x + 0.7 * delta,
    }


@pytest.mark.parametrize("name", ["skip block", "random output", "noise added", "cheat on 10% of tokens", "scaled update"])
def test_cheats_fail(block_runs, name: str) -> None:
    x, fp32, _ = block_runs
    assert judge(compare_updates(x, fp32, _cheats(x, fp32)[name]), profile_for("bfloat16")) == "fail"


def test_one_reversed_token_fails_on_cosine_alone() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 400, HIDDEN, generator=g)  # (B, T, C)
    honest = x + torch.randn(1, 400, HIDDEN, generator=g)
    other = honest.clone()
    other[0, 7] = x[0, 7] - (honest[0, 7] - x[0, 7])  # one token's update reversed: rel_l2 only ~0.1
    agreement = compare_updates(x, honest, other)
    assert agreement.rel_l2 < 0.15 and agreement.min_token_cosine < -0.99
    assert judge(agreement, profile_for("bfloat16")) == "fail"


def test_inconclusive_band_and_non_finite() -> None:
    profile = profile_for("bfloat16")
    assert judge(Agreement(0.995, 0.10), profile) == "inconclusive"  # between pass (0.08) and fail (0.15)
    assert judge(Agreement(0.98, 0.01), profile) == "inconclusive"
    assert judge(Agreement(0.999, 0.01), profile) == "pass"
    assert judge(Agreement(float("nan"), 0.0), profile) == "fail"
    assert judge(Agreement(1.0, float("inf")), profile) == "fail"


def test_unknown_profile_and_bad_shapes() -> None:
    with pytest.raises(UnknownProfileError):
        profile_for("bfloat16", "nf4")
    with pytest.raises(ValueError):
        compare_updates(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 5))
