"""The spot checker's decisions over a fake transport: checker choice, referees, and who is blamed.

Peers are in-process fakes that sign real receipts (tests/unit/fake_swarm.py); the checker, the reputation
node, receipts and attestations are the real ones.
"""

from __future__ import annotations

import asyncio
import random

import torch
from hivemind.utils.crypto import RSAPrivateKey

from fake_swarm import HIDDEN, FakePeer, FakeSwarm
from reputation.checks import SpotChecker
from reputation.node import ReputationNode
from swarm.hooks import StepRecord


def lie(output: torch.Tensor) -> torch.Tensor:
    return output + torch.randn_like(output)


class View:
    """A SwarmView over the fake swarm."""

    def __init__(self, swarm: FakeSwarm):
        self.swarm = swarm
        self.spans = []

    async def refresh_spans(self, force: bool = False):
        self.spans = await self.swarm.read()
        return self.spans

    def banned(self):
        return frozenset()


def checker_for(swarm: FakeSwarm) -> tuple[SpotChecker, ReputationNode]:
    node = ReputationNode(RSAPrivateKey())
    return SpotChecker(node, swarm, View(swarm), rng=random.Random(0), check_rate=1.0), node


def served_step(swarm: FakeSwarm, subject: FakePeer, tokens: int = 4) -> StepRecord:
    """A stateless step the subject served (as a session's first step), with its receipt."""
    inputs = torch.randn(1, tokens, HIDDEN, generator=torch.Generator().manual_seed(1))
    reply = asyncio.run(swarm.forward(subject.peer_id, subject.start, subject.end, inputs))
    return StepRecord("s", subject.peer_id, subject.start, subject.end, 0, inputs, reply.output, (inputs,),
                      False, reply.receipt)


def test_an_honest_subject_passes_and_so_does_its_checker():
    swarm = FakeSwarm(FakePeer("subject", 0, 3, sign=True), FakePeer("checker", 0, 3, sign=True))
    checker, node = checker_for(swarm)
    assert asyncio.run(checker.check(served_step(swarm, swarm.by_name("subject")))) == "pass"
    assert checker.stats.passes == 1 and checker.stats.faults == 0
    assert not node.is_blacklisted(str(swarm.by_name("subject").peer_id))


def test_a_lying_subject_is_convicted_by_the_referees_majority():
    swarm = FakeSwarm(*(FakePeer(n, 0, 3, sign=True) for n in ("checker", "ref1", "ref2")),
                      FakePeer("liar", 0, 3, sign=True, corrupt=lie))
    checker, node = checker_for(swarm)
    liar = swarm.by_name("liar")
    assert asyncio.run(checker.check(served_step(swarm, liar))) == "fail"
    assert checker.stats.faults == 1 and checker.stats.checker_faults == 0
    assert node.is_blacklisted(str(liar.peer_id))
    assert sum(p.forwards for p in swarm.peers.values() if p.name != "liar") == 3  # checker + two referees


def test_a_lying_checker_is_the_one_blamed_when_the_referees_side_with_the_subject():
    swarm = FakeSwarm(FakePeer("subject", 0, 3, sign=True), FakePeer("ref1", 0, 3, sign=True),
                      FakePeer("ref2", 0, 3, sign=True))
    checker, node = checker_for(swarm)
    subject = swarm.by_name("subject")
    record = served_step(swarm, subject)
    for peer in swarm.peers.values():  # whoever is picked to check lies; the referees after it do not
        peer.corrupt = None
    first_checker = {"done": False}
    real_forward = swarm.forward

    async def forward(peer_id, start, end, hidden, timeout=60.0):
        if not first_checker["done"]:
            first_checker["done"] = True
            swarm.peers[peer_id].corrupt = lie
            first_checker["peer"] = peer_id
        return await real_forward(peer_id, start, end, hidden, timeout)

    swarm.forward = forward
    assert asyncio.run(checker.check(record)) == "pass"
    assert checker.stats.checker_faults == 1
    assert node.is_blacklisted(str(first_checker["peer"]))
    assert not node.is_blacklisted(str(subject.peer_id))


def test_a_disagreement_without_referees_is_inconclusive_and_blames_nobody():
    swarm = FakeSwarm(FakePeer("liar", 0, 3, sign=True, corrupt=lie), FakePeer("checker", 0, 3, sign=True))
    checker, node = checker_for(swarm)
    assert asyncio.run(checker.check(served_step(swarm, swarm.by_name("liar")))) == "inconclusive"
    assert node.blacklisted() == frozenset()


def test_a_step_with_no_second_peer_is_skipped():
    swarm = FakeSwarm(FakePeer("alone", 0, 3, sign=True))
    checker, _ = checker_for(swarm)
    assert asyncio.run(checker.check(served_step(swarm, swarm.by_name("alone")))) == "skipped"
    assert checker.stats.skipped == 1


def test_a_step_whose_receipt_does_not_match_its_tensors_is_counted_as_a_bad_receipt():
    swarm = FakeSwarm(FakePeer("subject", 0, 3, sign=True), FakePeer("checker", 0, 3, sign=True))
    checker, _ = checker_for(swarm)
    record = served_step(swarm, swarm.by_name("subject"))
    tampered = StepRecord(record.session_id, record.peer_id, record.start, record.end, record.position,
                          record.inputs, record.output + 1.0, record.history, record.padded, record.receipt)
    asyncio.run(checker.check(tampered))
    assert checker.stats.bad_receipts == 1
