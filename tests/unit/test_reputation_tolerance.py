"""Tolerance: a real small Llama block (random weights, d=64) in fp32 vs bf16 passes; cheats fail."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from reputation.errors import UnknownProfileError
from reputation.tolerance import Agreement, compare_updates, judge, pair_profile, profile_for, route_profile

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


CONFIGS = [(dtype, quant) for dtype in ("float32", "bfloat16", "float16") for quant in ("none", "int8", "nf4")]


def test_every_pair_of_declared_configurations_has_a_calibrated_tolerance() -> None:
    for a in CONFIGS:
        for b in CONFIGS:
            profile = pair_profile(a, b)
            assert profile is not None, (a, b)
            assert profile == pair_profile(b, a) or profile.pass_max_rel_l2 == pair_profile(b, a).pass_max_rel_l2
            assert 0 < profile.pass_max_rel_l2 < profile.fail_max_rel_l2
            assert profile.fail_min_cosine < profile.pass_min_cosine < 1.0
            assert len(profile.name) <= 64
    same, cross = pair_profile(("float32", "none"), ("float32", "none")), pair_profile(("float32", "none"), ("bfloat16", "none"))
    assert same.pass_max_rel_l2 <= 0.01 < cross.pass_max_rel_l2  # same configuration: far tighter than 0.08
    assert pair_profile(("float32", "none"), ("float32", "nf4")).pass_max_rel_l2 > cross.pass_max_rel_l2


def test_pairs_outside_the_calibration_have_no_tolerance() -> None:
    assert pair_profile(("float32", "none"), ("float32", "int4")) is None
    assert pair_profile(("float64", "none"), ("float32", "none")) is None
    assert pair_profile(("float32", "svd-rank8-plain"), ("float32", "none")) is None
    assert pair_profile(("float32", "svd-rank8-plain"), ("float32", "svd-rank16-plain")) is None
    low_rank = pair_profile(("float32", "svd-rank8-plain+nf4"), ("bfloat16", "svd-rank8-plain+nf4"))
    base = pair_profile(("float32", "nf4"), ("bfloat16", "nf4"))
    assert low_rank.pass_max_rel_l2 == base.pass_max_rel_l2 and "svd-rank8-plain" in low_rank.name


def test_a_chain_of_checkers_is_judged_by_its_loosest_pair() -> None:
    fp32, bf16, int8 = ("float32", "none"), ("bfloat16", "none"), ("float32", "int8")
    chain = route_profile(fp32, [fp32, int8])
    assert chain.pass_max_rel_l2 == pair_profile(fp32, int8).pass_max_rel_l2
    assert route_profile(fp32, [fp32, bf16]).pass_max_rel_l2 == pair_profile(fp32, bf16).pass_max_rel_l2
    assert route_profile(fp32, [("float32", "int4")]) is None and route_profile(fp32, []) is None


def test_honest_fp32_vs_bf16_passes_the_pair_tolerance(block_runs) -> None:
    x, fp32, bf16 = block_runs
    profile = pair_profile(("float32", "none"), ("bfloat16", "none"))
    assert judge(compare_updates(x, fp32, bf16), profile) == "pass"
    assert judge(compare_updates(x, fp32, _cheats(x, fp32)["scaled update"]), profile) == "fail"


def test_even_the_loosest_pair_fails_an_unrelated_update() -> None:
    torch.manual_seed(0)
    inputs = torch.randn(1, 16, 256)
    honest = inputs + torch.randn(1, 16, 256)
    unrelated = inputs + torch.randn(1, 16, 256)  # random output of the right scale
    agreement = compare_updates(inputs, honest, unrelated)
    assert agreement.rel_l2 == pytest.approx(2 ** 0.5, rel=0.05)
    loosest = pair_profile(("float32", "int8"), ("bfloat16", "nf4"))
    assert loosest is not None and loosest.pass_max_rel_l2 <= 1.0 < loosest.fail_max_rel_l2 <= 1.2
    assert judge(agreement, loosest) == "fail"
