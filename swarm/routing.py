"""Choosing the chain of peers that covers blocks [start, end): pure functions over a snapshot.

The graph's nodes are block boundaries; an edge "peer p computes blocks i..j" costs
latency(p) + (j - i) / throughput(p), plus RELAY_PENALTY when p is reachable only through a relay.
The cheapest path is the route (DESIGN.md, Routing).
Only boundaries where some peer starts or ends can be useful places to switch peers (the cost of a
switch point between them is linear), so the graph stays small even for 80-block models.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Collection, Mapping

from hivemind.p2p import PeerID

from swarm.records import PeerSpan, online_spans

PING_SMOOTHING = 0.2  # weight of a new ping in the moving average
NO_ROOM_PENALTY = 10.0  # seconds added to a hop whose peer announced too little KV-cache room
# Seconds added to a hop whose peer is reachable only through a relay (it announces its relays). Its measured
# round trip already includes the detour; this makes a direct peer win wherever the two are close (on one LAN a
# relay adds well under a millisecond, below the ping's noise), since a relay is shared, caps each connection's
# bytes and duration, and is one more machine that can fail. A relayed peer still wins by saving more than this.
RELAY_PENALTY = 0.01


@dataclass(frozen=True)
class RouteHop:
    peer_id: PeerID
    start: int
    end: int


def usable_spans(spans: Collection[PeerSpan], excluded: Collection[PeerID] = ()) -> list[PeerSpan]:
    return [s for s in online_spans(spans) if s.peer_id not in excluded]


def missing_blocks(spans: Collection[PeerSpan], start: int, end: int) -> list[int]:
    """Blocks in [start, end) that no online span covers."""
    covered = [False] * (end - start)
    for span in online_spans(spans):
        for block in range(max(span.start, start), min(span.end, end)):
            covered[block - start] = True
    return [start + i for i, ok in enumerate(covered) if not ok]


def hop_cost(span: PeerSpan, start: int, end: int, latency: float, needed_tokens: int = 0) -> float:
    cost = latency + (end - start) / max(span.info.throughput, 1e-9)
    if span.info.relayed:
        cost += RELAY_PENALTY
    if span.info.cache_tokens_left < needed_tokens:
        cost += NO_ROOM_PENALTY  # likely to refuse the session: use it only if nobody else can
    return cost


def find_route(
    spans: Collection[PeerSpan],
    latencies: Mapping[PeerID, float],
    start: int,
    end: int,
    *,
    excluded: Collection[PeerID] = (),
    needed_tokens: int = 0,
) -> list[RouteHop] | None:
    """The cheapest chain of hops covering [start, end), or None if some block is not covered.

    Peers without a measured latency are treated as unreachable; peers that announced less KV-cache
    room than `needed_tokens` are used only when there is no other way. Ties break on peer id, so
    every client computes the same route from the same snapshot.
    """
    candidates = [s for s in usable_spans(spans, excluded) if s.peer_id in latencies]
    candidates.sort(key=lambda s: s.peer_id.to_base58())
    points = sorted({start, end} | {b for s in candidates for b in (s.start, s.end) if start < b < end})

    best: dict[int, float] = {start: 0.0}
    previous: dict[int, tuple[int, RouteHop]] = {}
    queue: list[tuple[float, int]] = [(0.0, start)]
    while queue:
        cost, here = heapq.heappop(queue)
        if here == end:
            break
        if cost > best.get(here, float("inf")):
            continue
        for span in candidates:
            if not span.start <= here < span.end:
                continue
            for there in points:
                if here < there <= min(span.end, end):
                    new_cost = cost + hop_cost(span, here, there, latencies[span.peer_id], needed_tokens)
                    if new_cost < best.get(there, float("inf")) - 1e-12:
                        best[there] = new_cost
                        previous[there] = (here, RouteHop(span.peer_id, here, there))
                        heapq.heappush(queue, (new_cost, there))
    if end not in previous and start != end:
        return None
    route: list[RouteHop] = []
    here = end
    while here != start:
        here, hop = previous[here]
        route.append(hop)
    return route[::-1]


def route_cost(route: list[RouteHop], spans: Collection[PeerSpan], latencies: Mapping[PeerID, float]) -> float:
    by_peer = {s.peer_id: s for s in spans}
    return sum(hop_cost(by_peer[h.peer_id], h.start, h.end, latencies[h.peer_id]) for h in route)


def smooth_latency(previous: float | None, measured: float, weight: float = PING_SMOOTHING) -> float:
    """Exponential moving average of round-trip times (seconds)."""
    return measured if previous is None else (1 - weight) * previous + weight * measured
