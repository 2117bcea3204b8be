"""Round trips to peers, measured with `info` calls and smoothed; a peer that answers junk is reported."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from hivemind.p2p import PeerID

from swarm import routing
from swarm.errors import BadReplyError, PeerError
from swarm.transport import Transport

logger = logging.getLogger(__name__)


@dataclass
class PeerLatency:
    rtt: float | None = None  # smoothed round trip, seconds; None: unreachable
    measured_at: float = float("-inf")  # time.monotonic()


class LatencyProbe:
    def __init__(self, transport: Transport, timeout: float, ttl: float,
                 on_bad_reply: Callable[[BadReplyError], None] = lambda error: None):
        self.transport, self.timeout, self.ttl = transport, timeout, ttl
        self.on_bad_reply = on_bad_reply
        self.latencies: dict[PeerID, PeerLatency] = {}

    def forget(self, peer_id: PeerID) -> None:
        self.latencies.pop(peer_id, None)

    def rtt(self, peer_id: PeerID) -> float | None:
        entry = self.latencies.get(peer_id)
        return None if entry is None else entry.rtt

    async def ping(self, peer_id: PeerID) -> float | None:
        """The smoothed round trip to `peer_id`, or None when it cannot be reached or answers junk."""
        entry = self.latencies.setdefault(peer_id, PeerLatency())
        try:
            _, rtt = await self.transport.info(peer_id, timeout=self.timeout)
        except PeerError as e:
            logger.debug(f"Ping failed: {e}")
            entry.rtt, entry.measured_at = None, time.monotonic()
            if isinstance(e, BadReplyError):
                logger.warning(str(e))
                self.on_bad_reply(e)
            return None
        entry.rtt = routing.smooth_latency(entry.rtt, rtt)
        entry.measured_at = time.monotonic()
        return entry.rtt

    async def ping_all(self, peer_ids: Iterable[PeerID], force: bool = False) -> dict[PeerID, float]:
        """Round trips to every peer that answers, pinging those not measured within `ttl` (all if `force`)."""
        peer_ids = list(dict.fromkeys(peer_ids))
        now = time.monotonic()
        stale = [p for p in peer_ids if force or now - self.latencies.get(p, PeerLatency()).measured_at > self.ttl]
        results = await asyncio.gather(*(self.ping(p) for p in stale), return_exceptions=True)
        for peer_id, result in zip(stale, results):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                logger.warning(f"Pinging {peer_id} failed: {result!r}")  # one peer never breaks route finding
        return {p: self.latencies[p].rtt for p in peer_ids if self.rtt(p) is not None}
