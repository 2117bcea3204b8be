"""Comparing two peers' backward passes: agreement of the input gradients, and the tolerance per dtype pair.

A backward check re-runs a peer's backward on other peers and compares the gradients of the hop's input
(deep prompts' gradients ride along: a peer that returns the right input gradient computed the same backward).
Agreement is measured as for forward updates: the worst token's cosine and the relative L2 over the whole
gradient. The tolerances come from honest disagreement measured on the default model
(`benchmarks/gradient_tolerance.py`, in `HONEST_GRADIENT_DISAGREEMENT`), with the same margins and floors as the
forward tolerances (`reputation.tolerance`). Only same-dtype dense pairs are compared: float32 and bfloat16 gradients
of the same backward disagree as much as a wrong one would, and compressed peers have no calibration yet. A
backward no peer of its configuration could re-run is not checked (and earns no credit).
"""

from __future__ import annotations

import torch

from reputation.tolerance import (
    FAIL_CAP_L2,
    FAIL_FLOOR_COS,
    FAIL_FLOOR_L2,
    FAIL_MARGIN,
    PASS_CAP_L2,
    PASS_FLOOR_COS,
    PASS_FLOOR_L2,
    PASS_MARGIN,
    Agreement,
    Config,
    ToleranceProfile,
)

# (worst relative L2, worst 1 - token cosine) between honest backward passes, per unordered dtype pair
# (benchmarks/results/gradient_tolerance.txt)
HONEST_GRADIENT_DISAGREEMENT: dict[frozenset[str], tuple[float, float]] = {
    frozenset({"float32"}): (0.0, 0.0),  # bit-identical here: the floors give other hardware room
    frozenset({"bfloat16"}): (0.0, 0.0),
    # float32 against bfloat16 is not compared: with the loss on every token they disagree by up to 0.68 relative
    # L2, with a token's cosine as low as -0.01, as far apart as a wrong gradient would be

}


def compare_gradients(reference: torch.Tensor, other: torch.Tensor) -> Agreement:
    """Agreement of `other` with `reference`, two gradients of the same hidden states (..., tokens, hidden)."""
    if reference.shape != other.shape:
        raise ValueError(f"shape mismatch: {tuple(reference.shape)} and {tuple(other.shape)}")
    a = reference.detach().float().reshape(-1, reference.shape[-1])
    b = other.detach().float().reshape(-1, other.shape[-1])
    live = a.norm(dim=-1) > 1e-12 * a.norm().clamp_min(1e-30)  # tokens whose gradient is not zero (no loss there)
    cos = torch.nn.functional.cosine_similarity(a[live], b[live], dim=-1, eps=1e-30) if bool(live.any()) else None
    rel = (b - a).norm() / a.norm().clamp_min(1e-30)
    return Agreement(min_token_cosine=float(cos.min()) if cos is not None else 1.0, rel_l2=float(rel))


def gradient_profile(a: Config, b: Config) -> ToleranceProfile | None:
    """The tolerance for comparing the backward passes of a peer declaring `a` with one declaring `b`; None
    without a calibration (compressed weights, float16)."""
    if a[1] != "none" or b[1] != "none":
        return None
    measured = HONEST_GRADIENT_DISAGREEMENT.get(frozenset({a[0], b[0]}))
    if measured is None:
        return None
    rel, one_minus_cos = measured
    short = {"float32": "fp32", "bfloat16": "bf16"}
    name = "grad-" + "-".join(sorted(short[d] for d in (a[0], b[0])))
    return ToleranceProfile(
        name, a[0], "none", None,
        1.0 - max(PASS_MARGIN * one_minus_cos, PASS_FLOOR_COS), min(max(PASS_MARGIN * rel, PASS_FLOOR_L2), PASS_CAP_L2),
        1.0 - max(FAIL_MARGIN * one_minus_cos, FAIL_FLOOR_COS), min(max(FAIL_MARGIN * rel, FAIL_FLOOR_L2), FAIL_CAP_L2),
    )
