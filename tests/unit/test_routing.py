"""Tests of swarm.routing: route choice over frozen snapshots of the swarm, no network."""

from __future__ import annotations

import hashlib
import itertools

import pytest
from hivemind.p2p import PeerID

from swarm.records import PeerSpan, ServerInfo, ServerState
from swarm.routing import (
    PING_SMOOTHING,
    RELAY_PENALTY,
    RouteHop,
    checkable,
    find_route,
    missing_blocks,
    route_cost,
    smooth_latency,
    usable_spans,
    hop_cost,
)


def peer(name: str) -> PeerID:
    """A valid peer id: a sha256 multihash (0x12 0x20 + digest), as libp2p makes from a public key."""
    return PeerID(b"\x12\x20" + hashlib.sha256(name.encode()).digest())


def span(
    name: str, start: int, end: int, throughput: float = 1.0, state: ServerState = ServerState.ONLINE,
    relays: tuple[str, ...] = (),
) -> PeerSpan:
    info = ServerInfo(state=state, start=start, end=end, throughput=throughput, dtype="float32", relays=list(relays))
    return PeerSpan(peer(name), info)


def hops(route: list[RouteHop] | None) -> list[tuple[PeerID, int, int]] | None:
    return None if route is None else [(h.peer_id, h.start, h.end) for h in route]


def latencies_of(spans: list[PeerSpan], latency: float = 0.01) -> dict[PeerID, float]:
    return {s.peer_id: latency for s in spans}


def test_chain_is_found_in_order():
    spans = [span("c", 20, 30), span("a", 0, 10), span("b", 10, 20)]
    route = find_route(spans, latencies_of(spans), 0, 30)
    assert hops(route) == [(peer("a"), 0, 10), (peer("b"), 10, 20), (peer("c"), 20, 30)]


def test_single_peer_beats_three_hops_when_latency_dominates():
    # one hop: 1.0 + 30/1000; three hops: 3 * 1.0 + 30/1000
    spans = [span("a", 0, 10, 1000.0), span("b", 10, 20, 1000.0), span("c", 20, 30, 1000.0), span("all", 0, 30, 1000.0)]
    route = find_route(spans, latencies_of(spans, latency=1.0), 0, 30)
    assert hops(route) == [(peer("all"), 0, 30)]


def test_three_fast_peers_beat_one_slow_peer_when_compute_dominates():
    # one hop: 0.01 + 30/1; three hops: 3 * 0.01 + 30/100
    spans = [span("a", 0, 10, 100.0), span("b", 10, 20, 100.0), span("c", 20, 30, 100.0), span("all", 0, 30, 1.0)]
    route = find_route(spans, latencies_of(spans), 0, 30)
    assert hops(route) == [(peer("a"), 0, 10), (peer("b"), 10, 20), (peer("c"), 20, 30)]


@pytest.mark.parametrize(
    "first_throughput, second_throughput, switch",
    [
        (10.0, 1.0, 20),  # the first peer is faster: keep it as long as it can go (0:20), then 20:30
        (1.0, 10.0, 10),  # the second peer is faster: leave the first as soon as the second can take over
    ],
)
def test_overlapping_spans_switch_at_the_right_boundary(first_throughput, second_throughput, switch):
    spans = [span("first", 0, 20, first_throughput), span("second", 10, 30, second_throughput)]
    latencies = latencies_of(spans)
    route = find_route(spans, latencies, 0, 30)
    assert hops(route) == [(peer("first"), 0, switch), (peer("second"), switch, 30)]
    expected = 2 * 0.01 + switch / first_throughput + (30 - switch) / second_throughput
    assert route_cost(route, spans, latencies) == pytest.approx(expected)


@pytest.mark.parametrize("state", [ServerState.OFFLINE, ServerState.JOINING])
def test_spans_not_online_are_ignored(state):
    # the not-online peer would be by far the cheapest route
    spans = [span("a", 0, 10), span("b", 10, 20), span("fast", 0, 20, 1e6, state=state)]
    route = find_route(spans, latencies_of(spans), 0, 20)
    assert hops(route) == [(peer("a"), 0, 10), (peer("b"), 10, 20)]
    assert find_route([span("only", 0, 20, state=state)], {peer("only"): 0.01}, 0, 20) is None


