"""The client's trust layer (`swarm.hooks.TrustLayer`): a receipt check on every hop's reply, spot checks on
every session's steps, a trust view that keeps blacklisted peers out of routes (refreshed in the background; the
token path reads a snapshot), and gossip with peers. Built from the client's `ClientContext`
by whoever opens the client: `apps` passes it explicitly, the Python API finds it as a plugin."""

from __future__ import annotations

import asyncio
import logging

import torch

from reputation import identity_puzzle
from reputation.training_checks import TrainingChecker
from reputation.checks import SpotChecker
from reputation.gossip import GossipAgent
from reputation.node import ReputationConfig, ReputationNode
from reputation.verify import receipt_problem
from swarm.errors import BadReceiptError
from swarm.hooks import ClientContext, HopStep
from swarm.periodic import BackgroundTasks, run_periodically
from swarm.records import online_spans
from swarm.transport import Reply

logger = logging.getLogger(__name__)

STRICT_MAX_QUEUED = 1_000_000  # a strict client checks every step: none is dropped for want of room


class ClientTrust:
    def __init__(self, context: ClientContext):
        cfg = context.config
        self.context = context
        trust_cfg = ReputationConfig(seeds=tuple(cfg.trusted_peers))
        puzzle = identity_puzzle.solve_in_background(context.identity, trust_cfg.puzzle_bits)
        self.node = ReputationNode(context.identity.private_key, trust_cfg, puzzle_nonce=puzzle)
        strict = {"max_queued": STRICT_MAX_QUEUED, "settle_timeout": None} if cfg.strict else {}  # wait for every check
        self.checker = SpotChecker(self.node, context.transport, context.swarm, check_rate=cfg.check_rate,
                                   head=context.logits, num_blocks=context.num_blocks, local=context.local_blocks,
                                   **strict)
        self.training = TrainingChecker(self.node, context.transport, context.swarm, check_rate=cfg.check_rate,
                                        timeout=cfg.request_timeout)
        self.agent = GossipAgent(self.node, context.p2p, self._online_peers, period=cfg.gossip_period)
        self._stop = asyncio.Event()
        self._tasks = BackgroundTasks()

    @property
    def trust(self) -> ReputationNode:
        return self.node

    @property
    def observer(self) -> SpotChecker:
        return self.checker

    @property
    def verifier(self) -> ClientTrust:
        return self

    def verify(self, sent: HopStep, inputs: torch.Tensor, reply: Reply) -> None:
        """Raise `BadReceiptError` unless the reply's receipt is valid for exactly this step. A peer that
        fails is blacklisted here (no one else can re-check what it sent us, so this verdict is not
        gossiped) and earns nothing in this session."""
        problem = receipt_problem(reply.receipt, sent, inputs, reply.output)
        if problem is None:
            return
        peer = str(sent.peer_id)
        self.checker.stats.bad_receipts += 1
        self.checker.receipt_fault(sent.request.session_id, peer)
        self.node.fault_seen(peer, f"a reply without a valid receipt: {problem}")
        raise BadReceiptError(peer, problem)

    def _online_peers(self) -> list:
        spans = online_spans(self.context.swarm.spans)
        self.node.learn_peers(str(s.peer_id) for s in spans)
        return [s.peer_id for s in spans]

    async def _gossip_round(self) -> None:
        await self.context.swarm.refresh_spans()
        await self.agent.round()

    async def start(self) -> None:
        self._stop = asyncio.Event()
        self._tasks.start(run_periodically(self._gossip_round, self.agent.period, self._stop, name="Gossip round"),
                          name="client-gossip")
        self._tasks.start(self.node.refresh_periodically(self._stop), name="client-trust-refresh")

    async def sync(self) -> int:
        """One gossip round now (tests, `/trust`); returns the messages received."""
        await self.context.swarm.refresh_spans(force=True)
        return await self.agent.round()

    async def stop(self) -> None:
        self._stop.set()
        await self.checker.cancel()
        await self.training.cancel()
        await self._tasks.close()

    def describe(self) -> str:
        stats = self.checker.stats
        rows = [f"  spot checks: {stats.checks} run, {stats.passes} passed, {stats.faults} faults confirmed, "
                f"{stats.inconclusive} inconclusive, {stats.unverifiable} could not run"]
        for row in self.node.standings():
            state = "BLACKLISTED" if row.blacklisted else f"trust {row.trust:.2f}"
            rows.append(f"  {row.peer_id}  {state}  passed {row.passes}  faults {row.fails}")
        return "\n".join(rows)
