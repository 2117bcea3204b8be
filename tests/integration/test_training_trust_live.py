"""The trust layer on training work, live: a peer returning wrong gradients is caught and blacklisted within 100
of its backward responses, and honest peers, bfloat16 ones included, are never flagged on backward.

Honest peers serve 0:15 and 15:30 in float32 and in bfloat16; a client first answers with every step checked,
so that it trusts them (their agreement is what makes referees count), then a `wrong-grad:noise` peer joins on
0:15, advertising 10x its throughput (the client believes announcements, so training routes pick it), and the
client trains soft prompts until that peer is blacklisted.
"""

from __future__ import annotations

import pytest
import torch

from peers.local import LocalSwarm
from reputation.checks import ESTABLISHED
from swarm import DistributedModelForCausalLM
from swarm.models import DEFAULT_MODEL

pytestmark = pytest.mark.slow

MAX_BACKWARD_RESPONSES = 100


def test_wrong_gradients_are_caught_within_100_backward_responses_and_honest_bf16_peers_are_never_flagged(chat_ids):
    with LocalSwarm(model=DEFAULT_MODEL) as swarm:
        honest = swarm.add_peers(*((f"honest-{dtype}-{blocks}", blocks, ("--dtype", dtype))
                                   for dtype in ("float32", "bfloat16") for blocks in ("0:15", "15:30")))
        model = DistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, [swarm.initial_peers], tuning="prompt",
                                                            prompt_length=4, check_rate=1.0, route_on_evidence=False)
        try:
            node = model.trust_layer.node
            for _ in range(4):  # every step checked: the honest peers come to trust each other here
                model.generate(chat_ids, max_new_tokens=4)
                model.loop.run(model.trust_layer.checker.drain())
                node.refresh(force=True)
                if all(node.score(p.peer_id) >= ESTABLISHED for p in honest):
                    break
            assert all(node.score(p.peer_id) >= ESTABLISHED for p in honest)

            (liar,) = swarm.add_peers(("wrong-grad", "0:15", ("--adversary", "wrong-grad:noise")))
            model.loop.run(model.sequence.refresh_spans(force=True))
            stats = model.trust_layer.training.stats
            optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
            while not node.is_blacklisted(liar.peer_id) and stats.backward_replies[liar.peer_id] < MAX_BACKWARD_RESPONSES:
                optimizer.zero_grad()
                model(chat_ids, labels=chat_ids.clone()).loss.backward()
                optimizer.step()
                model.loop.run(model.trust_layer.training.drain())
                node.refresh(force=True)
            print(f"wrong-grad:noise caught after {stats.caught_after.get(liar.peer_id)} of its backward responses; "
                  f"backward checks {stats.checks}: {stats.passes} passed, {stats.faults} faults, "
                  f"{stats.inconclusive} inconclusive, {stats.unverifiable} could not run")
            assert node.is_blacklisted(liar.peer_id)
            assert stats.caught_after[liar.peer_id] <= MAX_BACKWARD_RESPONSES
            honest_ids = {p.peer_id for p in honest}
            assert not [c for c in stats.comparisons if c[0] in honest_ids and c[4] != "pass"]
            assert any(c[0] in honest_ids for c in stats.comparisons)  # honest backward passes were checked...
            assert not any(node.is_blacklisted(p) for p in honest_ids)  # ...and none was flagged
            assert all(row.fails == 0 for row in node.standings() if row.peer_id in honest_ids)
        finally:
            model.shutdown()
