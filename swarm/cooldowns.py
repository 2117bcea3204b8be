"""Failing peers kept out of new routes for a while (monotonic time; the trust layer's blacklist is separate)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from hivemind.p2p import PeerID

logger = logging.getLogger(__name__)

FIRST_COOLDOWN = 15.0  # seconds a failing peer is skipped the first time; doubles on each repeat
MAX_COOLDOWN = 600.0


@dataclass(frozen=True)
class Cooldown:
    until: float  # time.monotonic() when the peer may be routed to again
    seconds: float  # this cooldown's length, doubled on the next failure


class Cooldowns:
    def __init__(self, clock=None):
        self.clock = clock or (lambda: time.monotonic())
        self._by_peer: dict[PeerID, Cooldown] = {}

    def add(self, peer_id: PeerID) -> float:
        """Skip a failing peer for a while, longer on each repeat; returns the seconds."""
        previous = self._by_peer.get(peer_id)
        seconds = FIRST_COOLDOWN if previous is None else min(previous.seconds * 2, MAX_COOLDOWN)
        self._by_peer[peer_id] = Cooldown(self.clock() + seconds, seconds)
        logger.info(f"Not routing to {peer_id} for {seconds:.0f} s")
        return seconds

    def active(self) -> frozenset[PeerID]:
        now = self.clock()
        return frozenset(peer_id for peer_id, c in self._by_peer.items() if c.until > now)

    def clear(self) -> None:
        self._by_peer.clear()

    def __contains__(self, peer_id: PeerID) -> bool:
        return peer_id in self.active()
