"""Choosing the chain of peers that covers blocks [start, end): pure functions over a snapshot.

The graph's nodes are block boundaries; an edge "peer p computes blocks i..j" costs
latency(p) + (j - i) / throughput(p), plus RELAY_PENALTY when p is reachable only through a relay. The cheapest path is the route (DESIGN.md, Routing). Throughput is
what the client measured on p's own steps once it has that (a peer measured far below its claim is demoted),
and compute at peers without trust costs a little more (`PeerEvidence`). With a trust layer, a hop that no other
peer could re-run in a spot check (nobody else serves those blocks in a comparable configuration, such as the same
SVD factors) is used only when no checkable route exists.
Only boundaries where some peer starts or ends can be useful places to switch peers (the cost of a
switch point between them is linear), so the graph stays small even for 80-block models.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Collection, Mapping

from hivemind.p2p import PeerID

from swarm.records import PeerSpan, online_spans
from swarm.tags import comparable

PING_SMOOTHING = 0.2  # weight of a new ping in the moving average
NO_ROOM_PENALTY = 10.0  # seconds added to a hop whose peer announced too little KV-cache room
OVERCLAIM_RATIO = 3.0  # a peer measured this much slower than it announced is demoted...
OVERCLAIM_DEMOTION = 2.0  # ...to this fraction of its measured speed
UNCHECKABLE_PENALTY = 10.0  # seconds added to a hop that no other peer's blocks cover: it cannot be spot-checked
TRUST_WEIGHT = 0.5  # compute of a peer without trust costs up to 1 + this; trusted peers (>= average) cost 1


@dataclass(frozen=True)
class PeerEvidence:
    """What this client knows of a peer beyond its announcement."""

    throughput: float | None = None  # block-steps per second measured on its own steps (None: not yet)
    trust: float | None = None  # relative trust (1.0 = average), None without a trust layer
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


def checkable(spans: Collection[PeerSpan], subject: PeerSpan, start: int, end: int, same_config: bool = False) -> bool:
    """Whether other online peers whose compression can be compared with the subject's (`tags.comparable`) cover
    blocks [start, end), chained if need be, so that a spot check can re-run a hop the subject serves there.
    `same_config`: only peers of the subject's dtype and compression count (training passes are compared within
    one configuration: `reputation.training_checks`)."""
    def comparable_with_subject(s: PeerSpan) -> bool:
        if same_config:
            return (s.info.dtype, s.info.compression) == (subject.info.dtype, subject.info.compression)
        return comparable(s.info.compression, subject.info.compression)

    others = [s for s in spans if s.peer_id != subject.peer_id and comparable_with_subject(s)]
    return start >= end or not missing_blocks(others, start, end)


def effective_throughput(announced: float, measured: float | None) -> float:
    """The speed a route should assume: what was measured once known, and less for a peer caught overclaiming."""
    if measured is None:
        return announced
    if measured * OVERCLAIM_RATIO < announced:
        return measured / OVERCLAIM_DEMOTION
    return measured


def trust_factor(trust: float | None) -> float:
    """Multiplier on a hop's compute time: 1 for peers trusted at least as the average, up to 1 + TRUST_WEIGHT."""
    return 1.0 if trust is None else 1.0 + TRUST_WEIGHT * (1.0 - min(max(trust, 0.0), 1.0))


def hop_cost(span: PeerSpan, start: int, end: int, latency: float, needed_tokens: int = 0,
             evidence: PeerEvidence | None = None) -> float:
    evidence = evidence or PeerEvidence()
    throughput = effective_throughput(span.info.throughput, evidence.throughput)
    cost = latency + (end - start) / max(throughput, 1e-9) * trust_factor(evidence.trust)
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
    evidence: Mapping[PeerID, PeerEvidence] | None = None,
    prefer_checkable: bool = False,
    same_config: bool = False,
) -> list[RouteHop] | None:
    """The cheapest chain of hops covering [start, end), or None if some block is not covered.

    Peers without a measured latency are treated as unreachable; peers that announced less KV-cache
    room than `needed_tokens` are used only when there is no other way; with `prefer_checkable`, so are hops
    that no other peer could re-run (`checkable`; with `same_config`, no other peer of the same configuration, as
    training checks need). Ties break on peer id, so every client computes the same
    route from the same snapshot.
    """
    online = usable_spans(spans)
    checkable_hops: dict[tuple[PeerID, int, int], bool] = {}
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
                    new_cost = cost + hop_cost(span, here, there, latencies[span.peer_id], needed_tokens,
                                               (evidence or {}).get(span.peer_id))
                    if prefer_checkable:
                        key = (span.peer_id, here, there)
                        if key not in checkable_hops:
                            checkable_hops[key] = checkable(online, span, here, there, same_config)
                        new_cost += 0.0 if checkable_hops[key] else UNCHECKABLE_PENALTY
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
    """Exponential moving average (of round trips, or of measured speeds)."""
    return measured if previous is None else (1 - weight) * previous + weight * measured
