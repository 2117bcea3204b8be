"""The peer's part in the trust layer: it signs receipts, keeps a reputation node, and relays gossip."""

from __future__ import annotations

import asyncio
import logging

from hivemind.p2p import P2P

from peers.adversary import Adversary, collude_loop
from peers.config import PeerConfig
from peers.handler import BlockHandler
from peers.receipts import ReceiptSigner
from reputation.gossip import GossipAgent, GossipService
from reputation.node import ReputationConfig, ReputationNode
from swarm import records
from swarm.network import Identity
from swarm.records import ServerState

logger = logging.getLogger(__name__)


class PeerReputation:
    """Owns the peer's ReputationNode, its gossip service and loop, and (for tests) its adversary behaviour."""

    def __init__(self, cfg: PeerConfig, identity: Identity, dht, dht_prefix: str, num_blocks: int):
        self.cfg, self.dht = cfg, dht
        self.dht_prefix, self.num_blocks = dht_prefix, num_blocks
        self.node = ReputationNode(identity.private_key, ReputationConfig(seeds=cfg.trusted_peers))
        self.service = GossipService(self.node)
        self.adversary: Adversary | None = cfg.adversary()
        self._tasks: list[asyncio.Task] = []
        self._peers: list = []

    def equip(self, handler: BlockHandler, compression: str) -> None:
        """Make the handler sign receipts (and misbehave, if this peer is an adversary)."""
        handler.receipts = ReceiptSigner(
            self.node.private_key, self.node.peer_id, self.dht_prefix,
            str(handler.config.dtype).removeprefix("torch."), compression,
        )
        handler.adversary = self.adversary

    async def _read_spans(self) -> list:
        loop = asyncio.get_running_loop()
        spans = await loop.run_in_executor(None, records.read_spans, self.dht, self.dht_prefix, self.num_blocks)
        spans = [s for s in spans if s.info.state == ServerState.ONLINE]
        self._peers = [s.peer_id for s in spans]
        self.node.known_peers.update(str(s.peer_id) for s in spans)
        return spans

    async def _refresh_peers(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._read_spans()
            except Exception as e:  # a DHT hiccup; the next round tries again
                logger.debug(f"Reading spans for gossip failed: {e}")
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.cfg.gossip_period)
            except asyncio.TimeoutError:
                pass

    async def start(self, p2p: P2P, hidden_size: int, stop: asyncio.Event) -> None:
        await self.service.add_p2p_handlers(p2p)
        agent = GossipAgent(self.node, p2p, lambda: self._peers, period=self.cfg.gossip_period)
        self._tasks = [asyncio.create_task(self._refresh_peers(stop)), asyncio.create_task(agent.run(stop))]
        if self.adversary is not None and self.adversary.mode == "collude":
            self._tasks.append(asyncio.create_task(collude_loop(
                self.node, p2p, self._read_spans, self.adversary.fellows, hidden_size, self.cfg.gossip_period, stop
            )))

    async def stop(self, p2p: P2P) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.service.remove_p2p_handlers(p2p)
