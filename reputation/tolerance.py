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
from swarm.tags import split_compression

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


Config = tuple[str, str]  # a declared configuration: (compute dtype, compression tag)

# Honest disagreement per pair of configurations without SVD: (worst relative L2 of a one-token step's update,
# worst 1 - cosine), over both directions of the pair. Measured on CPU with the default model by
# `benchmarks/tolerance_pairs.py` (a session's one-token steps vs a whole-sequence re-run, spans of 1, 10 and 30
# blocks, real text; benchmarks/results/tolerance_pairs.txt, README "How closely honest peers agree"), raised to
# TRUST.md's random-weight d=2048 figures where those are larger (bf16 vs fp32: 3.6e-2 / 6.4e-4). The worst span
# is always the whole model (30 blocks): errors add up along a chain. int8 is loose even against itself:
# LLM.int8 sends a feature through its float path when any token of the request exceeds the outlier threshold,
# so a one-token step and a re-run of the whole history quantise differently.
HONEST_DISAGREEMENT: dict[frozenset[str], tuple[float, float]] = {}


def _measured(a: str, b: str, rel_l2: float, one_minus_cos: float) -> None:
    HONEST_DISAGREEMENT[frozenset((a, b))] = (rel_l2, one_minus_cos)


for _a, _b, _rel, _cos in (
    ("fp32", "fp32", 4.22e-06, 4.77e-07),
    ("fp32", "fp32+int8", 3.82e-01, 5.25e-02),
    ("fp32", "fp32+nf4", 5.48e-01, 1.18e-01),
    ("fp32", "bf16", 3.75e-02, 6.40e-04),
    ("fp32", "bf16+int8", 1.49e-01, 1.05e-02),
    ("fp32", "bf16+nf4", 5.54e-01, 1.22e-01),
    ("fp32", "fp16", 4.60e-03, 8.52e-06),
    ("fp32", "fp16+int8", 2.74e-01, 3.57e-02),
    ("fp32", "fp16+nf4", 5.57e-01, 1.21e-01),
    ("fp32+int8", "fp32+int8", 1.95e-01, 1.43e-02),
    ("fp32+int8", "fp32+nf4", 8.32e-01, 1.95e-01),
    ("fp32+int8", "bf16", 4.18e-01, 5.95e-02),
    ("fp32+int8", "bf16+int8", 4.07e-01, 5.41e-02),
    ("fp32+int8", "bf16+nf4", 8.64e-01, 2.12e-01),
    ("fp32+int8", "fp16", 3.83e-01, 5.27e-02),
    ("fp32+int8", "fp16+int8", 1.22e-01, 6.85e-03),
    ("fp32+int8", "fp16+nf4", 8.43e-01, 1.98e-01),
    ("fp32+nf4", "fp32+nf4", 1.11e-02, 5.95e-05),
    ("fp32+nf4", "bf16", 5.47e-01, 1.17e-01),
    ("fp32+nf4", "bf16+int8", 5.84e-01, 1.35e-01),
    ("fp32+nf4", "bf16+nf4", 7.34e-02, 2.66e-03),
    ("fp32+nf4", "fp16", 5.46e-01, 1.18e-01),
    ("fp32+nf4", "fp16+int8", 6.08e-01, 1.66e-01),
    ("fp32+nf4", "fp16+nf4", 3.17e-02, 4.98e-04),
    ("bf16", "bf16", 3.29e-02, 4.61e-04),
    ("bf16", "bf16+int8", 1.55e-01, 1.04e-02),
    ("bf16", "bf16+nf4", 5.53e-01, 1.21e-01),
    ("bf16", "fp16", 3.67e-02, 5.88e-04),
    ("bf16", "fp16+int8", 2.93e-01, 4.00e-02),
    ("bf16", "fp16+nf4", 5.56e-01, 1.20e-01),
    ("bf16+int8", "bf16+int8", 1.44e-01, 9.25e-03),
    ("bf16+int8", "bf16+nf4", 5.91e-01, 1.40e-01),
    ("bf16+int8", "fp16", 1.49e-01, 1.06e-02),
    ("bf16+int8", "fp16+int8", 2.17e-01, 2.16e-02),
    ("bf16+int8", "fp16+nf4", 5.92e-01, 1.39e-01),
    ("bf16+nf4", "bf16+nf4", 3.61e-02, 5.70e-04),
    ("bf16+nf4", "fp16", 5.52e-01, 1.22e-01),
    ("bf16+nf4", "fp16+int8", 6.15e-01, 1.83e-01),
    ("bf16+nf4", "fp16+nf4", 8.30e-02, 3.38e-03),
    ("fp16", "fp16", 3.68e-03, 5.54e-06),
    ("fp16", "fp16+int8", 2.75e-01, 3.59e-02),
    ("fp16", "fp16+nf4", 5.55e-01, 1.21e-01),
    ("fp16+int8", "fp16+int8", 1.92e-01, 1.68e-02),
    ("fp16+int8", "fp16+nf4", 6.18e-01, 1.67e-01),
    ("fp16+nf4", "fp16+nf4", 1.29e-02, 8.31e-05),
):
    _measured(_a, _b, _rel, _cos)

