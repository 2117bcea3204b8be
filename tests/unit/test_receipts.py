"""Receipts on the token path and verification coverage, over a fake transport.

Sessions get the real trust layer (`reputation.client.ClientTrust`: its receipt verifier, spot checker and
reputation node) over in-process fake peers that sign real receipts (tests/unit/fake_swarm.py), some of
which cheat on them.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey

from fake_swarm import HIDDEN, RECEIPT_MODES, FakePeer, FakeSwarm, run_blocks
from reputation.attest import Countersigned
from reputation.checks import SpotChecker
from reputation.client import ClientTrust
from reputation.node import ReputationNode
from reputation.verify import receipt_problem
from swarm.client import GenerationReport
from swarm.config import ClientConfig
from swarm.errors import BadReceiptError
from swarm.hooks import ClientContext, Coverage, HopStep, StepRecord
from swarm.network import Identity
from swarm.protocol import StepRequest
from swarm.sequence import RemoteSequence
from swarm.session import InferenceSession

CFG = ClientConfig(initial_peers=(), missing_blocks_timeout=0.0, request_timeout=5.0, check_rate=0.0)
PROMPT = torch.randn(1, 5, HIDDEN, generator=torch.Generator().manual_seed(0))
CHEATS = tuple(mode for mode in RECEIPT_MODES if mode != "honest")


def swarm_of(spans: dict[str, tuple[int, int]], **overrides) -> FakeSwarm:
    """Signing fake peers; the first peer of each span advertises more throughput, so routes pick it."""
    peers = []
    for name, (start, end) in spans.items():
        options = {"throughput": 1000.0 if not name.endswith("2") else 10.0, **overrides.get(name, {})}
        peers.append(FakePeer(name, start, end, sign=True, **options))
    return FakeSwarm(*peers)


def three_hops(**overrides) -> FakeSwarm:
    return swarm_of({"a": (0, 2), "b": (2, 4), "c": (4, 6), "b2": (2, 4)}, **overrides)


def redundant(**overrides) -> FakeSwarm:
    return swarm_of({"a": (0, 3), "b": (3, 6), "a2": (0, 3), "b2": (3, 6)}, **overrides)


class Client:
    """A session over the fake swarm with the real client trust layer plugged in as the client does."""

    def __init__(self, swarm: FakeSwarm, check_rate: float = 0.0, max_length: int = 64):
        cfg = ClientConfig(**{**CFG.__dict__, "check_rate": check_rate})
        self.sequence = RemoteSequence(swarm, swarm, "fake", 6, cfg)
        identity = Identity(Path("/nonexistent"), RSAPrivateKey(), temporary=True)
        self.trust = ClientTrust(ClientContext(swarm, self.sequence, identity, None, None, cfg))
        self.trust.checker.rng = random.Random(0)
        self.sequence.use_trust(self.trust.trust)
        self.session = InferenceSession(self.sequence, swarm, max_length, self.trust.observer, self.trust.verifier)

    @property
    def node(self) -> ReputationNode:
        return self.trust.node

    def countersigned(self) -> set[str]:
        """Signers of the receipts this client countersigned."""
        return {Countersigned.decode(data).receipt.signer for kind, data in self.node.messages() if kind == "work"}


async def generate(session: InferenceSession, prompt: torch.Tensor, steps: int, before_step=None):
    outputs, untrusted = [], []
    hidden = prompt
    for index in range(steps + 1):
        if before_step is not None:
            before_step(index)
        result = await session.step(hidden)
        outputs.append(result.hidden)
        untrusted.append(result.untrusted_from)
        hidden = result.hidden[:, -1:]
    return outputs, untrusted


def reference(prompt: torch.Tensor, steps: int) -> list[torch.Tensor]:
    sequence, outputs, hidden = prompt, [], prompt
    for _ in range(steps + 1):
        full = run_blocks(0, 6, sequence)[:, -hidden.shape[1]:]
        outputs.append(full)
        hidden = full[:, -1:]
        sequence = torch.cat([sequence, hidden], dim=1)
    return outputs


def assert_same(outputs, expected):
    assert len(outputs) == len(expected)
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def answer(client: Client, steps: int = 3, before_step=None, close: bool = True):
    async def scenario():
        result = await generate(client.session, PROMPT, steps, before_step)
        await client.trust.checker.drain()
        if close:
            await client.session.close()
        return result

    return asyncio.run(scenario())


# ---- the verifier ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, problem", [
    ("honest", None),
    ("none", "no receipt"),
    ("bad-digest", "output digest does not match"),
    ("inflate", "inflated"),
    ("wrong-step", "for step 1, not 0"),
    ("other-blocks", "for blocks 0:2, not 0:3"),
    ("other-session", "is for session"),
    ("other-signer", "not by the peer that replied"),
    ("altered", "does not verify (altered)"),
])
def test_each_receipt_problem_is_named(mode, problem):
    swarm = FakeSwarm(FakePeer("p", 0, 3, sign=True, receipts=mode))
    peer = swarm.by_name("p")
    meta = StepRequest(session_id="s", start=0, end=3, position=0, max_length=16)
    reply = asyncio.run(swarm.open_stream(peer.peer_id).step(meta, PROMPT))
    sent = HopStep(peer.peer_id, meta, step=0, tokens=5)
    found = receipt_problem(reply.receipt, sent, PROMPT, reply.output)
    assert found is None if problem is None else problem in found, found
    assert receipt_problem(reply.receipt, HopStep(peer.peer_id, meta, 0, 4), PROMPT, reply.output) is not None


def test_a_receipt_claiming_less_than_was_sent_is_accepted():
    swarm = FakeSwarm(FakePeer("p", 0, 3, sign=True))
    peer = swarm.by_name("p")
    meta = StepRequest(session_id="s", start=0, end=3, position=0, max_length=16)
    reply = asyncio.run(swarm.open_stream(peer.peer_id).step(meta, PROMPT))
    assert receipt_problem(reply.receipt, HopStep(peer.peer_id, meta, 0, 500), PROMPT, reply.output) is None
    assert "input digest" in receipt_problem(reply.receipt, HopStep(peer.peer_id, meta, 0, 5), PROMPT + 1, reply.output)


# ---- sessions: a reply without a valid receipt is never used -------------------------------------------


@pytest.mark.parametrize("mode", CHEATS)
def test_a_reply_without_a_valid_receipt_is_routed_around_at_once_and_its_peer_is_blacklisted(mode):
    swarm = three_hops(b={"receipts": mode})
    client = Client(swarm)
    b = swarm.by_name("b")
    outputs, untrusted = answer(client)
    assert_same(outputs, reference(PROMPT, 3))  # b's reply was never used
    assert [e.peer_id for e in client.session.failovers] == [str(b.peer_id)]
    assert "without a valid receipt" in client.session.failovers[0].reason
    assert untrusted == [None] * 4  # nothing of b's had been used
    assert b.peer_id in client.sequence.banned() and client.node.is_blacklisted(str(b.peer_id))
    assert client.trust.checker.stats.bad_receipts == 1
    # b earns nothing; the others' hops are served by nobody else here, so they are unverifiable and unpaid too
    assert client.countersigned() == set()
    for name in ("a", "b2", "c"):
        assert not client.node.is_blacklisted(str(swarm.by_name(name).peer_id))


def test_a_peer_turning_to_bad_receipts_mid_session_taints_its_earlier_outputs_and_earns_nothing():
    swarm = three_hops(b={"receipts": "inflate", "receipts_from_step": 2})
    client = Client(swarm)
    b = swarm.by_name("b")
    outputs, untrusted = answer(client, steps=4)
    assert_same(outputs, reference(PROMPT, 4))
    assert untrusted == [None, None, 0, None, None]  # b served from the prompt on: all of it is regenerated
    assert client.node.is_blacklisted(str(b.peer_id))
    assert str(b.peer_id) not in client.countersigned()  # not even for the steps it signed honestly


def test_a_replay_on_a_replacement_starts_a_new_count_and_honest_receipts_stay_valid():
    swarm = three_hops(b={"fail_after": 3})
    client = Client(swarm)
    outputs, _ = answer(client, steps=5)
    assert_same(outputs, reference(PROMPT, 5))
    assert client.trust.checker.stats.bad_receipts == 0
    assert [e.reason.split(":")[0] for e in client.session.failovers] != []
    assert client.node.blacklisted() == frozenset()


def test_a_reopened_stream_after_a_lost_cache_starts_a_new_count():
    swarm = three_hops(b={"lose_cache_at_step": 2})
    client = Client(swarm)
    outputs, _ = answer(client, steps=4)
    assert_same(outputs, reference(PROMPT, 4))
    assert client.trust.checker.stats.bad_receipts == 0 and client.node.blacklisted() == frozenset()


def test_a_rollback_on_the_same_stream_keeps_counting():
    client = Client(three_hops())

    async def scenario():
        first = (await client.session.step(PROMPT)).hidden
        await client.session.step(first[:, -1:])
        client.session.rollback(5)  # the peers recompute from 5: their receipts count those tokens again
        return (await client.session.step(first[:, -1:])).hidden

    again = asyncio.run(scenario())
    torch.testing.assert_close(again, reference(PROMPT, 1)[1], rtol=0, atol=1e-6)
    assert client.trust.checker.stats.bad_receipts == 0 and client.session.failovers == []


def test_cache_rebuilds_after_a_blacklisting_keep_counting_on_the_same_stream():
    swarm = three_hops()
    client = Client(swarm)
    b = swarm.by_name("b")

    def blacklist_b_at(step: int):
        if step == 3:  # then c's cache is rebuilt from b2's outputs, on c's same stream, at position 0
            client.node.fault_seen(str(b.peer_id), "caught by a test")

    outputs, untrusted = answer(client, steps=4, before_step=blacklist_b_at)
    assert_same(outputs, reference(PROMPT, 4))
    assert untrusted == [None, None, None, 0, None]
    assert client.trust.checker.stats.bad_receipts == 0
    assert client.node.blacklisted() == {str(b.peer_id)}


def test_without_a_verifier_replies_are_used_as_they_come():
    swarm = three_hops(b={"receipts": "none"})
    sequence = RemoteSequence(swarm, swarm, "fake", 6, CFG)
    session = InferenceSession(sequence, swarm, 64)
    outputs, _ = asyncio.run(generate(session, PROMPT, 2))
    assert_same(outputs, reference(PROMPT, 2))
    assert session.failovers == []


def test_the_error_is_a_bad_reply_naming_the_peer():
    error = BadReceiptError("QmPeer", "no receipt")
    assert error.peer == "QmPeer" and str(error) == "peer QmPeer sent a reply without a valid receipt: no receipt"


# ---- coverage -----------------------------------------------------------------------------------------


def test_checking_every_step_of_a_redundant_swarm_verifies_every_hop_step():
    swarm = redundant()
    client = Client(swarm, check_rate=1.0)
    answer(client, steps=4, close=False)
    coverage = client.trust.checker.coverage(client.session.session_id)
    assert coverage == Coverage(steps=10, verified=10)  # 5 steps x 2 hops
    assert coverage.coverage == 1.0 and coverage.complete
    assert client.trust.checker.settle_timeout is None  # strict: an answer waits for every check


def test_unchecked_and_uncheckable_steps_count_against_coverage():
    swarm = redundant()
    client = Client(swarm, check_rate=0.0)
    answer(client, steps=2, close=False)
    coverage = client.trust.checker.coverage(client.session.session_id)
    assert (coverage.steps, coverage.verified, coverage.unchecked, coverage.coverage) == (6, 0, 6, 0.0)
    alone = Client(swarm_of({"a": (0, 3), "b": (3, 6), "b2": (3, 6)}), check_rate=1.0)
    answer(alone, steps=2, close=False)
    coverage = alone.trust.checker.coverage(alone.session.session_id)
    assert (coverage.steps, coverage.verified, coverage.unverifiable) == (6, 3, 3)  # nobody else serves 0:3
    assert coverage.coverage == 0.5


def test_coverage_counts_positions_from_since_and_steps_sent_again_replace_those_they_redo():
    checker = SpotChecker(ReputationNode(RSAPrivateKey()), None, None, check_rate=0.0)

    def observe(position: int, start: int, end: int, state: str = "verified") -> None:
        x = torch.zeros(1, 1, HIDDEN)
        checker.on_step(StepRecord("s", "peer", start, end, position, x, x, (x,), False, ""))
        checker._tallies["s"][-1].state = state

    for position in range(4):  # two hops per step
        observe(position, 0, 3)
        observe(position, 3, 6, "failed" if position == 3 else "verified")
    assert checker.coverage("s") == Coverage(steps=8, verified=7, failed=1)
    assert checker.coverage("s", since=2) == Coverage(steps=4, verified=3, failed=1)
    observe(2, 0, 6, "unchecked")  # a rollback to 2, on a new route: positions 2 and 3 are redone
    assert checker.coverage("s") == Coverage(steps=5, verified=4)
    observe(2, 0, 6, "pending")  # the same blocks at the same position again
    assert checker.coverage("s") == Coverage(steps=5, verified=4, pending=1)
    checker.on_close("s")
    assert checker.coverage("s") == Coverage()


def test_a_check_that_cannot_run_is_logged_and_counted(caplog):
    swarm = FakeSwarm(FakePeer("alone", 0, 6, sign=True))
    client = Client(swarm, check_rate=1.0)
    with caplog.at_level("INFO", logger="reputation.checks"):
        answer(client, steps=1, close=False)
    assert client.trust.checker.coverage(client.session.session_id).unverifiable == 2
    assert "could not run (the step stays unverified): no route of other peers" in caplog.text


@pytest.mark.parametrize("coverage, checked, mark", [
    (Coverage(steps=40, verified=40), True, None),
    (Coverage(steps=40, verified=12), True, "[verified 12 of 40 steps: not fully verified]"),
    (Coverage(steps=40, verified=12, failed=3), True, "[verified 12 of 40 steps, 3 failed: not fully verified]"),
    (Coverage(steps=40), False, "[verified 0 of 40 steps: spot checks are off]"),
    (Coverage(), True, None),
])
def test_a_generation_report_marks_answers_not_fully_verified(coverage, checked, mark):
    report = GenerationReport(coverage, checked)
    assert report.mark() == mark
    assert report.flagged == (mark is not None)
    assert (report.steps, report.verified) == (coverage.steps, coverage.verified)
