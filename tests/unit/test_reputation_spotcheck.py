"""Spot-check policy: rates, checker choice, referee majority, detection arithmetic."""

from __future__ import annotations

import random

import pytest

from reputation.spotcheck import (
    check_probability,
    choose_checker,
    detection_probability,
    referee_decision,
    responses_to_detect,
    should_referee,
)


def test_newcomers_and_low_trust_are_checked_more() -> None:
    assert check_probability(trust=5.0, checks_so_far=0) == 0.3
    assert check_probability(trust=5.0, checks_so_far=50) == 0.05
    assert check_probability(trust=0.0, checks_so_far=50) == 0.3
    low, mid = check_probability(0.1, 50), check_probability(0.4, 50)
    assert 0.3 > low > mid > 0.05


def test_checker_is_never_the_subject_nor_excluded() -> None:
    rng = random.Random(0)
    picks = {choose_checker(["a", "b", "c"], "a", rng, exclude=("b",)) for _ in range(200)}
    assert picks == {"c"}
    assert choose_checker(["a"], "a", rng) is None
    assert choose_checker([], "a", rng) is None
    spread = {choose_checker(list("abcdef"), "a", rng) for _ in range(500)}
    assert spread == set("bcdef")


def test_referee_majority() -> None:
    assert referee_decision(["fail", "fail", "pass"])
    assert not referee_decision(["fail", "pass", "pass"])
    assert not referee_decision(["fail", "inconclusive", "pass"])
    assert not referee_decision([])
    assert referee_decision(["fail", "fail"]) and not referee_decision(["fail", "pass"])
    assert not referee_decision(["fail", "fail", "pass"], quorum=3)


def test_detection_arithmetic_matches_trust_md() -> None:
    assert detection_probability(0.05, 1.0, 90) >= 0.99 > detection_probability(0.05, 1.0, 89)
    assert responses_to_detect(0.05, 1.0) == 90
    assert responses_to_detect(0.05, 0.1) == 919
    assert responses_to_detect(0.10, 0.1) == 459  # TRUST.md rounds 458.2 to 458; 458 gives 98.997%
    assert detection_probability(0.05, 0.1, 0) == 0.0
    assert detection_probability(0.0, 1.0, 10**6) == 0.0


def test_refuted_accusers_lose_their_voice() -> None:
    assert should_referee(accusations=0, refuted=0)
    assert should_referee(accusations=2, refuted=2)  # everyone is heard a few times
    assert not should_referee(accusations=10, refuted=9)
    assert should_referee(accusations=10, refuted=1)


def test_rate_is_a_probability() -> None:
    for trust in (-1.0, 0.0, 0.3, 1.0, 100.0):
        assert 0.0 <= check_probability(trust, 100) <= 1.0
    assert check_probability(0.0, 100, trusted_level=0.0) == pytest.approx(0.05)


def test_weighted_referee_decision_weighs_trust_not_heads():
    from reputation.spotcheck import weighted_referee_decision as decide

    assert decide(["fail", "fail"], [1.0, 0.8]) == "fail"
    assert decide(["pass", "pass"], [1.0, 0.8]) == "pass"
    # any number of untrusted identities weigh nothing, either way
    assert decide(["fail"] * 50, [0.001] * 50) == "inconclusive"
    assert decide(["fail"] * 50 + ["pass"], [0.0] * 50 + [1.0]) == "pass"
    # trusted voters split: nobody is blamed; a clear majority of trust decides
    assert decide(["fail", "pass"], [1.0, 0.9]) == "inconclusive"
    assert decide(["fail", "pass"], [2.1, 1.0]) == "fail"
    assert decide(["fail", "inconclusive", "inconclusive"], [0.6, 5.0, 5.0]) == "fail"
    assert decide([], []) == "inconclusive"
    assert decide(["fail"], [-3.0]) == "inconclusive"  # negative weights count as none
    with pytest.raises(ValueError):
        decide(["fail"], [])