# The same pairs on whole chat prompts (a session's first step, system prompt included), measured by
# `benchmarks/tolerance_prefill.py` (benchmarks/results/tolerance_prefill.txt); each pair's calibration is the
# larger of the two. nf4 against any other quantisation disagrees at one token of the default system prompt
# (worst token cosine about 0.35-0.39), so for those pairs the cosine says nothing and relative L2 judges alone
# (within PASS_CAP_L2 / FAIL_CAP_L2). Checks prefer a checker of the subject's own configuration (tightest first).
for _a, _b, _rel, _cos in (
    ("fp32", "fp32+int8", 9.67e-02, 3.59e-02),
    ("fp32", "fp32+nf4", 4.36e-01, 6.09e-01),
    ("fp32", "bf16", 4.18e-02, 2.45e-03),
    ("fp32", "bf16+int8", 1.34e-01, 4.70e-02),
    ("fp32", "bf16+nf4", 4.35e-01, 6.19e-01),
    ("fp32", "fp16", 2.08e-03, 1.45e-05),
    ("fp32", "fp16+int8", 9.78e-02, 4.93e-02),
    ("fp32", "fp16+nf4", 4.44e-01, 6.01e-01),
    ("fp32+int8", "fp32+nf4", 4.50e-01, 6.48e-01),
    ("fp32+int8", "bf16", 1.04e-01, 4.73e-02),
    ("fp32+int8", "bf16+int8", 1.31e-01, 5.35e-02),
    ("fp32+int8", "bf16+nf4", 4.50e-01, 6.58e-01),
    ("fp32+int8", "fp16", 9.69e-02, 3.61e-02),
    ("fp32+int8", "fp16+int8", 8.73e-02, 5.56e-02),
    ("fp32+int8", "fp16+nf4", 4.58e-01, 6.39e-01),
    ("fp32+nf4", "bf16", 4.52e-01, 6.09e-01),
    ("fp32+nf4", "bf16+int8", 4.86e-01, 6.45e-01),
    ("fp32+nf4", "bf16+nf4", 5.69e-02, 1.79e-02),
    ("fp32+nf4", "fp16", 4.36e-01, 6.10e-01),
    ("fp32+nf4", "fp16+int8", 4.48e-01, 6.02e-01),
    ("fp32+nf4", "fp16+nf4", 2.80e-02, 3.79e-03),
    ("bf16", "bf16+int8", 1.09e-01, 4.87e-02),
    ("bf16", "bf16+nf4", 4.52e-01, 6.19e-01),
    ("bf16", "fp16", 4.23e-02, 2.50e-03),
    ("bf16", "fp16+int8", 1.08e-01, 4.17e-02),
    ("bf16", "fp16+nf4", 4.61e-01, 6.01e-01),
    ("bf16+int8", "bf16+nf4", 4.87e-01, 6.56e-01),
    ("bf16+int8", "fp16", 1.35e-01, 4.76e-02),
    ("bf16+int8", "fp16+int8", 1.34e-01, 3.45e-02),
    ("bf16+int8", "fp16+nf4", 4.96e-01, 6.37e-01),
    ("bf16+nf4", "fp16", 4.35e-01, 6.19e-01),
    ("bf16+nf4", "fp16+int8", 4.49e-01, 6.13e-01),
    ("bf16+nf4", "fp16+nf4", 5.69e-02, 1.66e-02),
    ("fp16", "fp16+int8", 9.80e-02, 4.94e-02),
    ("fp16", "fp16+nf4", 4.43e-01, 6.01e-01),
    ("fp16+int8", "fp16+nf4", 4.57e-01, 5.94e-01),
):
    _old_rel, _old_cos = HONEST_DISAGREEMENT[frozenset((_a, _b))]
    _measured(_a, _b, max(_old_rel, _rel), max(_old_cos, _cos))

