"""Steering live, on loopback with the real model: a peer that turns "Paris" into "London".

Two honest float32 peers serve every block (0:30). A third joins with `--adversary steer` (0:30, 10x its
throughput advertised): where the answer's next token would be " Paris", it pushes the last position's output by
0.075 of its update towards " London". Routed through it alone, an unchecked client answers "London". A strict
client (every step checked, answers wait for their checks) that trusts the honest peers catches and blacklists
it, blames neither honest peer, and returns no answer with " London" in it.
"""

from __future__ import annotations

import pytest
import torch
from hivemind.p2p import PeerID

from peers.local import LocalSwarm
from reputation.checks import ESTABLISHED
from swarm import DistributedModelForCausalLM
from swarm.config import STRICT
from swarm.hooks import StepRecord
from swarm.models import DEFAULT_MODEL

pytestmark = pytest.mark.slow

TOKENS = 8  # "The capital of France is Paris." and the end of the turn
MAX_ANSWERS = 6  # strict answers the steering peer gets before its work is checked directly


class Excluded:
    """A trust view that keeps the given peers out of routes."""

    def __init__(self, peer_ids: set[str]):
        self.peer_ids = peer_ids

    def is_blacklisted(self, peer_id: str) -> bool:
        return peer_id in self.peer_ids

    def avoids(self, peer_id: str) -> bool:
        return self.is_blacklisted(peer_id)

    def score(self, peer_id: str) -> float:
        return 1.0


@pytest.fixture(scope="module")
def steer_swarm():
    with LocalSwarm(model=DEFAULT_MODEL) as swarm:
        swarm.honest = swarm.add_peers(("honest-a", "0:30", ()), ("honest-b", "0:30", ()))
        yield swarm


@pytest.fixture(scope="module")
def expected(local_model, chat_ids) -> list[int]:
    with torch.no_grad():
        return local_model.generate(chat_ids, max_new_tokens=TOKENS, do_sample=False)[0, chat_ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def strict(steer_swarm, chat_ids, expected):
    """A strict client that trusts the honest peers (they checked each other in its first answers)."""
    model = DistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, [steer_swarm.initial_peers], **STRICT)
    node = model.trust_layer.node
    for _ in range(3):
        assert _answer(model, chat_ids) == expected
        if all(node.score(p.peer_id) >= ESTABLISHED for p in steer_swarm.honest):
            break
    assert all(node.score(p.peer_id) >= ESTABLISHED for p in steer_swarm.honest)
    yield model
    model.shutdown()


@pytest.fixture(scope="module")
def steerer(steer_swarm, strict):
    """The steering peer, joining once the strict client trusts the honest peers."""
    peer = steer_swarm.add_peer("0:30", "--adversary", "steer", name="steer")
    yield peer
    peer.signal(2)


@pytest.fixture(scope="module")
def words(tokenizer) -> tuple[int, int]:
    return tuple(tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in (" Paris", " London"))


def _answer(model, ids) -> list[int]:
    model.loop.run(model.sequence.refresh_spans(force=True))  # see a new peer at once
    out = model.generate(ids, max_new_tokens=TOKENS)
    if model.trust_layer is not None:
        model.loop.run(model.trust_layer.checker.drain())
    return out[0, ids.shape[1]:].tolist()


def _check_directly(model, peer, ids: torch.Tensor, session: str) -> str:
    """Have `peer` run `ids` through every block (as a session's first step) and check that step, whatever routes
    the client picks under load."""
    model.loop.run(model.sequence.refresh_spans(force=True))
    hidden = model.head.embed(ids)
    peer_id = PeerID.from_base58(peer.peer_id)
    reply = model.loop.run(model.transport.forward(peer_id, 0, 30, hidden))
    record = StepRecord(session, peer_id, 0, 30, 0, hidden, reply.output, (hidden,), False, reply.receipt)
    return model.loop.run(model.trust_layer.checker.check(record))


def test_an_unchecked_client_routed_through_the_steering_peer_answers_london(steer_swarm, steerer, chat_ids,
                                                                            tokenizer, expected, words):
    paris, london = words
    assert paris in expected and london not in expected
    unchecked = DistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, [steer_swarm.initial_peers],
                                                            spot_checks=False)
    try:
        unchecked.sequence.use_trust(Excluded({p.peer_id for p in steer_swarm.honest}))  # the steerer alone
        steered = _answer(unchecked, chat_ids)
    finally:
        unchecked.shutdown()
    assert london in steered and paris not in steered, tokenizer.decode(steered)
    print(f"unchecked, through the steering peer: {tokenizer.decode(steered)!r}; honest: {tokenizer.decode(expected)!r}")


def test_strict_checks_catch_the_steering_peer_and_no_answer_says_london(steer_swarm, steerer, strict, chat_ids,
                                                                       tokenizer, expected, words):
    node, stats = strict.trust_layer.node, strict.trust_layer.checker.stats
    answers = []
    for _ in range(MAX_ANSWERS):  # routes pick it (one hop, 10x the throughput) unless load says otherwise
        answers.append(_answer(strict, chat_ids))
        if node.is_blacklisted(steerer.peer_id):
            break
    prompt = tokenizer("The capital of France is", add_special_tokens=False, return_tensors="pt")["input_ids"]
    for attempt in range(3 if not node.is_blacklisted(steerer.peer_id) else 0):  # its work, whatever the routes
        if _check_directly(strict, steerer, torch.cat([chat_ids, prompt], dim=1), f"direct-{attempt}") == "fail":
            break
    assert node.is_blacklisted(steerer.peer_id), "the steering peer was not caught"
    assert all(answer == expected for answer in answers), [tokenizer.decode(a) for a in answers]
    assert not any(words[1] in answer for answer in answers)
    assert stats.effect_fails >= 1  # what it did to the answer was seen, not only its size
    rows = {row.peer_id: row for row in node.standings()}
    for peer in steer_swarm.honest:
        assert not node.is_blacklisted(peer.peer_id) and rows[peer.peer_id].fails == 0, peer.name
    print(f"steering peer: {stats.responses[steerer.peer_id]} replies seen, caught after "
          f"{stats.caught_after.get(steerer.peer_id)}, {len(answers)} strict answers, effect fails {stats.effect_fails} "
          f"(the tolerance alone would have passed {stats.effect_only}), effect checks {stats.effect_checks}")
