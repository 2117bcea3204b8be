"""Tolerance profiles and the comparison of two executions of the same blocks (issue 4, part 2).

Compare the blocks' update delta = output - input, not the outputs: the residual stream carries the input
through unchanged, so output-space errors look small even when the blocks were skipped (TRUST.md). Two
numbers per comparison: the minimum over tokens of the cosine between the two updates (catches cheating on a
few tokens) and the relative L2 of the whole span's update (catches uniform drift such as a cheaper
quantisation).

Thresholds come from TRUST.md's honest-vs-honest measurements (CPU, random-weight Llama block, d=2048):
bf16 vs fp32 rel_l2 3.6e-2 and 1-cos 6.4e-4; 8-block stack 3.8e-2 / 7.2e-4. A profile passes comfortably
above those (x2), fails well below anything honest, and leaves an inconclusive band between. Re-calibrate on GPUs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from reputation.errors import UnknownProfileError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Agreement:
    """How closely a second execution reproduced the first one's update."""

    min_token_cosine: float  # worst token's cosine between the two updates
    rel_l2: float  # ||delta_other - delta_honest|| / ||delta_honest|| over the whole span


@dataclass(frozen=True)
class ToleranceProfile:
    """Pass/fail thresholds for one declared configuration."""

    name: str  # e.g. "bf16", "int8"
    dtype: str  # declared compute dtype, torch name without "torch."
    quantisation: str  # "none", "int8", "nf4", ...
    svd_rank: int | None  # rank of a declared SVD compression of the wire, None if none
    pass_min_cosine: float  # pass only if every token's cosine is at least this
    pass_max_rel_l2: float  # ... and the span's relative L2 is at most this
    fail_min_cosine: float  # fail if any token's cosine is below this
    fail_max_rel_l2: float  # ... or the span's relative L2 is above this


def _profile(name: str, dtype: str, quantisation: str, pass_l2: float, fail_l2: float) -> ToleranceProfile:
    return ToleranceProfile(name, dtype, quantisation, None, 0.99, pass_l2, 0.97, fail_l2)


# Unquantised dtypes all judged against each other: honest peers may run fp32 while others run bf16.
# int8: TRUST.md measures int8-vs-bf16 at rel_l2 2.9e-2; honest int8-vs-int8 pairs not yet measured, so the
# pass band is widened to 0.10 as a guess to be calibrated.
DEFAULT_PROFILES: tuple[ToleranceProfile, ...] = (
    _profile("fp32", "float32", "none", 0.08, 0.15),
    _profile("bf16", "bfloat16", "none", 0.08, 0.15),
    _profile("fp16", "float16", "none", 0.08, 0.15),
    _profile("bf16-int8", "bfloat16", "int8", 0.10, 0.20),
)


def profile_for(
    dtype: str, quantisation: str = "none", svd_rank: int | None = None,
    profiles: tuple[ToleranceProfile, ...] = DEFAULT_PROFILES,
) -> ToleranceProfile:
    for p in profiles:
        if (p.dtype, p.quantisation, p.svd_rank) == (dtype, quantisation, svd_rank):
            return p
    raise UnknownProfileError(
        f"no tolerance profile for dtype={dtype} quantisation={quantisation} svd_rank={svd_rank}; "
        "calibrate one from honest-vs-honest runs first"
    )


def compare_updates(inputs: torch.Tensor, honest_output: torch.Tensor, other_output: torch.Tensor) -> Agreement:
    """Agreement of other_output with honest_output, both computed from inputs. Shapes (..., T, d)."""
    if not inputs.shape == honest_output.shape == other_output.shape:
        raise ValueError(f"shape mismatch: {inputs.shape}, {honest_output.shape}, {other_output.shape}")
    x = inputs.detach().float()
    delta_h = (honest_output.detach().float() - x).reshape(-1, x.shape[-1])  # (tokens, d)
    delta_o = (other_output.detach().float() - x).reshape(-1, x.shape[-1])  # (tokens, d)
    # eps makes a zero update (a skipped block) score cosine 0 instead of NaN
    cos = torch.nn.functional.cosine_similarity(delta_h, delta_o, dim=-1, eps=1e-12)  # (tokens,)
    denom = delta_h.norm().clamp_min(1e-12)
    rel = (delta_o - delta_h).norm() / denom
    return Agreement(min_token_cosine=float(cos.min()), rel_l2=float(rel))


def judge(agreement: Agreement, profile: ToleranceProfile) -> str:
    """'pass', 'fail' or 'inconclusive' (NaN or inf counts as fail: an honest block never produces them)."""
    cos, rel = agreement.min_token_cosine, agreement.rel_l2
    if not (cos == cos and rel == rel and rel != float("inf")):
        return "fail"
    if cos < profile.fail_min_cosine or rel > profile.fail_max_rel_l2:
        return "fail"
    if cos >= profile.pass_min_cosine and rel <= profile.pass_max_rel_l2:
        return "pass"
    return "inconclusive"