def test_excluded_peers_are_ignored():
    spans = [span("a", 0, 10), span("b", 10, 20), span("fast", 0, 20, 1e6)]
    latencies = latencies_of(spans)
    assert hops(find_route(spans, latencies, 0, 20)) == [(peer("fast"), 0, 20)]
    route = find_route(spans, latencies, 0, 20, excluded={peer("fast")})
    assert hops(route) == [(peer("a"), 0, 10), (peer("b"), 10, 20)]
    assert find_route(spans, latencies, 0, 20, excluded={peer("fast"), peer("b")}) is None


def test_peers_without_a_latency_are_ignored():
    spans = [span("a", 0, 10), span("b", 10, 20), span("fast", 0, 20, 1e6)]
    latencies = {peer("a"): 0.01, peer("b"): 0.01}  # "fast" was never pinged
    assert hops(find_route(spans, latencies, 0, 20)) == [(peer("a"), 0, 10), (peer("b"), 10, 20)]
    assert find_route(spans, {peer("a"): 0.01}, 0, 20) is None


def test_gap_gives_none_and_missing_blocks_lists_exactly_the_gap():
    spans = [span("a", 0, 10), span("b", 15, 30)]
    assert find_route(spans, latencies_of(spans), 0, 30) is None
    assert missing_blocks(spans, 0, 30) == [10, 11, 12, 13, 14]


def test_missing_blocks_counts_only_online_spans_and_clips_to_the_range():
    spans = [span("a", 0, 10), span("off", 10, 20, state=ServerState.OFFLINE), span("j", 20, 25, state=ServerState.JOINING)]
    assert missing_blocks(spans, 0, 30) == list(range(10, 30))
    assert missing_blocks(spans, 5, 12) == [10, 11]
    assert missing_blocks(spans, 2, 8) == []
    assert missing_blocks([], 3, 6) == [3, 4, 5]


def test_tie_break_is_deterministic_regardless_of_input_order():
    names = ["p1", "p2", "p3", "p4"]
    spans = [span(name, 0, 30) for name in names] + [span("x", 0, 15), span("y", 15, 30)]
    latencies = latencies_of(spans)
    answers = {tuple(hops(find_route(list(order), latencies, 0, 30))) for order in itertools.permutations(spans)}
    assert len(answers) == 1
    lowest = min((peer(name) for name in names), key=lambda p: p.to_base58())
    assert answers == {((lowest, 0, 30),)}


def test_tie_between_switch_points_is_deterministic():
    # equal peers overlapping on 10:20: switching at 10 or at 20 costs the same
    spans = [span("first", 0, 20), span("second", 10, 30), span("third", 10, 30)]
    latencies = latencies_of(spans)
    answers = {tuple(hops(find_route(list(order), latencies, 0, 30))) for order in itertools.permutations(spans)}
    assert len(answers) == 1


def test_sub_range_start_and_end():
    spans = [span("a", 0, 10), span("b", 10, 20), span("c", 20, 30)]
    latencies = latencies_of(spans)
    assert hops(find_route(spans, latencies, 5, 25)) == [(peer("a"), 5, 10), (peer("b"), 10, 20), (peer("c"), 20, 25)]
    assert hops(find_route(spans, latencies, 12, 18)) == [(peer("b"), 12, 18)]
    assert hops(find_route(spans, latencies, 10, 20)) == [(peer("b"), 10, 20)]
    assert find_route(spans, latencies, 7, 7) == []


def test_usable_spans_keeps_online_not_excluded_in_order():
    spans = [span("a", 0, 10), span("off", 0, 10, state=ServerState.OFFLINE), span("j", 0, 10, state=ServerState.JOINING), span("b", 10, 20), span("c", 20, 30)]
    assert [s.peer_id for s in usable_spans(spans, excluded={peer("b")})] == [peer("a"), peer("c")]


