"""Receipts on the token path and verification coverage, live on loopback with the real model.

One swarm: two honest float32 peers serving every block. First, with only them, a strict client (every step
checked, answers wait for their checks) reports every answer fully verified, and the default client flags its
answers. Then three adversaries join, each sending replies without a valid receipt (`no-receipt`,
`bad-receipt`, `inflate`) and advertising 10x throughput so that routes pick them (the clients believe announcements:
`route_on_evidence=False`): none of their replies
reaches an answer, each is routed around and blacklisted, and none earns credit.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hivemind.p2p import PeerID

from peers.local import LocalSwarm
from reputation.attest import Countersigned
from swarm import DistributedModelForCausalLM
from swarm.config import STRICT
from swarm.models import DEFAULT_MODEL

pytestmark = pytest.mark.slow

TOKENS = 8
RECEIPT_CHEATS = ("no-receipt", "bad-receipt", "inflate")


@pytest.fixture(scope="module")
def receipt_swarm():
    with LocalSwarm(model=DEFAULT_MODEL) as swarm:
        swarm.honest = swarm.add_peers(("honest-a", "0:30", ()), ("honest-b", "0:30", ()))
        yield swarm


@pytest.fixture(scope="module")
def expected(local_model, chat_ids) -> torch.Tensor:
    """The local model's greedy answer: what every answer through the swarm must be."""
    with torch.no_grad():
        out = local_model.generate(chat_ids, max_new_tokens=TOKENS, do_sample=False)
    return out[0, chat_ids.shape[1]:]


def _client(swarm, **options) -> DistributedModelForCausalLM:
    return DistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, [swarm.initial_peers], route_on_evidence=False, **options)


def _answer(model, chat_ids):
    """(new token ids, report, the session's fail-overs)."""
    with model.inference_session(max_length=chat_ids.shape[1] + TOKENS) as session:
        result = model.generate(chat_ids, max_new_tokens=TOKENS, session=session, return_dict_in_generate=True)
        failovers = list(session.inner.failovers)
    assert model.last_generation == result.report
    return result.sequences[0, chat_ids.shape[1]:], result.report, failovers


def test_strict_mode_verifies_every_step_of_an_honest_redundant_swarm_and_the_default_flags(
        receipt_swarm, chat_ids, expected) -> None:
    strict = _client(receipt_swarm, **STRICT)
    try:
        for _ in range(3):
            tokens, report, _ = _answer(strict, chat_ids)
            assert torch.equal(tokens, expected)
            assert report.coverage == 1.0 and not report.flagged and report.mark() is None
            assert report.steps == len(expected)  # one hop (a peer serving every block) per token
    finally:
        strict.shutdown()
    default = _client(receipt_swarm)  # newcomers are checked at 0.3 a step
    try:
        tokens, report, _ = _answer(default, chat_ids)
        assert torch.equal(tokens, expected)
        assert report.steps == len(expected) and report.verified < report.steps and report.flagged
        assert report.mark() == f"[verified {report.verified} of {report.steps} steps: not fully verified]"
    finally:
        default.shutdown()


def test_swarm_chat_marks_what_it_did_not_fully_verify(receipt_swarm) -> None:
    def chat(*options: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "apps.chat", "--prompt", "What is the capital of France?",
             "--max-new-tokens", str(TOKENS), *options],
            env=receipt_swarm.env, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr
        assert "Paris" in result.stdout and "[verified" not in result.stdout  # stdout holds only the answer
        return result.stderr

    assert "[verified" not in chat("--strict")
    assert "steps: not fully verified]" in chat()


def _route_through_cheaters_first(model, cheats, honest) -> None:
    """`model`'s routes leave the honest peers out while it does not yet avoid every cheater, so each cheater is
    routed to whatever the throughputs measured on a busy machine (a CI run's client once never reached one)."""
    honest_ids = frozenset(PeerID.from_base58(peer.peer_id) for peer in honest)
    make_route = model.sequence.make_route

    async def cheaters_first(start=0, end=None, excluded=frozenset(), *args, **kwargs):
        if not all(model.trust_layer.node.avoids(peer.peer_id) for peer in cheats):
            excluded = excluded | honest_ids
        return await make_route(start, end, excluded, *args, **kwargs)

    model.sequence.make_route = cheaters_first


def test_replies_without_valid_receipts_are_never_used_and_their_peers_are_blacklisted_unpaid(
        receipt_swarm, chat_ids, expected) -> None:
    cheats = [receipt_swarm.add_peer("0:30", "--adversary", mode, wait=False, name=mode) for mode in RECEIPT_CHEATS]
    for peer in cheats:
        receipt_swarm.wait_online(peer)
    model = _client(receipt_swarm)
    node = model.trust_layer.node
    _route_through_cheaters_first(model, cheats, receipt_swarm.honest)
    try:
        routed_around: dict[str, str] = {}
        for _ in range(5):
            tokens, report, failovers = _answer(model, chat_ids)
            assert torch.equal(tokens, expected)  # nothing a cheater returned reached the answer
            routed_around.update({event.peer_id: event.reason for event in failovers})
        for peer in cheats:
            assert node.is_blacklisted(peer.peer_id), f"{peer.name} was not blacklisted"
            assert "without a valid receipt" in routed_around.get(peer.peer_id, ""), f"{peer.name} was never routed around"
        assert model.trust_layer.checker.stats.bad_receipts == len(cheats)  # each caught once, then never used again
        paid = {Countersigned.decode(data).receipt.signer for kind, data in node.messages() if kind == "work"}
        rows = {row.peer_id: row for row in node.standings()}
        for peer in cheats:
            assert peer.peer_id not in paid
            row = rows[peer.peer_id]
            assert row.blacklisted and row.vested == 0 and row.pending == 0, row
        assert paid and paid <= {peer.peer_id for peer in receipt_swarm.honest}
        for peer in receipt_swarm.honest:
            row = rows.get(peer.peer_id)
            assert row is not None and not row.blacklisted and row.fails == 0, row
        assert any(rows[peer.peer_id].pending > 0 for peer in receipt_swarm.honest)  # honest work is credited
    finally:
        model.shutdown()
        for peer in cheats:
            peer.signal(2)
