"""The client's part in the trust layer, plugged into a RemoteSequence through its hooks: spot checks on
every session's steps, a trust view that keeps blacklisted peers out of routes, and gossip with peers."""

from __future__ import annotations

import asyncio
import logging

from reputation.checks import SpotChecker
from reputation.gossip import GossipAgent
from reputation.node import ReputationConfig, ReputationNode
from swarm.records import ServerState

logger = logging.getLogger(__name__)


class ClientReputation:
    def __init__(self, node: ReputationNode, checker: SpotChecker, sequence, period: float):
        self.node, self.checker, self.sequence = node, checker, sequence
        self.agent = GossipAgent(node, sequence.p2p, self._online_peers, period=period)
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    @classmethod
    def attach(cls, sequence, identity, cfg, loop) -> "ClientReputation":
        """Create the node and checker for `sequence` (a swarm.sequence.RemoteSequence) and start gossiping on `loop`."""
        node = ReputationNode(identity.private_key, ReputationConfig(seeds=tuple(cfg.trusted_peers)))
        checker = SpotChecker(node, sequence, check_rate=cfg.check_rate)
        sequence.trust, sequence.observer = node, checker
        reputation = cls(node, checker, sequence, cfg.gossip_period)
        loop.run(reputation._start())
        return reputation

    def _online_peers(self) -> list:
        spans = [s for s in self.sequence.spans if s.info.state == ServerState.ONLINE]
        self.node.known_peers.update(str(s.peer_id) for s in spans)
        return [s.peer_id for s in spans]

    async def _start(self) -> None:
        self._stop = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._gossip())

    async def _gossip(self) -> None:
        while not self._stop.is_set():
            try:
                await self.sequence.refresh_spans()
                await self.agent.round()
            except Exception as e:  # the DHT or a peer hiccuped; the next round tries again
                logger.debug(f"Gossip round failed: {e}")
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=self.agent.period)
            except asyncio.TimeoutError:
                pass

    async def sync(self) -> int:
        """One gossip round now (tests, `/trust`); returns the messages received."""
        await self.sequence.refresh_spans(force=True)
        return await self.agent.round()

    async def stop(self) -> None:
        self._stop.set()
        await self.checker.cancel()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