def test_hop_cost_is_latency_plus_blocks_over_throughput():
    assert hop_cost(span("a", 0, 10, throughput=4.0), 2, 10, latency=0.5) == pytest.approx(0.5 + 8 / 4.0)
    assert hop_cost(span("zero", 0, 10, throughput=0.0), 0, 1, latency=0.0) > 1e6  # no division by zero


def test_smooth_latency():
    assert smooth_latency(None, 0.3) == 0.3
    assert smooth_latency(1.0, 0.0) == pytest.approx(1 - PING_SMOOTHING)
    assert smooth_latency(1.0, 2.0, weight=0.5) == pytest.approx(1.5)
    value = None
    for _ in range(100):  # converges to a steady measurement
        value = smooth_latency(value if value is not None else 5.0, 0.1)
    assert value == pytest.approx(0.1, abs=1e-6)


def test_a_peer_measured_far_below_its_claim_is_demoted():
    from swarm.routing import OVERCLAIM_DEMOTION, PeerEvidence, effective_throughput

    boaster, honest = span("boaster", 0, 30, throughput=1000.0), span("honest", 0, 30, throughput=100.0)
    latencies = latencies_of([boaster, honest])
    assert hops(find_route([boaster, honest], latencies, 0, 30))[0][0] == boaster.peer_id  # believed at first
    measured = {boaster.peer_id: PeerEvidence(throughput=90.0), honest.peer_id: PeerEvidence(throughput=100.0)}
    assert hops(find_route([boaster, honest], latencies, 0, 30, evidence=measured))[0][0] == honest.peer_id
    assert effective_throughput(1000.0, 90.0) == 90.0 / OVERCLAIM_DEMOTION  # caught overclaiming
    assert effective_throughput(100.0, 90.0) == 90.0  # within reason: just what was measured
    assert effective_throughput(100.0, None) == 100.0


def test_trust_weighs_in_between_equally_fast_peers():
    from swarm.routing import PeerEvidence, trust_factor

    stranger, trusted = span("stranger", 0, 30, throughput=100.0), span("trusted", 0, 30, throughput=100.0)
    latencies = latencies_of([stranger, trusted])
    evidence = {stranger.peer_id: PeerEvidence(trust=0.0), trusted.peer_id: PeerEvidence(trust=1.2)}
    assert hops(find_route([stranger, trusted], latencies, 0, 30, evidence=evidence))[0][0] == trusted.peer_id
    assert trust_factor(None) == trust_factor(1.0) == trust_factor(3.0) == 1.0 < trust_factor(0.5) < trust_factor(0.0)
    # trust is a tie-breaker, not a veto: a much faster stranger still wins
    fast = span("fast-stranger", 0, 30, throughput=1000.0)
    evidence[fast.peer_id] = PeerEvidence(throughput=1000.0, trust=0.0)
    assert hops(find_route([fast, trusted], latencies_of([fast, trusted]), 0, 30, evidence=evidence))[0][0] == fast.peer_id


def test_a_hop_is_checkable_when_other_comparable_peers_chained_cover_its_blocks():
    unique = span("unique", 0, 15)
    spans = [unique, span("a", 0, 10), span("b", 10, 20), span("c", 20, 30)]
    by_name = dict(zip("uabc", spans))
    assert checkable(spans, unique, 0, 15)  # a then b re-run it
    assert not checkable(spans, by_name["c"], 20, 30)  # nobody else serves 20:30
    assert checkable(spans, by_name["a"], 0, 10) and not checkable(spans, by_name["b"], 10, 20)  # 15:20 is b's alone
    svd = PeerSpan(peer("svd"), ServerInfo(state=ServerState.ONLINE, start=0, end=10, throughput=1.0, dtype="float32",
                                           compression="svd-rank64-plain+nf4"))
    assert not checkable([*spans, svd], svd, 0, 10)  # nobody else declares its factors
    assert checkable([*spans, svd], by_name["a"], 0, 10)  # a plain peer is checked by plain ones (unique, here)


