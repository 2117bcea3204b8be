"""Tests of peers.selection: which blocks a joining peer serves, from a snapshot of announcements."""

from __future__ import annotations

import hashlib

import pytest
from hivemind.p2p import PeerID

from peers.selection import block_throughputs, choose_num_blocks, choose_span_start, rebalance_target
from swarm.records import PeerSpan, ServerInfo, ServerState


def span(name: str, start: int, end: int, throughput: float = 1.0, state: ServerState = ServerState.ONLINE) -> PeerSpan:
    peer_id = PeerID(b"\x12\x20" + hashlib.sha256(name.encode()).digest())
    return PeerSpan(peer_id, ServerInfo(state=state, start=start, end=end, throughput=throughput, dtype="float32"))


def test_empty_swarm_starts_at_zero():
    assert choose_span_start([], num_blocks=30, span_length=10) == 0


def test_first_served_window_is_skipped():
    assert choose_span_start([span("a", 0, 10)], num_blocks=30, span_length=10) == 10


def test_ties_go_to_the_lowest_start():
    # every window starting at 10..25 is uncovered
    assert choose_span_start([span("a", 0, 10)], num_blocks=30, span_length=5) == 10
    # every window is equally covered
    assert choose_span_start([span("all", 0, 30, 2.0)], num_blocks=30, span_length=7) == 0


def test_the_only_uncovered_window_is_found():
    spans = [span("a", 0, 10), span("b", 20, 30)]
    assert choose_span_start(spans, num_blocks=30, span_length=10) == 10


def test_offline_peers_are_ignored_and_joining_peers_count():
    assert choose_span_start([span("a", 0, 10, state=ServerState.OFFLINE)], num_blocks=30, span_length=10) == 0
    assert choose_span_start([span("a", 0, 10, state=ServerState.JOINING)], num_blocks=30, span_length=10) == 10


def test_windows_compare_sorted_throughputs_lexicographically():
    # per block: [0.1, 100, 0.2, 0.3]; windows of 2: [0.1, 100], [0.2, 100], [0.2, 0.3].
    # The weakest block decides (start 0), though start 2 has the smallest sum.
    spans = [span("a", 0, 1, 0.1), span("b", 1, 2, 100.0), span("c", 2, 3, 0.2), span("d", 3, 4, 0.3)]
    assert choose_span_start(spans, num_blocks=4, span_length=2) == 0


def test_second_weakest_block_breaks_a_tie_on_the_weakest():
    # per block: [0.1, 5, 0.1, 3]; windows of 2: [0.1, 5], [0.1, 5], [0.1, 3]
    spans = [span("a", 0, 1, 0.1), span("b", 1, 2, 5.0), span("c", 2, 3, 0.1), span("d", 3, 4, 3.0)]
    assert choose_span_start(spans, num_blocks=4, span_length=2) == 2


def test_answer_does_not_depend_on_input_order():
    spans = [span("a", 0, 12, 3.0), span("b", 5, 20, 1.0), span("c", 18, 30, 2.0), span("d", 25, 30, 0.5)]
    assert choose_span_start(spans, 30, 8) == choose_span_start(spans[::-1], 30, 8)


@pytest.mark.parametrize("span_length", [0, -1, 31])
def test_bad_span_length_raises(span_length):
    with pytest.raises(ValueError, match="span length"):
        choose_span_start([], num_blocks=30, span_length=span_length)


def test_whole_model_span_starts_at_zero():
    assert choose_span_start([span("a", 0, 30)], num_blocks=30, span_length=30) == 0


def test_block_throughputs_sums_overlaps_and_clips():
    spans = [
        span("a", 0, 3, 1.0),
        span("b", 2, 5, 2.0),
        span("off", 0, 5, 100.0, state=ServerState.OFFLINE),
        span("j", 4, 9, 0.5, state=ServerState.JOINING),  # beyond the model's end: clipped
    ]
    assert block_throughputs(spans, 5) == [1.0, 1.0, 3.0, 2.0, 2.5]
    assert block_throughputs([], 3) == [0.0, 0.0, 0.0]


def test_choose_num_blocks():
    assert choose_num_blocks(block_bytes=100, cache_bytes_per_block=50, available_bytes=1000, num_blocks=30) == 6
    assert choose_num_blocks(block_bytes=100, cache_bytes_per_block=50, available_bytes=10**9, num_blocks=30) == 30
    assert choose_num_blocks(block_bytes=100, cache_bytes_per_block=50, available_bytes=10, num_blocks=30) == 1
    assert choose_num_blocks(block_bytes=0, cache_bytes_per_block=0, available_bytes=5, num_blocks=30) == 5


# --- rebalancing ---

def peer(name: str) -> PeerID:
    return span(name, 0, 1).peer_id


def _span(name: str, start: int, end: int, throughput: float = 10.0, state: ServerState = ServerState.ONLINE):
    return span(name, start, end, throughput, state)


def test_a_duplicate_peer_moves_to_cover_a_gap():
    spans = [_span("a", 0, 10), _span("b", 0, 10), _span("c", 20, 30)]
    assert rebalance_target(spans, peer("b"), 30) == 10


def test_a_peer_never_moves_if_that_opens_a_gap():
    spans = [_span("a", 0, 10), _span("b", 10, 20), _span("c", 20, 30), _span("d", 20, 30)]
    assert rebalance_target(spans, peer("b"), 30) is None


def test_small_gains_do_not_move_a_peer():
    # Moving c would lift the weakest block from 10 to 12: under the margin, so it stays.
    spans = [_span("a", 0, 10, 10.0), _span("b", 10, 20, 10.0), _span("c", 10, 20, 2.0), _span("d", 0, 10, 2.0)]
    assert rebalance_target(spans, peer("c"), 20) is None


def test_a_large_gain_moves_a_peer():
    spans = [_span("a", 0, 10, 1.0), _span("b", 10, 20, 10.0), _span("c", 10, 20, 10.0)]
    assert rebalance_target(spans, peer("c"), 20) == 0


def test_offline_or_unknown_peers_do_not_move():
    spans = [_span("a", 0, 10), _span("b", 0, 10, state=ServerState.OFFLINE)]
    assert rebalance_target(spans, peer("b"), 20) is None
    assert rebalance_target(spans, peer("zzz"), 20) is None
