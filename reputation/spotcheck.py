"""Spot-check policy: how often to check, whom to ask, when a failure becomes a fault (issue 4, part 2).

Pure functions only; running the re-execution is the client's job. Arithmetic from TRUST.md: a cheater that
corrupts a fraction q of its responses, checked at rate p, survives N responses with probability (1-pq)^N.
Newcomers and low-trust peers are checked at a higher rate, established trusted peers at the base rate, which
keeps overhead low while catching new cheaters fast.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Hashable, Sequence
from typing import TypeVar

logger = logging.getLogger(__name__)

Peer = TypeVar("Peer", bound=Hashable)  # a peer id string live, an int index in the simulator


def check_probability(
    trust: float,
    checks_so_far: int,
    base: float = 0.05,
    newcomer: float = 0.3,
    newcomer_checks: int = 10,
    trusted_level: float = 0.5,
) -> float:
    """Probability of spot-checking one response of a peer.

    trust is relative (trust score times the number of active peers, so 1.0 is an average peer). A peer with
    fewer than newcomer_checks completed checks is a newcomer and checked at `newcomer`; afterwards the rate
    falls linearly from `newcomer` (trust 0) to `base` (trust >= trusted_level).
    """
    if checks_so_far < newcomer_checks:
        return newcomer
    standing = min(max(trust / trusted_level, 0.0), 1.0) if trusted_level > 0 else 1.0
    return (1.0 - standing) * newcomer + standing * base  # exact at both ends


def choose_checker(
    candidates: Sequence[Peer], subject: Peer, rng: random.Random, exclude: Sequence[Peer] = ()
) -> Peer | None:
    """A uniformly random candidate that is neither the subject nor excluded; None if there is none.

    Called after the response arrived, so the subject cannot tell checked requests from normal ones.
    Rejection sampling first (candidates are usually many), then an exact fallback.
    """
    banned = {subject, *exclude}
    for _ in range(8):
        if not candidates:
            return None
        pick = candidates[rng.randrange(len(candidates))]
        if pick not in banned:
            return pick
    rest = [c for c in candidates if c not in banned]
    return rest[rng.randrange(len(rest))] if rest else None


def referee_decision(verdicts: Sequence[str], quorum: int | None = None) -> bool:
    """True when the referees confirm a fault: at least `quorum` "fail" verdicts (default: a strict majority).

    "inconclusive" counts as not-fail: a fault needs positive evidence. With three referees and the default
    quorum this is 2-of-3; TRUST.md: a per-check false-positive rate e becomes about 3e^2.
    """
    if not verdicts:
        return False
    needed = len(verdicts) // 2 + 1 if quorum is None else quorum
    return sum(v == "fail" for v in verdicts) >= needed


def weighted_referee_decision(
    votes: Sequence[str], weights: Sequence[float], margin: float = 2.0, min_weight: float = 0.5
) -> str:
    """A verdict on an accused peer from votes weighed by trust, not by head count: "fail", "pass" or
    "inconclusive".

    votes[i] is voter i's verdict on the accused ("fail": its own execution contradicts the accused, "pass": it
    agrees with the accused, anything else: neither); weights[i] is this node's trust in voter i (relative trust,
    1.0 = an average peer; a newcomer's is near 0). "fail" needs the weight of "fail" votes to reach `min_weight`
    and to exceed `margin` times the weight of "pass" votes; "pass" likewise the other way round. So any number of
    untrusted identities weigh about nothing, and a split between trusted voters blames nobody.
    """
    if len(votes) != len(weights):
        raise ValueError(f"{len(votes)} votes but {len(weights)} weights")
    against = sum(max(w, 0.0) for v, w in zip(votes, weights) if v == "fail")
    for_ = sum(max(w, 0.0) for v, w in zip(votes, weights) if v == "pass")
    if against >= min_weight and against > margin * for_:
        return "fail"
    if for_ >= min_weight and for_ > margin * against:
        return "pass"
    return "inconclusive"


def detection_probability(p: float, q: float, n: int) -> float:
    """Chance that a cheater corrupting a fraction q of responses is checked on a corrupt one within n responses."""
    return 1.0 - (1.0 - p * q) ** n


def responses_to_detect(p: float, q: float, confidence: float = 0.99) -> int:
    """Smallest n with detection_probability(p, q, n) >= confidence."""
    if p * q >= 1.0:
        return 1
    return math.ceil(math.log(1.0 - confidence) / math.log(1.0 - p * q))


def should_referee(accusations: int, refuted: int, min_accusations: int = 3, max_refuted_fraction: float = 0.5) -> bool:
    """Whether an accuser's new "fail" verdict is worth referee executions.

    An accuser whose past accusations referees mostly refuted loses its voice (TRUST.md): its "fail" verdicts
    are still recorded, but no longer cost anyone re-executions. Everyone gets min_accusations heard first.
    """
    if accusations < min_accusations:
        return True
    return refuted / accusations <= max_refuted_fraction
