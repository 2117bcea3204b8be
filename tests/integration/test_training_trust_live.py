"""The trust layer on training work, live: a peer returning wrong gradients is caught and blacklisted within 100
of its backward responses, and honest peers, bfloat16 ones included, are never flagged on backward. A peer whose
training forwards are wrong (and whose backwards are honest) is caught by forward checks.

Two float32 and two bfloat16 honest peers serve the whole model; the client's seeds (`trusted_peers`) are the
float32 ones, whose votes as referees count from the start. A `wrong-grad:noise` peer (float32) joins on
0:15, advertising 10x its throughput (the client believes announcements, so training routes pick it), and the
client trains soft prompts, checking every backward, until that peer is blacklisted. Then each honest peer's
backward over 0:15 is checked directly, whatever the routes picked. Then a `noise` peer joins on 15:30 and
training goes on until it is blacklisted too.
"""

from __future__ import annotations

import pytest
import torch
from hivemind.p2p import PeerID

from peers.local import LocalSwarm
from swarm import DistributedModelForCausalLM
from swarm.hooks import TrainRecord
from swarm.models import DEFAULT_MODEL
from swarm.routing import RouteHop
from swarm.training import call_hop

pytestmark = pytest.mark.slow

MAX_BACKWARD_RESPONSES = 100


def _check_directly(model, peer_id: str, chat_ids, start: int = 0, end: int = 15, attempts: int = 3) -> str:
    """The peer's backward over [start, end) on the chat prompt, checked as a sampled one would be. A check that could
    not run ("unverifiable": the re-running peer busy on a loaded machine) says nothing of the peer: tried again."""
    for _ in range(attempts):
        verdict = _check_once(model, peer_id, chat_ids, start, end)
        if verdict != "unverifiable":
            return verdict
    return verdict


def _check_once(model, peer_id: str, chat_ids, start: int, end: int) -> str:
    hop = RouteHop(PeerID.from_base58(peer_id), start, end)
    hidden = model.head.embed(chat_ids).clone()
    grad = torch.randn_like(hidden, generator=None) * 1e-3
    meta, result = model.loop.run(call_hop(model.transport, "backward", hop, [hidden, grad], None, None,
                                           [hidden.shape]))
    record = TrainRecord("backward", hop.peer_id, start, end, meta.request_id, hidden, grad, None, None,
                         result.tensors, result.receipt)
    return model.loop.run(model.trust_layer.training.check(record))


def test_wrong_gradients_are_caught_within_100_backward_responses_and_honest_bf16_peers_are_never_flagged(chat_ids):
    with LocalSwarm(model=DEFAULT_MODEL) as swarm:
        honest = swarm.add_peers(*((f"honest-{dtype}-{i}", "0:30", ("--dtype", dtype))
                                   for dtype in ("float32", "bfloat16") for i in (1, 2)))
        seeds = tuple(p.peer_id for p in honest if "float32" in p.name)  # the operator's trusted peers
        model = DistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, [swarm.initial_peers], tuning="prompt",
                                                            prompt_length=4, check_rate=1.0, route_on_evidence=False,
                                                            trusted_peers=seeds)
        try:
            node = model.trust_layer.node

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
            verdicts = {p.name: _check_directly(model, p.peer_id, chat_ids) for p in honest}
            print(f"wrong-grad:noise caught after {stats.caught_after.get(liar.peer_id)} of its backward responses; "
                  f"backward checks {stats.checks}: {stats.passes} passed, {stats.faults} faults, "
                  f"{stats.inconclusive} inconclusive, {stats.unverifiable} could not run; honest peers checked "
                  f"directly: {verdicts}")
            assert node.is_blacklisted(liar.peer_id)
            assert stats.caught_after[liar.peer_id] <= MAX_BACKWARD_RESPONSES
            assert set(verdicts.values()) == {"pass"}, verdicts  # bf16 peers checked by the other bf16 peer
            honest_ids = {p.peer_id for p in honest}
            assert not [c for c in stats.comparisons if c[0] in honest_ids and c[4] != "pass"]
            assert not any(node.is_blacklisted(p) for p in honest_ids)
            assert all(row.fails == 0 for row in node.standings() if row.peer_id in honest_ids)

            (noisy,) = swarm.add_peers(("noisy-forward", "15:30", ("--adversary", "noise")))
            model.loop.run(model.sequence.refresh_spans(force=True))
            while not node.is_blacklisted(noisy.peer_id) and stats.replies[noisy.peer_id] < MAX_BACKWARD_RESPONSES:
                optimizer.zero_grad()
                model(chat_ids, labels=chat_ids.clone()).loss.backward()
                optimizer.step()
                model.loop.run(model.trust_layer.training.drain())
                node.refresh(force=True)
            print(f"noise on training forwards caught after {stats.caught_after.get(noisy.peer_id)} of its replies "
                  f"({stats.forward_checks} forward checks in all)")
            assert node.is_blacklisted(noisy.peer_id) and stats.forward_checks >= 1
            # an honest peer checked by a route through the noisy one disagrees with it (referees settle that);
            # against honest routes it always agrees, and it is never blamed
            assert not [c for c in stats.comparisons
                        if c[0] in honest_ids and noisy.peer_id not in c[1] and c[4] != "pass"]
            assert not any(node.is_blacklisted(p) for p in honest_ids)
            assert all(row.fails == 0 for row in node.standings() if row.peer_id in honest_ids)
        finally:
            model.shutdown()
