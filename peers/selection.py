"""Which blocks a joining peer should serve: pure functions over the swarm's announcements."""

from __future__ import annotations

from typing import Collection

from swarm.records import PeerSpan, ServerState


def block_throughputs(spans: Collection[PeerSpan], num_blocks: int) -> list[float]:
    """Sum of announced throughput per block over peers that are joining or online."""
    totals = [0.0] * num_blocks
    for span in spans:
        if span.info.state == ServerState.OFFLINE:
            continue
        for block in range(max(span.start, 0), min(span.end, num_blocks)):
            totals[block] += span.info.throughput
    return totals


def choose_span_start(spans: Collection[PeerSpan], num_blocks: int, span_length: int) -> int:
    """Start of the window of `span_length` blocks that the swarm covers least.

    Windows are compared by their sorted per-block throughputs, lexicographically: the window whose
    weakest block is weakest wins, then the second weakest, and so on; ties go to the lowest start.
    """
    if not 1 <= span_length <= num_blocks:
        raise ValueError(f"span length {span_length} must be within 1..{num_blocks}")
    totals = block_throughputs(spans, num_blocks)
    windows = range(num_blocks - span_length + 1)
    return min(windows, key=lambda start: (sorted(totals[start : start + span_length]), start))


def choose_num_blocks(block_bytes: int, cache_bytes_per_block: int, available_bytes: int, num_blocks: int) -> int:
    """How many blocks fit in `available_bytes` with room for their KV cache (at least one)."""
    per_block = max(block_bytes + cache_bytes_per_block, 1)
    return max(1, min(num_blocks, available_bytes // per_block))


REBALANCE_MARGIN = 1 / 0.75  # move only if the swarm's weakest block gets this much faster (hysteresis)


def rebalance_target(
    spans: Collection[PeerSpan], peer_id, num_blocks: int, margin: float = REBALANCE_MARGIN
) -> int | None:
    """Where this peer should move its span to, or None to stay.

    Moving is worth it when it leaves fewer blocks uncovered, or, at equal coverage, when it makes the
    weakest block at least `margin` times faster. The margin keeps peers from oscillating.
    """
    mine = next((s for s in spans if s.peer_id == peer_id and s.info.state != ServerState.OFFLINE), None)
    if mine is None:
        return None
    others = [s for s in spans if s.peer_id != peer_id]
    length = mine.end - mine.start
    target = choose_span_start(others, num_blocks, length)
    if target == mine.start:
        return None
    current = block_throughputs(spans, num_blocks)
    moved = block_throughputs(others, num_blocks)
    for block in range(target, target + length):
        moved[block] += mine.info.throughput
    current_gaps, moved_gaps = current.count(0.0), moved.count(0.0)
    if moved_gaps != current_gaps:
        return target if moved_gaps < current_gaps else None
    return target if min(moved) > margin * min(current) else None
