"""The effect check: did a hop's output change the token the answer takes next?

A numeric tolerance bounds how far a step's update strays, not what the straying does to the answer: a small
perturbation aimed through the LM head, from one token's row towards another's, turns "Paris" into "London"
with a relative L2 of 0.066 on the default model (benchmarks/steering.py). Float32 and float16 pairs fail that
(above 0.03), but it passes, or leaves inconclusive, every pair with bf16 or quantised weights on one side
(TRUST.md: a numeric tolerance alone does not decide what a step did to the answer). When a
checked hop ends at the model's last block, its output goes straight into the client's final norm and LM head,
so the client can look at the effect itself: both the subject's output and the checker's go through its head,
and the step fails when their top-1 tokens differ where the checker's top-1 leads its runner-up by a clear
margin. Honest peers disagree on the top-1 token only where that lead is small; how small, per pair of declared
configurations, is measured on the real model (benchmarks/steering.py, benchmarks/results/steering.txt).

Pure functions over logits; the spot checker (reputation.checks) runs the head.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from reputation.tolerance import Config, pair_key

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Effect:
    """What a subject's output does to the answer, next to a reference execution's."""

    verdict: str  # "fail": a clear top-1 token changed (or the subject's logits are not finite); else "pass"
    margin: float  # the lead (in logits) from which the reference's top-1 counts as clear
    positions: int  # positions compared
    clear: int  # of them, those where the reference's top-1 leads by more than `margin`
    changed: int  # of those, the ones where the subject's top-1 is another token
    reference_token: int = -1  # at the first changed position: the reference's top-1 ...
    subject_token: int = -1  # ... the subject's ...
    lead: float = 0.0  # ... and the reference's lead there, in logits


def top_two(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 token, its lead over the runner-up) per position of logits (..., vocab), flattened."""
    flat = logits.detach().float().reshape(-1, logits.shape[-1])  # (positions, vocab)
    best = flat.topk(2, dim=-1)
    return best.indices[:, 0], best.values[:, 0] - best.values[:, 1]


def effect_verdict(subject_logits: torch.Tensor, reference_logits: torch.Tensor, margin: float) -> Effect:
    """Compare the top-1 tokens of two executions' logits (..., vocab), position by position. The step fails
    when, at a position where the reference's top-1 leads by more than `margin`, the subject's top-1 differs,
    or when the subject's logits there are not finite (an honest head never produces them)."""
    if subject_logits.shape != reference_logits.shape:
        raise ValueError(f"shape mismatch: {subject_logits.shape} vs {reference_logits.shape}")
    reference, lead = top_two(reference_logits)
    flat_subject = subject_logits.detach().float().reshape(-1, subject_logits.shape[-1])  # (positions, vocab)
    subject = flat_subject.argmax(dim=-1)
    clear = torch.isfinite(lead) & (lead > margin)  # a non-finite reference (a broken checker) decides nothing
    broken = ~torch.isfinite(flat_subject).all(dim=-1)
    changed = clear & ((subject != reference) | broken)
    found = changed.nonzero()
    if not len(found):
        return Effect("pass", margin, int(lead.numel()), int(clear.sum()), 0)
    first = int(found[0, 0])
    return Effect("fail", margin, int(lead.numel()), int(clear.sum()), int(changed.sum()),
                  int(reference[first]), int(subject[first]), float(lead[first]))


# The largest lead (in logits) of the reference's top-1 at a position where an honest peer of the other
# configuration took another token, per pair of configurations without SVD, over both directions of the pair.
# Measured on CPU with the default model by `benchmarks/steering.py --all` (blocks 0:30, 4 passages of real text
# and 10 chat answers, 1222 positions per pair; benchmarks/results/steering.txt, README "Steering"). Pairs with
# nf4 on one side only change top-1 tokens at leads up to 2.6, so their margins (5.3) leave most steers to the
# numeric tolerance. A pair missing here has no effect check (its numeric tolerance still applies).
HONEST_LEAD_AT_CHANGE: dict[frozenset[str], float] = {}


