"""Speculative decoding's steps through a session with spot checks on: several tokens a step, then a rollback
of the rejected ones. Every output must be computed over the kept tokens only, every check must re-run a step
over exactly the history the peer had (an honest peer must pass every check, even after a partial accept and
a fail-over), and each hop is countersigned for exactly the tokens it was sent, rejected drafts included.

Peers are in-process fakes that sign real receipts (tests/unit/fake_swarm.py); the session, the spot checker,
the reputation node and receipts are the real ones.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import torch
from hivemind.utils.crypto import RSAPrivateKey

from fake_swarm import HIDDEN, FakePeer, FakeSwarm, run_blocks
from reputation.attest import Countersigned
from reputation.checks import SpotChecker
from reputation.node import ReputationNode
from swarm.config import ClientConfig
from swarm.sequence import RemoteSequence
from swarm.session import InferenceSession

CFG = ClientConfig(initial_peers=(), missing_blocks_timeout=0.0, request_timeout=5.0)
PROMPT = torch.randn(1, 5, HIDDEN, generator=torch.Generator().manual_seed(0))
ROUNDS = [(4, 1), (3, 3), (5, 0), (2, 1), (6, 2), (0, 0), (3, 2)]  # (tokens drafted, of them accepted)


class View:
    def __init__(self, swarm: FakeSwarm):
        self.swarm = swarm
        self.spans = asyncio.run(swarm.read())

    async def refresh_spans(self, force: bool = False):
        self.spans = await self.swarm.read()
        return self.spans

    def banned(self):
        return frozenset()


async def speculate(session: InferenceSession) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The prompt's round, then one round per ROUNDS entry: the pending input and the drafts in one step, then a
    rollback to the accepted ones; (output, expected output over the kept inputs) for every step."""
    generator = torch.Generator().manual_seed(1)
    kept = PROMPT[:, :0]  # inputs the session keeps
    pending = PROMPT  # not sent yet
    results = []
    for drafted, accepted in [(0, 0)] + ROUNDS:
        fed = torch.cat([pending, torch.randn(1, drafted, HIDDEN, generator=generator)], dim=1)
        assert session.position == kept.shape[1]
        output = (await session.step(fed)).hidden
        results.append((output, run_blocks(0, 6, torch.cat([kept, fed], dim=1))[:, -fed.shape[1]:]))
        kept = torch.cat([kept, fed[:, : fed.shape[1] - drafted + accepted]], dim=1)
        if accepted < drafted:
            session.rollback(kept.shape[1])
        pending = output[:, -1:]  # stands for the model's next token
    await session.settle()
    return results


def run(swarm: FakeSwarm) -> tuple[list, SpotChecker, ReputationNode, str]:
    node = ReputationNode(RSAPrivateKey())
    checker = SpotChecker(node, swarm, View(swarm), rng=random.Random(0), check_rate=1.0)
    session = InferenceSession(RemoteSequence(swarm, swarm, "fake", 6, CFG), swarm, 64, observer=checker)

    async def scenario():
        results = await speculate(session)
        await checker.drain()
        coverage = checker.coverage(session.session_id)
        await session.close()
        return results, coverage

    results, coverage = asyncio.run(scenario())
    return results, checker, node, coverage


def test_outputs_use_only_the_kept_tokens_and_every_check_passes():
    swarm = FakeSwarm(*(FakePeer(name, start, end, sign=True, throughput=throughput) for name, start, end, throughput in
                        [("a", 0, 3, 100.0), ("b", 3, 6, 100.0), ("a2", 0, 3, 1.0), ("b2", 3, 6, 1.0)]))
    results, checker, node, coverage = run(swarm)
    for output, expected in results:
        torch.testing.assert_close(output, expected, rtol=0, atol=1e-6)
    hop_steps = 2 * (1 + len(ROUNDS))
    assert (coverage.steps, coverage.verified, coverage.failed) == (hop_steps, hop_steps, 0)
    assert checker.stats.faults == 0 and checker.stats.checker_faults == 0
    assert node.blacklisted() == frozenset()


def test_a_fail_over_after_a_partial_accept_replays_the_kept_inputs_only():
    swarm = FakeSwarm(*(FakePeer(name, start, end, sign=True, throughput=throughput, fail_after=fail) for
                        name, start, end, throughput, fail in
                        [("a", 0, 3, 100.0, None), ("b", 3, 6, 100.0, 4), ("a2", 0, 3, 1.0, None),
                         ("b2", 3, 6, 10.0, None), ("b3", 3, 6, 1.0, None)]))
    results, checker, node, coverage = run(swarm)
    for output, expected in results:
        torch.testing.assert_close(output, expected, rtol=0, atol=1e-6)
    replays = [call for call in swarm.calls if call[:3] == ("step", "b2", 0)]
    kept_before_the_failure = 5 + sum(1 + accepted for _, accepted in ROUNDS[:3])  # b died at round 4
    sent_before_the_failure = 5 + sum(1 + drafted for drafted, _ in ROUNDS[:3])
    assert [call[3] for call in replays] == [kept_before_the_failure] != [sent_before_the_failure]
    assert coverage.failed == 0 and checker.stats.faults == 0
    assert node.blacklisted() == frozenset()


def test_each_hop_is_countersigned_for_every_token_it_was_sent_rejected_drafts_included():
    swarm = FakeSwarm(*(FakePeer(name, start, end, sign=True, throughput=throughput) for name, start, end, throughput in
                        [("a", 0, 3, 100.0), ("b", 3, 6, 100.0), ("a2", 0, 3, 1.0), ("b2", 3, 6, 1.0)]))
    _, _, node, _ = run(swarm)
    sent = Counter()
    for call, name, _position, new in swarm.calls:
        if call == "step":
            sent[name] += new
    work = [Countersigned.decode(data) for kind, data in node.messages() if kind == "work"]
    names = {str(p.peer_id): p.name for p in swarm.peers.values()}
    assert {names[str(c.receipt.signer)] for c in work} == {"a", "b"}
    assert all(c.tokens == c.receipt.tokens == sent[names[str(c.receipt.signer)]] == 5 + sum(1 + d for d, _ in ROUNDS)
               for c in work)