PASS_MARGIN, FAIL_MARGIN = 2.0, 4.0  # pass up to 2x the worst honest disagreement; fail beyond 4x
PASS_FLOOR_L2, FAIL_FLOOR_L2 = 0.01, 0.03  # even bit-identical configurations get this much room (other hardware)
# An unrelated update of the right scale sits at relative L2 about sqrt(2) = 1.41 from the honest one: even the
# loosest pair (honest worst 0.86) fails it, whatever its cosine calibration allows.
PASS_CAP_L2, FAIL_CAP_L2 = 1.0, 1.2
PASS_FLOOR_COS, FAIL_FLOOR_COS = 0.01, 0.03  # 1 - cosine: as the profiles above for the tight pairs
_SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def config_name(config: Config) -> str:
    """'fp32', 'bf16+int8', 'fp16+svd-rank64-plain+nf4', ...; None-safe for unknown dtypes."""
    dtype, compression = config
    short = _SHORT_DTYPES.get(dtype, dtype)
    return short if compression == "none" else f"{short}+{compression}"


def pair_profile(a: Config, b: Config) -> ToleranceProfile | None:
    """The tolerance for comparing a peer declaring `a` with one declaring `b`, or None when the pair has no
    calibration (an unknown dtype or tag, or different SVD factors: a low-rank approximation's error depends on
    the rank and the weights, so it is compared only with peers declaring the same factors, computed the same
    deterministic way from the checkpoint)."""
    key = pair_key(a, b)
    measured = None if key is None else HONEST_DISAGREEMENT.get(frozenset(key[:2]))
    if measured is None:
        return None
    rel, one_minus_cos = measured
    pass_l2 = min(max(PASS_MARGIN * rel, PASS_FLOOR_L2), PASS_CAP_L2)
    fail_l2 = min(max(FAIL_MARGIN * rel, FAIL_FLOOR_L2), FAIL_CAP_L2)
    pass_cos, fail_cos = max(PASS_MARGIN * one_minus_cos, PASS_FLOOR_COS), max(FAIL_MARGIN * one_minus_cos, FAIL_FLOOR_COS)
    name = f"{key[0]}~{key[1]}" + (f"+{key[2]}" if key[2] else "")
    return ToleranceProfile(name[:64], a[0], a[1], None, 1.0 - pass_cos, pass_l2, 1.0 - fail_cos, fail_l2)


def pair_key(a: Config, b: Config) -> tuple[str, str, str] | None:
    """(a's name, b's name, shared SVD tag or "") without SVD in the names, as the calibration tables are keyed;
    None when a pair cannot be compared at all (an unknown dtype or tag, or different SVD factors)."""
    parts = []
    for dtype, compression in (a, b):
        split = split_compression(compression)
        if split is None or dtype not in _SHORT_DTYPES:
            return None
        parts.append((dtype, *split))
    (dtype_a, svd_a, quant_a), (dtype_b, svd_b, quant_b) = parts
    if svd_a != svd_b:
        return None
    return config_name((dtype_a, quant_a)), config_name((dtype_b, quant_b)), svd_a or ""


def route_profile(subject: Config, checkers: list[Config]) -> ToleranceProfile | None:
    """The tolerance for comparing a subject with a chain of checkers: the loosest of its pairs (None if any pair
    has no calibration)."""
    profiles = [pair_profile(subject, c) for c in checkers]
    if not profiles or any(p is None for p in profiles):
        return None
    loosest = max(profiles, key=lambda p: (p.pass_max_rel_l2, p.fail_max_rel_l2))
    return ToleranceProfile(
        loosest.name, loosest.dtype, loosest.quantisation, None,
        min(p.pass_min_cosine for p in profiles), max(p.pass_max_rel_l2 for p in profiles),
        min(p.fail_min_cosine for p in profiles), max(p.fail_max_rel_l2 for p in profiles),
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