def _measured(a: str, b: str, lead: float) -> None:
    HONEST_LEAD_AT_CHANGE[frozenset((a, b))] = lead


for _a, _b, _lead in (
    ("fp32", "fp32", 0.000),
    ("fp32", "fp32+int8", 1.323),
    ("fp32", "fp32+nf4", 2.632),
    ("fp32", "bf16", 0.062),
    ("fp32", "bf16+int8", 1.055),
    ("fp32", "bf16+nf4", 2.632),
    ("fp32", "fp16", 0.007),
    ("fp32", "fp16+int8", 0.925),
    ("fp32", "fp16+nf4", 2.632),
    ("fp32+int8", "fp32+int8", 0.505),
    ("fp32+int8", "fp32+nf4", 2.505),
    ("fp32+int8", "bf16", 1.380),
    ("fp32+int8", "bf16+int8", 1.591),
    ("fp32+int8", "bf16+nf4", 2.505),
    ("fp32+int8", "fp16", 1.330),
    ("fp32+int8", "fp16+int8", 0.758),
    ("fp32+int8", "fp16+nf4", 2.505),
    ("fp32+nf4", "fp32+nf4", 0.009),
    ("fp32+nf4", "bf16", 2.633),
    ("fp32+nf4", "bf16+int8", 2.173),
    ("fp32+nf4", "bf16+nf4", 0.519),
    ("fp32+nf4", "fp16", 2.644),
    ("fp32+nf4", "fp16+int8", 2.185),
    ("fp32+nf4", "fp16+nf4", 0.223),
    ("bf16", "bf16", 0.028),
    ("bf16", "bf16+int8", 1.055),
    ("bf16", "bf16+nf4", 2.633),
    ("bf16", "fp16", 0.062),
    ("bf16", "fp16+int8", 0.964),
    ("bf16", "fp16+nf4", 2.633),
    ("bf16+int8", "bf16+int8", 0.431),
    ("bf16+int8", "bf16+nf4", 2.156),
    ("bf16+int8", "fp16", 1.055),
    ("bf16+int8", "fp16+int8", 1.591),
    ("bf16+int8", "fp16+nf4", 2.149),
    ("bf16+nf4", "bf16+nf4", 0.012),
    ("bf16+nf4", "fp16", 2.644),
    ("bf16+nf4", "fp16+int8", 2.315),
    ("bf16+nf4", "fp16+nf4", 0.519),
    ("fp16", "fp16", 0.000),
    ("fp16", "fp16+int8", 0.920),
    ("fp16", "fp16+nf4", 2.644),
    ("fp16+int8", "fp16+int8", 0.519),
    ("fp16+int8", "fp16+nf4", 2.185),
    ("fp16+nf4", "fp16+nf4", 0.014),
):
    _measured(_a, _b, _lead)

EFFECT_FACTOR = 2.0  # a clear lead is more than twice the largest honest one at a change of top-1 ...
EFFECT_FLOOR = 0.5  # ... and at least this many logits, so identical configurations on other hardware pass


def pair_margin(a: Config, b: Config) -> float | None:
    """The lead from which a top-1 token counts as clear when a peer declaring `a` is compared with one declaring
    `b` (None: no effect check for this pair: uncalibrated, or different SVD factors)."""
    key = pair_key(a, b)
    measured = None if key is None else HONEST_LEAD_AT_CHANGE.get(frozenset(key[:2]))
    return None if measured is None else max(EFFECT_FACTOR * measured, EFFECT_FLOOR)


def routes_margin(a: list[Config], b: list[Config]) -> float | None:
    """The margin between two chains of configurations: the loosest of their pairs (None if any is None)."""
    margins = [pair_margin(x, y) for x in a for y in b]
    if not margins or any(m is None for m in margins):
        return None
    return max(margins)
