"""EigenTrust aggregation and the blacklist's pure state transitions."""

from __future__ import annotations

import random

import pytest

from reputation.trust import (
    AccuserRecord,
    BlacklistPolicy,
    BlacklistState,
    FaultConfirmed,
    Opinion,
    TrustObserved,
    TrustSummary,
    apply,
    compute_trust,
    is_blacklisted,
)


def _summary(*opinions: tuple[str, str, int, int], accusers: tuple[AccuserRecord, ...] = (), peers=()) -> TrustSummary:
    return TrustSummary(tuple(Opinion(*o) for o in opinions), accusers, tuple(peers))


def test_seeds_only_share_all_trust_and_newcomers_start_at_zero() -> None:
    t = compute_trust(_summary(peers=("new",)), pre_trusted=["s1", "s2"])
    assert t == {"new": 0.0, "s1": 0.5, "s2": 0.5}


def test_checked_peers_gain_trust_and_trust_sums_to_one() -> None:
    t = compute_trust(_summary(("s", "a", 10, 0), ("a", "b", 10, 0), peers=("new",)), pre_trusted=["s"])
    assert t["a"] > t["b"] > 0.0 == t["new"]
    assert sum(t.values()) == pytest.approx(1.0)


def test_failures_cancel_passes_and_negatives_are_clipped() -> None:
    t = compute_trust(_summary(("s", "x", 3, 5), ("s", "y", 5, 0)), pre_trusted=["s"])
    assert t["x"] == 0.0 and t["y"] > 0.0


def test_a_colluding_clique_cannot_capture_the_walk() -> None:
    opinions = [("s", "a", 10, 0), ("a", "s", 10, 0), ("l1", "l2", 1000, 0), ("l2", "l1", 1000, 0)]
    t = compute_trust(_summary(*opinions), pre_trusted=["s"])
    assert t["l1"] == t["l2"] == 0.0


def test_refuted_accusers_lose_outgoing_weight() -> None:
    opinions = (("s", "liar", 10, 0), ("liar", "friend", 10, 0))

    def friend(refuted: int) -> float:
        return compute_trust(_summary(*opinions, accusers=(AccuserRecord("liar", 10, refuted),)), ["s"])["friend"]

    assert friend(0) > friend(5) > friend(10) == 0.0


def test_self_opinions_are_ignored() -> None:
    t = compute_trust(_summary(("s", "a", 1, 0), ("s", "b", 1, 0), ("b", "b", 1000, 0), ("b", "a", 1, 0)), ["s"])
    assert t["a"] > t["b"] > 0.0  # b's only counted opinion is of a


def test_deterministic_regardless_of_input_order() -> None:
    rng = random.Random(0)
    ops = [(f"p{rng.randrange(30)}", f"p{rng.randrange(30)}", rng.randrange(10), rng.randrange(3)) for _ in range(300)]
    first = compute_trust(_summary(*ops), pre_trusted=["p1", "p2"])
    rng.shuffle(ops)
    assert compute_trust(_summary(*ops), pre_trusted=["p2", "p1"]) == first


def test_needs_a_seed() -> None:
    with pytest.raises(ValueError):
        compute_trust(_summary(("a", "b", 1, 0)), pre_trusted=[])


POLICY = BlacklistPolicy(trust_threshold=0.1, min_checks=20, faults_to_ban=1, base_ban_s=100.0)


def test_confirmed_fault_bans_and_ban_doubles_on_repeat() -> None:
    empty = BlacklistState()
    s1 = apply(empty, FaultConfirmed("x", at=0.0), POLICY)
    assert empty.bans == {} and is_blacklisted(s1, "x", 50.0) and not is_blacklisted(s1, "x", 100.0)
    assert apply(s1, FaultConfirmed("x", at=10.0), POLICY) is s1  # already banned: no change
    s2 = apply(s1, FaultConfirmed("x", at=100.0), POLICY)
    assert s2.bans["x"].count == 2 and s2.bans["x"].until == 300.0
    s3 = apply(s2, FaultConfirmed("x", at=300.0), POLICY)
    assert s3.bans["x"].until == 300.0 + 400.0


def test_fault_threshold_counts_faults() -> None:
    policy = BlacklistPolicy(faults_to_ban=2, base_ban_s=10.0)
    s1 = apply(BlacklistState(), FaultConfirmed("x", 0.0), policy)
    assert not is_blacklisted(s1, "x", 1.0) and s1.faults == {"x": 1}
    s2 = apply(s1, FaultConfirmed("x", 1.0), policy)
    assert is_blacklisted(s2, "x", 2.0) and s2.faults == {}


def test_low_trust_bans_only_established_peers() -> None:
    state = BlacklistState()
    assert apply(state, TrustObserved("new", 0.0, checks=5, at=0.0), POLICY) is state
    assert apply(state, TrustObserved("ok", 0.5, checks=50, at=0.0), POLICY) is state
    assert is_blacklisted(apply(state, TrustObserved("low", 0.05, checks=50, at=0.0), POLICY), "low", 1.0)