def test_with_a_trust_layer_routes_prefer_hops_that_can_be_checked():
    # "fast" boasts, but nobody else declares its SVD factors; a and b serve 0:10 and 10:20 twice over
    fast = PeerSpan(peer("fast"), ServerInfo(state=ServerState.ONLINE, start=0, end=20, throughput=1000.0,
                                             dtype="float32", compression="svd-rank64-plain"))
    spans = [fast, span("a", 0, 10, 10.0), span("a2", 0, 10, 10.0), span("b", 10, 20, 10.0), span("b2", 10, 20, 10.0)]
    latencies = latencies_of(spans)
    assert hops(find_route(spans, latencies, 0, 20)) == [(peer("fast"), 0, 20)]  # the fastest, if checks don't matter
    route = find_route(spans, latencies, 0, 20, prefer_checkable=True)
    assert peer("fast") not in [h.peer_id for h in route] and len(route) == 2  # two checkable hops instead
    # where nothing checkable exists, the penalty falls on every route alike, so the cheapest still wins
    lone = [span("x", 0, 10, 10.0), span("y", 10, 20, 100.0)]
    assert hops(find_route(lone, latencies_of(lone), 0, 20, prefer_checkable=True)) == [(peer("x"), 0, 10), (peer("y"), 10, 20)]


# --- relayed peers ---


def test_a_direct_peer_wins_over_a_relayed_one_that_measured_a_little_faster():
    # on one machine a relay's detour is below the ping's noise: the relayed peer may even measure faster
    spans = [span("direct", 10, 20, throughput=100.0), span("home", 10, 20, throughput=100.0, relays=("QmRelay",)),
             span("a", 0, 10, throughput=100.0)]
    latencies = {peer("direct"): 0.0009, peer("home"): 0.0006, peer("a"): 0.001}
    assert hops(find_route(spans, latencies, 0, 20)) == [(peer("a"), 0, 10), (peer("direct"), 10, 20)]


def test_a_relayed_hop_costs_its_round_trip_plus_the_penalty():
    relayed = span("home", 0, 10, throughput=4.0, relays=("QmRelay",))
    assert hop_cost(relayed, 2, 10, latency=0.5) == pytest.approx(0.5 + 8 / 4.0 + RELAY_PENALTY)


def test_a_relayed_peer_serves_when_nobody_else_does():
    spans = [span("a", 0, 10), span("home", 10, 20, relays=("QmRelay",))]
    assert hops(find_route(spans, latencies_of(spans), 0, 20)) == [(peer("a"), 0, 10), (peer("home"), 10, 20)]


def test_a_much_faster_relayed_peer_still_wins():
    # 10 blocks: 1 s at 10 block-steps/s against 0.01 s at 1000, far more than the relay's penalty
    spans = [span("slow", 0, 10, throughput=10.0), span("home", 0, 10, throughput=1000.0, relays=("QmRelay",))]
    assert hops(find_route(spans, latencies_of(spans, 0.002), 0, 10)) == [(peer("home"), 0, 10)]


def test_training_routes_prefer_hops_a_peer_of_the_same_configuration_can_re_run():
    # a fast bfloat16 peer is checkable for inference (float32 peers re-run it under a cross-dtype tolerance), but
    # training passes are compared within one configuration only, and nobody else serves bfloat16
    fast = PeerSpan(peer("bf16"), ServerInfo(state=ServerState.ONLINE, start=0, end=10, throughput=1000.0,
                                             dtype="bfloat16"))
    spans = [fast, span("a", 0, 10, 10.0), span("a2", 0, 10, 10.0)]
    assert checkable(spans, fast, 0, 10) and not checkable(spans, fast, 0, 10, same_config=True)
    assert checkable(spans, spans[1], 0, 10, same_config=True)
    latencies = latencies_of(spans)
    assert hops(find_route(spans, latencies, 0, 10, prefer_checkable=True)) == [(peer("bf16"), 0, 10)]
    training = find_route(spans, latencies, 0, 10, prefer_checkable=True, same_config=True)
    assert peer("bf16") not in [h.peer_id for h in training]
