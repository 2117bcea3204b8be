"""The peer's part in the trust layer: it signs receipts, keeps a reputation node (its trust view refreshed in
the background, its identity puzzle solved once and kept beside its identity file), and relays gossip."""

from __future__ import annotations

import asyncio
import logging

from hivemind.p2p import P2P

from peers.config import PeerConfig
from peers.handler import BlockHandler
from peers.receipts import ReceiptSigner
from reputation import identity_puzzle
from reputation.gossip import GossipAgent, GossipService
from reputation.node import ReputationConfig, ReputationNode
from swarm import records
from swarm.network import Identity
from swarm.periodic import BackgroundTasks, run_periodically
from swarm.records import PeerSpan

logger = logging.getLogger(__name__)


class PeerReputation:
    """Owns the peer's ReputationNode, its gossip service, and the loops that keep gossip going."""

    def __init__(self, cfg: PeerConfig, identity: Identity, dht, dht_prefix: str, num_blocks: int):
        self.cfg, self.dht = cfg, dht
        self.dht_prefix, self.num_blocks = dht_prefix, num_blocks
        trust_cfg = ReputationConfig(seeds=cfg.trusted_peers)
        puzzle = identity_puzzle.solve_in_background(identity, trust_cfg.puzzle_bits)
        self.node = ReputationNode(identity.private_key, trust_cfg, puzzle_nonce=puzzle)
        self.service = GossipService(self.node)
        self._tasks = BackgroundTasks()
        self._peers: list = []

    @property
    def period(self) -> float:
        """Seconds between gossip rounds (and between refreshes of the peers gossiped with)."""
        return self.cfg.gossip_period

    def equip(self, handler: BlockHandler, compression: str) -> None:
        """Make the handler sign a receipt for every reply."""
        handler.receipts = ReceiptSigner(
            self.node.private_key, self.node.peer_id, self.dht_prefix,
            str(handler.config.dtype).removeprefix("torch."), compression,
        )

    async def read_spans(self) -> list[PeerSpan]:
        """The ONLINE peers' spans from the DHT; also remembers them as the peers to gossip with."""
        loop = asyncio.get_running_loop()
        spans = await loop.run_in_executor(None, records.read_spans, self.dht, self.dht_prefix, self.num_blocks)
        spans = records.online_spans(spans)
        self._peers = [s.peer_id for s in spans]
        self.node.learn_peers(str(s.peer_id) for s in spans)
        return spans

    async def start(self, p2p: P2P, stop: asyncio.Event) -> None:
        await self.service.add_p2p_handlers(p2p)
        agent = GossipAgent(self.node, p2p, lambda: self._peers, period=self.period)
        self._tasks.start(run_periodically(self.read_spans, self.period, stop, name="reading spans for gossip"),
                          name="gossip peers")
        self._tasks.start(agent.run(stop), name="gossip")
        self._tasks.start(self.node.refresh_periodically(stop), name="trust refresh")

    async def stop(self, p2p: P2P) -> None:
        await self._tasks.close()
        await self.service.remove_p2p_handlers(p2p)
