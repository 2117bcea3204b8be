"""A client with memory to spare verifies hops nobody else serves by running their blocks itself, live.

One honest peer serves blocks 0:15 and a liar (`--adversary random`) blocks 15:30; nobody else serves either
span, so no other peer can re-run their work. A strict client with a budget for local blocks
(`self_verify_bytes`) loads the blocks and checks every step itself: the liar is caught and blacklisted without
a wrong answer coming back, and once an honest peer serves 15:30 the answers are exact and fully verified.
"""

from __future__ import annotations

import pytest

from peers.local import LocalSwarm
from swarm import DistributedModelForCausalLM
from swarm.config import STRICT
from swarm.errors import SwarmError
from swarm.models import DEFAULT_MODEL

pytestmark = pytest.mark.slow

TOKENS = 6


def test_a_self_verifying_client_catches_a_liar_nobody_else_could_check_and_verifies_honest_unique_hops(
        chat_ids, local_model):
    expected = local_model.generate(chat_ids, max_new_tokens=TOKENS, do_sample=False)[0, chat_ids.shape[1]:].tolist()
    with LocalSwarm(model=DEFAULT_MODEL) as swarm:
        honest, liar = swarm.add_peers(("honest-0:15", "0:15", ()), ("liar-15:30", "15:30", ("--adversary", "random")))
        model = DistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, [swarm.initial_peers], **STRICT,
                                                            self_verify_bytes=2**30, missing_blocks_timeout=5.0)
        try:
            node, stats = model.trust_layer.node, model.trust_layer.checker.stats
            try:
                out = model.generate(chat_ids, max_new_tokens=TOKENS)
                assert out[0, chat_ids.shape[1]:].tolist() == expected, "a wrong answer came back"
            except SwarmError as e:  # no peer is left for 15:30 once the liar is out: an error, never a wrong answer
                assert "block(s) 15-29" in str(e) and "blacklisted by spot checks" in str(e), e
            node.refresh(force=True)
            assert node.is_blacklisted(liar.peer_id)
            assert stats.local >= 2 and stats.faults >= 1 and stats.unverifiable == 0

            swarm.add_peers(("honest-15:30", "15:30", ()))
            model.loop.run(model.sequence.refresh_spans(force=True))
            for _ in range(2):
                out = model.generate(chat_ids, max_new_tokens=TOKENS)
                assert out[0, chat_ids.shape[1]:].tolist() == expected
                report = model.last_generation
                assert not report.flagged, report.mark()  # every hop-step checked and passed, by this client
            node.refresh(force=True)
            assert not node.is_blacklisted(honest.peer_id)
            assert all(row.fails == 0 for row in node.standings() if row.peer_id != liar.peer_id)
            assert stats.unverifiable == 0
        finally:
            model.shutdown()
