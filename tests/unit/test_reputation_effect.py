"""The effect check's pure parts (reputation.effect): what a changed top-1 token at a clear lead is, and the margin
per pair of declared configurations."""

from __future__ import annotations

import pytest
import torch

from reputation.effect import (
    EFFECT_FACTOR,
    EFFECT_FLOOR,
    HONEST_LEAD_AT_CHANGE,
    effect_verdict,
    pair_margin,
    routes_margin,
    top_two,
)

FP32, BF16, INT8 = ("float32", "none"), ("bfloat16", "none"), ("float32", "int8")


def logits(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows)[None]  # (1, positions, vocab)


def test_top_two_gives_each_positions_winner_and_its_lead():
    winner, lead = top_two(logits([1.0, 4.0, 2.5], [0.0, -1.0, 3.0]))
    assert winner.tolist() == [1, 2]
    torch.testing.assert_close(lead, torch.tensor([1.5, 3.0]))


def test_identical_logits_pass_and_count_the_clear_positions():
    reference = logits([1.0, 4.0, 2.5], [0.0, 0.2, 0.1])
    effect = effect_verdict(reference.clone(), reference, margin=1.0)
    assert (effect.verdict, effect.positions, effect.clear, effect.changed) == ("pass", 2, 1, 0)


def test_a_changed_top1_at_a_clear_lead_fails_and_says_where():
    reference = logits([0.0, 0.1, 0.05], [1.0, 4.0, 2.5])  # position 1: token 1 leads by 1.5
    steered = logits([0.0, 0.1, 0.05], [1.0, 4.0, 4.2])  # ... the subject's head picks token 2 there
    effect = effect_verdict(steered, reference, margin=1.0)
    assert (effect.verdict, effect.clear, effect.changed) == ("fail", 1, 1)
    assert (effect.reference_token, effect.subject_token) == (1, 2)
    assert effect.lead == pytest.approx(1.5)


def test_a_changed_top1_where_the_lead_is_small_passes():
    reference = logits([1.0, 4.0, 3.6])  # token 1 leads by 0.4: honest peers may disagree here
    effect = effect_verdict(logits([1.0, 4.0, 4.1]), reference, margin=1.0)
    assert (effect.verdict, effect.clear, effect.changed) == ("pass", 0, 0)


def test_non_finite_subject_logits_at_a_clear_position_fail_and_a_broken_reference_decides_nothing():
    reference = logits([1.0, 4.0, 2.5])
    assert effect_verdict(logits([1.0, float("nan"), 2.5]), reference, margin=1.0).verdict == "fail"
    assert effect_verdict(logits([1.0, 4.0, 2.5]), logits([1.0, float("inf"), 2.5]), margin=1.0).clear == 0


def test_shapes_must_match():
    with pytest.raises(ValueError):
        effect_verdict(torch.zeros(1, 2, 3), torch.zeros(1, 1, 3), margin=1.0)


def test_the_margin_of_a_pair_is_twice_its_largest_honest_lead_at_a_change_with_a_floor():
    names = {FP32: "fp32", BF16: "bf16", INT8: "fp32+int8"}
    for a, b in ((FP32, FP32), (FP32, BF16), (FP32, INT8), (BF16, INT8)):
        measured = HONEST_LEAD_AT_CHANGE[frozenset((names[a], names[b]))]
        assert pair_margin(a, b) == pair_margin(b, a) == max(EFFECT_FACTOR * measured, EFFECT_FLOOR)
    assert pair_margin(FP32, FP32) == EFFECT_FLOOR  # identical configurations never changed a top-1 token


def test_pairs_without_a_calibration_have_no_effect_check():
    assert pair_margin(("float64", "none"), FP32) is None
    assert pair_margin(("float32", "svd-rank64-plain"), FP32) is None  # different factors
    assert pair_margin(("float32", "svd-rank64-plain"), ("float32", "svd-rank64-plain")) == pair_margin(FP32, FP32)
    assert routes_margin([FP32], [FP32, ("float64", "none")]) is None


def test_a_chain_of_checkers_takes_the_loosest_margin():
    assert routes_margin([FP32], [FP32, INT8]) == max(pair_margin(FP32, FP32), pair_margin(FP32, INT8))
    assert routes_margin([FP32], []) is None
