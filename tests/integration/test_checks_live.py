"""Spot checks live, on loopback with the real model: hops nobody else serves exactly, configurations nobody else
declares, padded batches, bundled steps, and a Sybil trio on an honest peer's span.

Six honest float32 peers serve blocks 0:10, 10:20 and 20:30, two each; a client that checks every step learns to
trust them first. Adversaries join one test at a time (each advertises 10x its throughput, and the
client believes announcements, `route_on_evidence=False`, so routes pick it).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from hivemind.p2p import PeerID

from peers.local import LocalSwarm
from reputation.checks import ESTABLISHED
from swarm import DistributedModelForCausalLM
from swarm.hooks import StepRecord
from swarm.models import DEFAULT_MODEL

pytestmark = pytest.mark.slow

TOKENS = 6  # new tokens per answer
MAX_ANSWERS = 10  # answers an adversary gets before the test gives up on catching it


@pytest.fixture(scope="module")
def checks_swarm():
    with LocalSwarm(model=DEFAULT_MODEL) as swarm:
        swarm.honest = swarm.add_peers(*((f"honest-{blocks}-{i}", blocks, ()) for blocks in ("0:10", "10:20", "20:30")
                                         for i in (1, 2)))
        yield swarm


@pytest.fixture(scope="module")
def client(checks_swarm, chat_ids):
    model = DistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, [checks_swarm.initial_peers], check_rate=1.0,
                                                        route_on_evidence=False)
    for _ in range(2):  # the honest peers check each other: this client comes to trust them
        _answer(model, chat_ids)
    node = model.trust_layer.node
    assert all(node.score(p.peer_id) >= ESTABLISHED for p in checks_swarm.honest), [node.score(p.peer_id) for p in checks_swarm.honest]
    yield model
    model.shutdown()


def _answer(model, ids, mask=None, **options) -> list[list[int]]:
    out = model.generate(ids, mask, max_new_tokens=TOKENS, **options)
    model.loop.run(model.trust_layer.checker.drain())
    return out[:, ids.shape[1]:].tolist()


def _check_directly(model, peer, ids, seed: int, blocks: tuple[int, int] = (0, 30)) -> str:
    """Have `peer` run the prompt through its blocks (as a session's first step would) and check that step:
    whatever routes the client picks (peers measure their throughput under load), the peer's work is checked."""
    model.loop.run(model.sequence.refresh_spans(force=True))
    hidden = model.head.embed(ids) + 0.01 * seed
    peer_id = PeerID.from_base58(peer.peer_id)
    reply = model.loop.run(model.transport.forward(peer_id, *blocks, hidden))
    record = StepRecord(f"direct-{seed}", peer_id, *blocks, 0, hidden, reply.output, (hidden,), False, reply.receipt)
    return model.loop.run(model.trust_layer.checker.check(record))


def _honest_never_blamed(model, swarm) -> None:
    node = model.trust_layer.node
    rows = {row.peer_id: row for row in node.standings()}
    for peer in swarm.honest:
        assert not node.is_blacklisted(peer.peer_id), f"{peer.name} was blacklisted"
        assert rows.get(peer.peer_id) is None or rows[peer.peer_id].fails == 0, f"{peer.name} was found at fault"


def _caught(model, swarm, adversary, ids, mask=None, blocks: tuple[int, int] | None = None, **options) -> None:
    """Answer until the adversary is blacklisted. Routes pick it (it saves a hop and advertises 10x its
    throughput) unless the machine is so loaded that its measured throughput says otherwise; then, given its
    `blocks`, its work is checked directly."""
    node, stats = model.trust_layer.node, model.trust_layer.checker.stats
    for _ in range(MAX_ANSWERS):
        model.loop.run(model.sequence.refresh_spans(force=True))  # see the new peer at once
        _answer(model, ids, mask, **options)
        if node.is_blacklisted(adversary.peer_id) or (stats.responses[adversary.peer_id] == 0 and blocks):
            break
    for seed in range(3 if blocks and not node.is_blacklisted(adversary.peer_id) else 0):
        if _check_directly(model, adversary, ids, seed, blocks) == "fail":
            break
    assert node.is_blacklisted(adversary.peer_id), f"{adversary.name} was not caught in {MAX_ANSWERS} answers"
    _honest_never_blamed(model, swarm)
    adversary.signal(2)


def test_a_random_peer_on_a_span_nobody_else_serves_is_checked_through_a_chain(checks_swarm, client, chat_ids):
    # blocks 0:20: nobody else serves that span (and a route through it saves a hop, so routes pick it)
    liar = checks_swarm.add_peer("0:20", "--adversary", "random", name="random-0:20")
    chained = client.trust_layer.checker.stats.chained
    _caught(client, checks_swarm, liar, chat_ids, blocks=(0, 20))
    assert client.trust_layer.checker.stats.chained > chained


def test_a_random_peer_with_a_compression_nobody_else_declares_is_checked(checks_swarm, client, chat_ids):
    liar = checks_swarm.add_peer("10:30", "--adversary", "random", "--quant", "int8", name="random-int8")
    _caught(client, checks_swarm, liar, chat_ids, blocks=(10, 30))


def test_a_peer_cheating_only_on_padded_batches_is_caught_on_them(checks_swarm, client, tokenizer):
    cheater = checks_swarm.add_peer("10:30", "--adversary", "padded-only", name="padded-only")
    tokenizer.padding_side = "left"
    batch = tokenizer(["The capital of France is", "Once upon a time, in a small village by the sea, there lived"],
                      return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()
    padded = client.trust_layer.checker.stats.padded
    _caught(client, checks_swarm, cheater, batch["input_ids"], batch["attention_mask"],
            pad_token_id=tokenizer.pad_token_id)
    assert client.trust_layer.checker.stats.padded > padded


def test_a_peer_cheating_only_on_bundled_steps_is_caught_on_them_and_no_wrong_answer_is_returned(checks_swarm, client, tokenizer):
    questions = ["What is the capital of France?", "Name three colours.", "What is 2 plus 2?"]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"] for q in questions]
    expected = [_answer(client, ids) for ids in prompts]  # honest peers only, one session at a time
    settles = client.trust_layer.checker.stats.settles

    def answer_together() -> list[list[list[int]]]:
        """The prompts' sessions at once: the client bundles their decode steps to each peer of their routes."""
        client.loop.run(client.sequence.refresh_spans(force=True))
        with ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(lambda ids: client.generate(ids, max_new_tokens=TOKENS), prompts))
        client.loop.run(client.trust_layer.checker.drain())
        return [out[:, ids.shape[1]:].tolist() for out, ids in zip(answers, prompts)]

    # First hop of its routes (they pick it: one hop fewer, 10x the throughput), so the client's steps reach it
    # in bundles rather than pushed by another peer.
    cheater = checks_swarm.add_peer("0:20", "--adversary", "bundled-only", name="bundled-only")
    node, bundled, wrong = client.trust_layer.node, client.transport.bundled_steps, []
    for _ in range(MAX_ANSWERS):
        answers = answer_together()
        wrong.append(sum(answer != right for answer, right in zip(answers, expected)))
        if node.is_blacklisted(cheater.peer_id):
            break
    assert client.transport.bundled_steps > bundled
    assert cheater.peer_id in client.trust_layer.checker.stats.caught_after  # confirmed at fault on bundled steps
    assert node.is_blacklisted(cheater.peer_id), f"not caught in {len(wrong)} rounds"
    assert wrong == [0] * len(wrong)  # this strict client redid what the cheater touched before answering
    assert client.trust_layer.checker.stats.settles >= settles + len(prompts)
    assert answer_together() == expected
    _honest_never_blamed(client, checks_swarm)
    cheater.signal(2)


def test_three_sybils_on_an_honest_peers_span_never_get_it_blamed(checks_swarm, client, chat_ids):
    honest = checks_swarm.add_peer("0:30", name="honest-0:30")
    checks_swarm.honest.append(honest)
    node = client.trust_layer.node
    for seed in range(MAX_ANSWERS):  # the chains check its work, and this client comes to trust it
        assert _check_directly(client, honest, chat_ids, seed) == "pass"
        if node.score(honest.peer_id) >= ESTABLISHED:
            break
    assert node.score(honest.peer_id) >= ESTABLISHED
    sybils = checks_swarm.add_peers(*((f"sybil-{i}", "0:30", ("--adversary", "sybil")) for i in range(3)))
    honest_outcomes = []
    for round_ in range(MAX_ANSWERS):
        client.loop.run(client.sequence.refresh_spans(force=True))
        _answer(client, chat_ids)  # routes pick the Sybils (one hop, 10x the throughput)
        left = [s for s in sybils if not node.is_blacklisted(s.peer_id)]
        if not left:
            break
        _check_directly(client, left[round_ % len(left)], chat_ids, 10 + round_)  # a Sybil's work, whatever the routes
        honest_outcomes.append(_check_directly(client, honest, chat_ids, 20 + round_))  # and the honest peer's
    assert "fail" not in honest_outcomes
    stats = client.trust_layer.checker.stats
    sybil_ids = {s.peer_id for s in sybils}
    assert any(subject in sybil_ids and checker == honest.peer_id for subject, checker, *_ in stats.comparisons), \
        "the honest peer never faced a Sybil"
    _honest_never_blamed(client, checks_swarm)
    assert any(node.is_blacklisted(s.peer_id) for s in sybils)  # trusted chains referee them
    for sybil in sybils:
        sybil.signal(2)
