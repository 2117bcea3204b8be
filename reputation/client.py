"""The client's trust layer (`swarm.hooks.TrustLayer`): spot checks on every session's steps, a trust view
that keeps blacklisted peers out of routes, and gossip with peers. Built from the client's `ClientContext`
by whoever opens the client: `apps` passes it explicitly, the Python API finds it as a plugin."""

from __future__ import annotations

import asyncio
import logging

from reputation.checks import SpotChecker
from reputation.gossip import GossipAgent
from reputation.node import ReputationConfig, ReputationNode
from swarm.hooks import ClientContext
from swarm.periodic import BackgroundTasks, run_periodically
from swarm.records import online_spans

logger = logging.getLogger(__name__)


class ClientTrust:
    def __init__(self, context: ClientContext):
        cfg = context.config
        self.context = context
        self.node = ReputationNode(context.identity.private_key, ReputationConfig(seeds=tuple(cfg.trusted_peers)))
        self.checker = SpotChecker(self.node, context.transport, context.swarm, check_rate=cfg.check_rate)
        self.agent = GossipAgent(self.node, context.p2p, self._online_peers, period=cfg.gossip_period)
        self._stop = asyncio.Event()
        self._tasks = BackgroundTasks()

    @property
    def trust(self) -> ReputationNode:
        return self.node

    @property
    def observer(self) -> SpotChecker:
        return self.checker

    def _online_peers(self) -> list:
        spans = online_spans(self.context.swarm.spans)
        self.node.known_peers.update(str(s.peer_id) for s in spans)
        return [s.peer_id for s in spans]

    async def _gossip_round(self) -> None:
        await self.context.swarm.refresh_spans()
        await self.agent.round()

    async def start(self) -> None:
        self._stop = asyncio.Event()
        self._tasks.start(run_periodically(self._gossip_round, self.agent.period, self._stop, name="Gossip round"),
                          name="client-gossip")

    async def sync(self) -> int:
        """One gossip round now (tests, `/trust`); returns the messages received."""
        await self.context.swarm.refresh_spans(force=True)
        return await self.agent.round()

    async def stop(self) -> None:
        self._stop.set()
        await self.checker.cancel()
        await self._tasks.close()

    def describe(self) -> str:
        stats = self.checker.stats
        rows = [f"  spot checks: {stats.checks} run, {stats.passes} passed, {stats.faults} faults confirmed, "
                f"{stats.inconclusive} inconclusive, {stats.skipped} skipped"]
        for row in self.node.standings():
            state = "BLACKLISTED" if row.blacklisted else f"trust {row.trust:.2f}"
            rows.append(f"  {row.peer_id}  {state}  passed {row.passes}  faults {row.fails}")
        return "\n".join(rows)
