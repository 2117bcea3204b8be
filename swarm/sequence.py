"""The client's live view of who serves which blocks, and route choice over it.

`RemoteSequence` joins three small parts: the spans read from the DHT (cached for `spans_ttl`), the round
trips to peers (`swarm.latency.LatencyProbe`), and the peers kept out of routes (`swarm.cooldowns` for
failing ones, the trust layer's `TrustView` for blacklisted ones). Route choice itself is `swarm.routing`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from hivemind import DHT
from hivemind.p2p import PeerID

from swarm import records, routing
from swarm.config import ClientConfig
from swarm.cooldowns import Cooldowns
from swarm.errors import BadReplyError, MissingBlocksError, format_block_spans
from swarm.hooks import TrustView
from swarm.latency import LatencyProbe
from swarm.records import PeerSpan
from swarm.routing import PeerEvidence, RouteHop
from swarm.transport import Transport

logger = logging.getLogger(__name__)


class SpanSource(Protocol):
    async def read(self) -> list[PeerSpan]:
        """Every peer's current announcement for the model."""


class DhtSpanSource:
    """Announcements read from the DHT (`swarm.records`), off the event loop."""

    def __init__(self, dht: DHT, dht_prefix: str, num_blocks: int):
        self.dht, self.dht_prefix, self.num_blocks = dht, dht_prefix, num_blocks

    async def read(self) -> list[PeerSpan]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, records.read_spans, self.dht, self.dht_prefix, self.num_blocks)


class RemoteSequence:
    """Blocks [0, num_blocks) of one model, as served by the swarm."""

    def __init__(self, source: SpanSource, transport: Transport, model_name: str, num_blocks: int, cfg: ClientConfig):
        self.source, self.cfg = source, cfg
        self.model_name, self.num_blocks = model_name, num_blocks
        self.probe = LatencyProbe(transport, cfg.ping_timeout, cfg.ping_ttl, on_bad_reply=self._on_bad_reply)
        self.cooldowns = Cooldowns()
        self.trust: TrustView | None = None  # set by the client from its trust layer
        self._spans: list[PeerSpan] = []
        self._spans_read_at = float("-inf")
        self.measured_throughput: dict[PeerID, float] = {}  # block-steps/s seen on this client's own steps

    @property
    def spans(self) -> list[PeerSpan]:
        """The announcements last read (see `refresh_spans`)."""
        return self._spans

    def use_trust(self, trust: TrustView) -> None:
        """Never route to peers this view blacklists."""
        self.trust = trust

    def relayed(self, peer_id: PeerID) -> bool:
        """Whether the peer announced that it is reachable only through relays."""
        return bool(self.relays_of(peer_id))

    def relays_of(self, peer_id: PeerID) -> list[PeerID]:
        """The relays the peer announced (`swarm.relays`), in its order; empty: it is dialled directly."""
        for span in self._spans:
            if span.peer_id == peer_id:
                return [relay for relay in map(_peer_id_or_none, span.info.relays) if relay is not None]
        return []

    def ban(self, peer_id: PeerID) -> float:
        """Keep a failing peer out of new routes for a while (longer on each repeat); returns the seconds."""
        self.probe.forget(peer_id)  # measure it afresh once the cooldown ends
        return self.cooldowns.add(peer_id)

    def observe_step(self, peer_id: PeerID, blocks: int, tokens: int, seconds: float) -> None:
        """Learn a peer's real speed from a single-token step it served (its round trip taken off)."""
        if tokens != 1 or blocks <= 0:
            return
        compute = max(seconds - (self.probe.rtt(peer_id) or 0.0), 1e-4)
        measured = blocks / compute
        self.measured_throughput[peer_id] = routing.smooth_latency(self.measured_throughput.get(peer_id), measured, 0.3)

    def evidence(self, peer_id: PeerID) -> PeerEvidence:
        """What routes weigh beyond a peer's announcement (nothing when `cfg.route_on_evidence` is off)."""
        if not self.cfg.route_on_evidence:
            return PeerEvidence()
        trust = None if self.trust is None else self.trust.score(str(peer_id))
        return PeerEvidence(self.measured_throughput.get(peer_id), trust)

    def _on_bad_reply(self, error: BadReplyError) -> None:
        self.ban(next((s.peer_id for s in self._spans if str(s.peer_id) == error.peer), PeerID.from_base58(error.peer)))

    def banned(self) -> frozenset[PeerID]:
        """Peers kept out of routes: failing ones for a while, and those the trust layer avoids (blacklisted ones)."""
        banned = set(self.cooldowns.active())
        if self.trust is not None:
            banned |= {s.peer_id for s in self._spans if self.trust.avoids(str(s.peer_id))}
        return frozenset(banned)

    async def refresh_spans(self, force: bool = False) -> list[PeerSpan]:
        if force or time.monotonic() - self._spans_read_at > self.cfg.spans_ttl:
            self._spans = await self.source.read()
            self._spans_read_at = time.monotonic()
        return self._spans

    async def make_route(
        self, start: int = 0, end: int | None = None, excluded: frozenset = frozenset(), needed_tokens: int = 0,
        training: bool = False,
    ) -> list[RouteHop]:
        """The cheapest route over [start, end); waits up to `missing_blocks_timeout` for missing blocks. With a
        trust layer it prefers hops that can be checked: for `training` passes, by peers of the same configuration."""
        end = self.num_blocks if end is None else end
        deadline = time.monotonic() + self.cfg.missing_blocks_timeout
        force, warned = False, None
        while True:
            spans = routing.usable_spans(await self.refresh_spans(force), excluded | self.banned())
            latencies = await self.probe.ping_all(s.peer_id for s in spans)
            spans = [s for s in spans if s.peer_id not in self.cooldowns]  # a ping may have found junk
            evidence = {s.peer_id: self.evidence(s.peer_id) for s in spans}
            route = routing.find_route(spans, latencies, start, end, needed_tokens=needed_tokens, evidence=evidence,
                                       prefer_checkable=self.trust is not None and self.cfg.route_on_evidence,
                                       same_config=training)
            if route is not None:
                return route
            reachable = [s for s in spans if s.peer_id in latencies]
            missing = routing.missing_blocks(reachable, start, end)
            undialable = [str(s.peer_id) for s in spans if not s.info.reachable and any(s.start <= b < s.end for b in missing)]
            if time.monotonic() >= deadline:
                raise MissingBlocksError(self.model_name, missing, undialable)
            if missing != warned:
                behind_nat = f" ({', '.join(undialable)} cannot be dialled: behind NAT without a relay)" if undialable else ""
                logger.warning(
                    f"Waiting up to {deadline - time.monotonic():.0f} s for a reachable peer serving block(s) "
                    f"{format_block_spans(missing)} of {self.model_name}{behind_nat}"
                )
                warned = missing
            await asyncio.sleep(min(2.0, max(deadline - time.monotonic(), 0)))
            force = True


def _peer_id_or_none(text: str) -> PeerID | None:
    try:
        return PeerID.from_base58(text)
    except Exception:  # an announced relay that is not a peer id: ignore it
        return None
