"""The client's live view of who serves which blocks: DHT reads, latency probes, route choice."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from hivemind import DHT
from hivemind.p2p import P2P, PeerID

from swarm import records, routing
from swarm.config import ClientConfig
from swarm.errors import MissingBlocksError, SwarmConnectionError, format_block_spans
from swarm.records import PeerSpan
from swarm.remote import call_info
from swarm.routing import RouteHop

logger = logging.getLogger(__name__)


BAN_SECONDS = 15.0  # first ban of a failing peer; doubles on each repeat
MAX_BAN_SECONDS = 600.0


@dataclass
class Ban:
    until: float  # time.monotonic() when the ban ends
    seconds: float  # its length, doubled on the next failure


class TrustView(Protocol):
    """What routing needs from the trust layer (reputation.node.ReputationNode is one)."""

    def is_blacklisted(self, peer_id: str) -> bool: ...


@dataclass
class PeerLatency:
    rtt: float | None = None  # smoothed round trip, seconds; None: unreachable
    measured_at: float = 0.0


class RemoteSequence:
    """Blocks [0, num_blocks) of one model, as served by the swarm."""

    def __init__(self, dht: DHT, p2p: P2P, dht_prefix: str, model_name: str, num_blocks: int, cfg: ClientConfig):
        self.dht, self.p2p, self.cfg = dht, p2p, cfg
        self.dht_prefix, self.model_name, self.num_blocks = dht_prefix, model_name, num_blocks
        self.spans: list[PeerSpan] = []
        self._spans_read_at = 0.0
        self.latencies: dict[PeerID, PeerLatency] = {}
        self.bans: dict[PeerID, Ban] = {}
        self.trust: TrustView | None = None  # blacklisted peers are never routed to
        self.observer = None  # a swarm.session.StepObserver that sees every step (the spot checker)

    def ban(self, peer_id: PeerID) -> float:
        """Keep a failing peer out of new routes for a while, longer on each repeat; returns the seconds."""
        previous = self.bans.get(peer_id)
        seconds = BAN_SECONDS if previous is None else min(previous.seconds * 2, MAX_BAN_SECONDS)
        self.bans[peer_id] = Ban(time.monotonic() + seconds, seconds)
        self.latencies.pop(peer_id, None)  # measure it afresh once the ban ends
        logger.info(f"Not routing to {peer_id} for {seconds:.0f} s")
        return seconds

    def banned(self) -> frozenset[PeerID]:
        """Peers kept out of routes: failing ones for a while, and blacklisted ones."""
        now = time.monotonic()
        banned = {peer_id for peer_id, ban in self.bans.items() if ban.until > now}
        if self.trust is not None:
            banned |= {s.peer_id for s in self.spans if self.trust.is_blacklisted(str(s.peer_id))}
        return frozenset(banned)

    async def refresh_spans(self, force: bool = False) -> list[PeerSpan]:
        if force or time.monotonic() - self._spans_read_at > self.cfg.spans_ttl:
            loop = asyncio.get_running_loop()
            self.spans = await loop.run_in_executor(
                None, records.read_spans, self.dht, self.dht_prefix, self.num_blocks
            )
            self._spans_read_at = time.monotonic()
        return self.spans

    async def ping(self, peer_id: PeerID) -> float | None:
        entry = self.latencies.setdefault(peer_id, PeerLatency())
        try:
            _, rtt = await call_info(self.p2p, peer_id, timeout=self.cfg.ping_timeout)
        except SwarmConnectionError as e:
            logger.debug(f"Ping failed: {e}")
            entry.rtt, entry.measured_at = None, time.monotonic()
            return None
        entry.rtt = routing.smooth_latency(entry.rtt, rtt)
        entry.measured_at = time.monotonic()
        return entry.rtt

    async def ping_all(self, spans: list[PeerSpan], force: bool = False) -> dict[PeerID, float]:
        now = time.monotonic()
        stale = [s.peer_id for s in spans if force or now - self.latencies.get(s.peer_id, PeerLatency()).measured_at > self.cfg.ping_ttl]
        await asyncio.gather(*(self.ping(peer_id) for peer_id in stale))
        return {s.peer_id: self.latencies[s.peer_id].rtt for s in spans if self.latencies.get(s.peer_id) and self.latencies[s.peer_id].rtt is not None}

    async def make_route(
        self, start: int = 0, end: int | None = None, excluded: frozenset = frozenset(), needed_tokens: int = 0
    ) -> list[RouteHop]:
        """The cheapest route over [start, end); waits up to `missing_blocks_timeout` for missing blocks."""
        end = self.num_blocks if end is None else end
        deadline = time.monotonic() + self.cfg.missing_blocks_timeout
        force, warned = False, None
        while True:
            spans = routing.usable_spans(await self.refresh_spans(force), excluded | self.banned())
            latencies = await self.ping_all(spans)
            route = routing.find_route(spans, latencies, start, end, needed_tokens=needed_tokens)
            if route is not None:
                return route
            reachable = [s for s in spans if s.peer_id in latencies]
            missing = routing.missing_blocks(reachable, start, end)
            if time.monotonic() >= deadline:
                raise MissingBlocksError(self.model_name, missing)
            if missing != warned:
                logger.warning(
                    f"Waiting up to {deadline - time.monotonic():.0f} s for a peer serving block(s) "
                    f"{format_block_spans(missing)} of {self.model_name}"
                )
                warned = missing
            await asyncio.sleep(min(2.0, max(deadline - time.monotonic(), 0)))
            force = True
