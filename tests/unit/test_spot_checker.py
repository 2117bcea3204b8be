"""The spot checker's decisions over a fake transport: routes of checkers, referees weighed by trust, who is
blamed, and which steps can be checked (any span, any declared configuration, padded batches, long sessions).

Peers are in-process fakes that sign real receipts (tests/unit/fake_swarm.py); the checker, the reputation
node, receipts and attestations are the real ones.
"""

from __future__ import annotations

import asyncio
import logging
import random

import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey

from fake_swarm import HIDDEN, FakePeer, FakeSwarm, run_blocks
from reputation.attest import Attestation
from reputation.checks import ESTABLISHED, SpotChecker
from reputation.node import ReputationConfig, ReputationNode
from reputation.tolerance import compare_updates, judge, pair_profile
from swarm.hooks import StepRecord
from swarm.protocol import StepRequest
from swarm.routing import RouteHop


def lie(output: torch.Tensor) -> torch.Tensor:
    return output + torch.randn_like(output)


def sybil_lie(output: torch.Tensor) -> torch.Tensor:
    """The same wrong output from every identity of one cheater: a fixed seeded perturbation."""
    direction = torch.randn(output.shape[-1], generator=torch.Generator().manual_seed(7))
    return output + 0.5 * direction


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


def checker_for(swarm: FakeSwarm, seed: int = 0, head=None, num_blocks: int | None = None, referees: int = 2,
                **options) -> tuple[SpotChecker, ReputationNode]:
    node = ReputationNode(RSAPrivateKey(), ReputationConfig(recompute_period=0.0, **options))
    node.known_peers.update(str(p.peer_id) for p in swarm.peers.values())  # as the client's trust layer does
    checker = SpotChecker(node, swarm, View(swarm), rng=random.Random(seed), check_rate=1.0, head=head,
                          num_blocks=num_blocks, referees=referees)
    return checker, node


def served_step(swarm: FakeSwarm, subject: FakePeer, tokens: int = 4, mask: torch.Tensor | None = None,
                seed: int = 1, start: int | None = None, end: int | None = None) -> StepRecord:
    """A stateless step the subject served (as a session's first step), with its receipt."""
    start, end = subject.start if start is None else start, subject.end if end is None else end
    batch = 1 if mask is None else mask.shape[0]
    inputs = torch.randn(batch, tokens, HIDDEN, generator=torch.Generator().manual_seed(seed))
    reply = asyncio.run(swarm.forward(subject.peer_id, start, end, inputs, mask=mask))
    return StepRecord("s", subject.peer_id, start, end, 0, inputs, reply.output, (inputs,), mask is not None,
                      reply.receipt, mask)


def session_step(swarm: FakeSwarm, subject: FakePeer, chunks: list[int], seed: int = 1) -> StepRecord:
    """The last step of a session whose steps sent `chunks` tokens each, as the session's observer sees it."""
    stream = swarm.open_stream(subject.peer_id)
    g = torch.Generator().manual_seed(seed)
    history, position = [], 0
    for size in chunks:
        inputs = torch.randn(1, size, HIDDEN, generator=g)
        meta = StepRequest(session_id=f"s{seed}", start=subject.start, end=subject.end, position=position,
                           max_length=sum(chunks))
        reply = asyncio.run(stream.step(meta, inputs))
        history.append(inputs)
        position += size
    return StepRecord(f"s{seed}", subject.peer_id, subject.start, subject.end, position - size, inputs, reply.output,
                      tuple(history), False, reply.receipt)


def check(checker: SpotChecker, record: StepRecord) -> str:
    return asyncio.run(checker.check(record))


def establish(swarm: FakeSwarm, checker: SpotChecker, *names: str) -> None:
    """Check honest peers' steps until this node trusts each of them (agreement at a cold start mints trust)."""
    for round_ in range(10):
        for name in names:
            check(checker, served_step(swarm, swarm.by_name(name), seed=100 + round_))
        checker.node.refresh(force=True)  # the background refresh, done here at once
        if all(checker.node.score(str(swarm.by_name(n).peer_id)) >= ESTABLISHED for n in names):
            return
    raise AssertionError("honest peers did not become trusted")


def never_blamed(node: ReputationNode, swarm: FakeSwarm, *names: str) -> None:
    for name in names:
        peer = str(swarm.by_name(name).peer_id)
        assert not node.is_blacklisted(peer), name
        assert not node.avoids(peer), name
        assert all(row.fails == 0 for row in node.standings() if row.peer_id == peer), name


# ---- who is blamed -----------------------------------------------------------------------------------


def test_an_honest_subject_passes_and_so_does_its_checker():
    swarm = FakeSwarm(FakePeer("subject", 0, 3, sign=True), FakePeer("checker", 0, 3, sign=True))
    checker, node = checker_for(swarm)
    assert check(checker, served_step(swarm, swarm.by_name("subject"))) == "pass"
    assert checker.stats.passes == 1 and checker.stats.faults == 0
    assert {row.peer_id: row.passes for row in node.standings()} == {str(p.peer_id): 1 for p in swarm.peers.values()}


def test_stats_weigh_the_work_served_and_the_work_checks_re_ran_by_blocks():
    swarm = FakeSwarm(FakePeer("subject", 0, 3, sign=True), FakePeer("checker", 0, 3, sign=True))
    checker, _ = checker_for(swarm)
    record = served_step(swarm, swarm.by_name("subject"), tokens=4)

    async def observe() -> None:  # as a session does: the checker sees the step, then checks it in the background
        checker.on_step(record)
        await checker.drain()

    asyncio.run(observe())
    stats = checker.stats
    assert stats.served == {str(record.peer_id): 1} and stats.served_block_tokens == 4 * 3
    assert stats.executions == 1 and stats.extra_blocks == 3  # one checker re-ran the 3 blocks
    assert stats.extra_block_tokens == 4 * 3  # on 4 tokens


def test_a_lying_subject_is_convicted_by_trusted_referees():
    swarm = FakeSwarm(*(FakePeer(n, 0, 3, sign=True) for n in ("checker", "ref1", "ref2")))
    checker, node = checker_for(swarm)
    establish(swarm, checker, "checker", "ref1", "ref2")
    liar = FakePeer("liar", 0, 3, sign=True, corrupt=lie)
    swarm.add(liar)
    forwards = sum(p.forwards for p in swarm.peers.values())
    assert check(checker, served_step(swarm, liar)) == "fail"
    assert checker.stats.faults == 1 and checker.stats.checker_faults == 0
    assert node.is_blacklisted(str(liar.peer_id))
    assert sum(p.forwards for p in swarm.peers.values()) - forwards == 1 + 3  # the step, a checker, two referees
    never_blamed(node, swarm, "checker", "ref1", "ref2")


def test_at_a_cold_start_the_referees_decide_once_their_agreement_made_them_trusted():
    # everybody is a newcomer: the referees that agreed with the checker vouch for each other, and their votes
    # are weighed again by that trust (agreement is all a cold start has to go on)
    swarm = FakeSwarm(*(FakePeer(n, 0, 3, sign=True) for n in ("checker", "ref1", "ref2")),
                      FakePeer("liar", 0, 3, sign=True, corrupt=lie))
    checker, node = checker_for(swarm)
    assert check(checker, served_step(swarm, swarm.by_name("liar"))) == "fail"
    assert node.is_blacklisted(str(swarm.by_name("liar").peer_id))
    never_blamed(node, swarm, "checker", "ref1", "ref2")


def test_an_unsettled_dispute_at_a_cold_start_still_keeps_the_contradicted_output_out():
    # the only referee lies too (differently): nobody agrees with anybody, so no trust is minted and nothing settles
    swarm = FakeSwarm(FakePeer("liar", 0, 3, sign=True, corrupt=lie), FakePeer("checker", 0, 3, sign=True),
                      FakePeer("other-liar", 0, 3, sign=True, corrupt=lie))
    checker, node = checker_for(swarm, referees=1)
    liar = str(swarm.by_name("liar").peer_id)
    assert check(checker, served_step(swarm, swarm.by_name("liar"))) == "inconclusive"
    assert not node.is_blacklisted(liar) and node.avoids(liar)  # not convicted, but this client uses it no more
    assert checker.stats.avoided == 1
    never_blamed(node, swarm, "checker")


def test_a_lying_checker_is_the_one_blamed_when_trusted_referees_side_with_the_subject():
    swarm = FakeSwarm(FakePeer("subject", 0, 3, sign=True), FakePeer("ref1", 0, 3, sign=True),
                      FakePeer("ref2", 0, 3, sign=True))
    checker, node = checker_for(swarm)
    establish(swarm, checker, "subject", "ref1", "ref2")
    subject = swarm.by_name("subject")
    record = served_step(swarm, subject)
    first_checker = {}
    real_forward = swarm.forward

    async def forward(peer_id, start, end, hidden, timeout=60.0, *, mask=None):
        if not first_checker:  # whoever is picked to check lies; the referees after it do not
            first_checker["peer"] = peer_id
            swarm.peers[peer_id].corrupt = lie
        return await real_forward(peer_id, start, end, hidden, timeout, mask=mask)

    swarm.forward = forward
    assert check(checker, record) == "pass"
    assert checker.stats.checker_faults == 1
    assert node.is_blacklisted(str(first_checker["peer"]))
    never_blamed(node, swarm, "subject")


def test_a_disagreement_without_referees_is_inconclusive_and_blames_nobody():
    swarm = FakeSwarm(FakePeer("liar", 0, 3, sign=True, corrupt=lie), FakePeer("checker", 0, 3, sign=True))
    checker, node = checker_for(swarm)
    assert check(checker, served_step(swarm, swarm.by_name("liar"))) == "inconclusive"
    assert node.blacklisted() == frozenset()
    assert not node.avoids(str(swarm.by_name("liar").peer_id))  # one untrusted word against another


def test_newcomers_agreeing_with_each_other_earn_nothing_once_trusted_peers_are_around():
    swarm = FakeSwarm(FakePeer("a", 0, 3, sign=True), FakePeer("b", 0, 3, sign=True), FakePeer("c", 1, 3, sign=True))
    checker, node = checker_for(swarm)
    establish(swarm, checker, "a", "b", "c")
    swarm.dead |= {"a", "b"}  # trusted peers of blocks 0:2 leave (one stays on 1:3); two newcomers serve 0:2 now
    swarm.add(FakePeer("new1", 0, 2, sign=True), FakePeer("new2", 0, 2, sign=True))
    node.known_peers.update(str(p.peer_id) for p in swarm.peers.values())
    for seed in range(3):
        assert check(checker, served_step(swarm, swarm.by_name("new1"), seed=seed)) == "inconclusive"
    assert node.score(str(swarm.by_name("new1").peer_id)) == 0.0
    assert node.score(str(swarm.by_name("new2").peer_id)) == 0.0


# ---- a Sybil majority on an honest peer's span --------------------------------------------------------


@pytest.mark.parametrize("trusted_chains", [False, True], ids=["alone", "with-trusted-chains"])
def test_three_colluding_identities_never_get_the_honest_peer_blamed(trusted_chains):
    # The honest peer was checked (and trusted) before the Sybils arrived, against a peer that has left since.
    swarm = FakeSwarm(FakePeer("honest", 0, 4, sign=True), FakePeer("earlier", 0, 4, sign=True))
    chains = ("left1", "right1", "left2", "right2") if trusted_chains else ()
    if trusted_chains:  # honest peers on other spans whose chained routes cover the span too
        swarm.add(*(FakePeer(name, *((0, 2) if name.startswith("left") else (2, 4)), sign=True) for name in chains))
    checker, node = checker_for(swarm)
    establish(swarm, checker, "honest", "earlier", *chains)
    swarm.dead.add("earlier")
    sybils = [FakePeer(f"sybil{i}", 0, 4, sign=True, corrupt=sybil_lie) for i in range(3)]
    swarm.add(*sybils)
    node.known_peers.update(str(p.peer_id) for p in swarm.peers.values())
    rng = random.Random(3)
    outcomes: dict[str, list[str]] = {"honest": [], "sybil": []}
    for round_ in range(30):
        name = rng.choice(["honest", "sybil0", "sybil1", "sybil2"])
        subject = swarm.by_name(name)
        if name != "honest" and node.is_blacklisted(str(subject.peer_id)):
            continue  # routes never use it again
        outcomes["honest" if name == "honest" else "sybil"].append(check(checker, served_step(swarm, subject, seed=round_)))
    never_blamed(node, swarm, "honest", *chains)
    assert outcomes["honest"] and "fail" not in outcomes["honest"]
    assert "pass" not in outcomes["sybil"]  # their agreement with each other verifies nothing
    if trusted_chains:  # trusted referees exist: the Sybils are caught
        assert all(node.is_blacklisted(str(s.peer_id)) for s in sybils)


# ---- any span, any configuration, any request shape ----------------------------------------------------


def test_a_peer_on_a_span_nobody_else_serves_is_checked_through_a_chained_route():
    honest = [FakePeer(f"{side}{i}", *blocks, sign=True) for i in (1, 2) for side, blocks in (("a", (0, 2)), ("b", (2, 4)))]
    swarm = FakeSwarm(*honest)
    checker, node = checker_for(swarm)
    for i in (1, 2):  # chains check each other: a1 is checked by a2, b1 by b2...
        establish(swarm, checker, f"a{i}", f"b{i}")
    liar = FakePeer("liar", 0, 3, sign=True, corrupt=lie)  # blocks 0:3: nobody else covers exactly that
    swarm.add(liar)
    node.known_peers.add(str(liar.peer_id))
    assert check(checker, served_step(swarm, liar)) == "fail"
    assert checker.stats.chained >= 1
    assert node.is_blacklisted(str(liar.peer_id))
    never_blamed(node, swarm, *(p.name for p in honest))
    # and an honest peer on such a span passes
    unique = FakePeer("unique", 1, 3, sign=True)
    swarm.add(unique)
    assert check(checker, served_step(swarm, unique)) == "pass"


def test_a_chained_checker_route_that_disagrees_is_not_blamed_but_the_subject_passes():
    swarm = FakeSwarm(*(FakePeer(n, 0, 4, sign=True) for n in ("subject", "ref1", "ref2")),
                      FakePeer("left", 0, 2, sign=True), FakePeer("right", 2, 4, sign=True))
    checker, node = checker_for(swarm)
    establish(swarm, checker, "subject", "ref1", "ref2", "left", "right")
    swarm.by_name("right").corrupt = lie  # one hop of the chain goes wrong
    real_candidates, chain = checker._candidates, [RouteHop(swarm.by_name("left").peer_id, 0, 2),
                                                   RouteHop(swarm.by_name("right").peer_id, 2, 4)]

    def chain_first(record, subject, exclude):  # as if the chain were the best route to check the subject
        routes = real_candidates(record, subject, exclude)
        return [chain, *routes] if checker.stats.chained == 0 and not exclude - {str(record.peer_id)} else routes

    checker._candidates = chain_first
    assert check(checker, served_step(swarm, swarm.by_name("subject"), seed=5)) == "pass"
    assert checker.stats.chained >= 1 and checker.stats.checker_faults == 0
    assert node.blacklisted() == frozenset()  # which hop erred is unknown: nobody is blamed


def test_a_peer_declaring_a_compression_nobody_else_declares_is_checked_across_configurations():
    swarm = FakeSwarm(*(FakePeer(n, 0, 3, sign=True, dtype=d) for n, d in
                        (("fp32", "float32"), ("bf16", "bfloat16"), ("fp32b", "float32"))))
    checker, node = checker_for(swarm)
    establish(swarm, checker, "fp32", "bf16", "fp32b")
    honest_int8 = FakePeer("int8", 0, 3, sign=True, compression="int8")
    liar = FakePeer("liar-int8", 0, 3, sign=True, compression="int8", corrupt=lie)
    swarm.add(honest_int8)
    node.known_peers.add(str(honest_int8.peer_id))
    assert check(checker, served_step(swarm, honest_int8)) == "pass"  # honest int8 vs fp32: within the pair's tolerance
    swarm.dead.add("int8")
    swarm.add(liar)
    node.known_peers.add(str(liar.peer_id))
    assert check(checker, served_step(swarm, liar)) == "fail"
    assert node.is_blacklisted(str(liar.peer_id))
    assert checker.stats.unverifiable == 0
    never_blamed(node, swarm, "fp32", "bf16", "fp32b", "int8")


def test_a_same_configuration_checker_is_preferred():
    swarm = FakeSwarm(FakePeer("bf16-a", 0, 3, sign=True, dtype="bfloat16"),
                      FakePeer("bf16-b", 0, 3, sign=True, dtype="bfloat16"),
                      FakePeer("fp32", 0, 3, sign=True))
    checker, node = checker_for(swarm)
    establish(swarm, checker, "bf16-a", "bf16-b", "fp32")
    swarm.calls.clear()
    for seed in range(5):
        assert check(checker, served_step(swarm, swarm.by_name("bf16-a"), seed=seed)) == "pass"
    assert {c[1] for c in swarm.calls if c[0] == "forward"} == {"bf16-a", "bf16-b"}  # the subject and its twin


def test_padded_batches_are_checked_with_their_mask():
    swarm = FakeSwarm(*(FakePeer(n, 0, 3, sign=True) for n in ("honest", "checker", "ref1", "ref2")))
    checker, node = checker_for(swarm)
    establish(swarm, checker, "honest", "checker", "ref1", "ref2")
    mask = torch.ones(2, 6, dtype=torch.int64)
    mask[1, :3] = 0  # the second prompt is left-padded
    assert check(checker, served_step(swarm, swarm.by_name("honest"), tokens=6, mask=mask)) == "pass"
    cheater = FakePeer("padded-only", 0, 3, sign=True, corrupt_padded=lie)
    swarm.add(cheater)
    node.known_peers.add(str(cheater.peer_id))
    assert check(checker, served_step(swarm, cheater, tokens=6)) == "pass"  # honest on unpadded requests
    assert check(checker, served_step(swarm, cheater, tokens=6, mask=mask)) == "fail"
    assert checker.stats.padded >= 2
    assert node.is_blacklisted(str(cheater.peer_id))


@pytest.mark.parametrize("chunks", [[20], [12, 1], [30, 5, 1, 1]], ids=["position-0", "position-12", "position-36"])
def test_long_sessions_are_checked_in_chunks_at_any_position(chunks):
    swarm = FakeSwarm(*(FakePeer(n, 0, 3, sign=True) for n in ("subject", "checker", "ref1", "ref2")))
    checker, node = checker_for(swarm)
    cap = 4 * 6 * HIDDEN  # messages of at most six fp32 tokens: every history here is longer
    checker.chunk_bytes = cap
    record = session_step(swarm, swarm.by_name("subject"), chunks)
    swarm.max_message_bytes = cap  # a history in one message would be refused now
    assert check(checker, record) == "pass"
    assert checker.stats.chunked == 1 and checker.stats.unverifiable == 0
    establish(swarm, checker, "checker", "ref1", "ref2")
    swarm.max_message_bytes = None
    swarm.by_name("subject").corrupt = lie
    liar_record = session_step(swarm, swarm.by_name("subject"), chunks, seed=9)
    swarm.max_message_bytes = cap
    assert check(checker, liar_record) == "fail"


# ---- checks that cannot run are never silent -----------------------------------------------------------


def test_a_step_with_no_other_route_is_unverifiable_and_says_so(caplog):
    swarm = FakeSwarm(FakePeer("alone", 0, 3, sign=True), FakePeer("elsewhere", 3, 6, sign=True))
    checker, _ = checker_for(swarm)
    with caplog.at_level(logging.INFO, logger="reputation.checks"):
        assert check(checker, served_step(swarm, swarm.by_name("alone"))) == "unverifiable"
    assert checker.stats.unverifiable == 1
    assert any(r.levelno >= logging.INFO and "could not run" in r.getMessage() and "0:3" in r.getMessage()
               for r in caplog.records)


class FakeLocalBlocks:
    """What `swarm.local_blocks.LocalBlocks` offers the checker, over the fake blocks: this client's own run."""

    dtype_name = "float32"

    def __init__(self, budget_blocks: int):
        self.budget_blocks, self.runs = budget_blocks, 0

    def fits(self, start: int, end: int) -> bool:
        return end - start <= self.budget_blocks

    def run(self, start, end, hidden, attention_mask=None, prompts=None):
        self.runs += 1
        return run_blocks(start, end, hidden, attention_mask, prompts)


@pytest.mark.parametrize("corrupt, outcome", [(None, "pass"), (lie, "fail")])
def test_a_client_with_memory_to_spare_checks_a_hop_nobody_else_serves_itself(corrupt, outcome, caplog):
    swarm = FakeSwarm(FakePeer("alone", 0, 3, sign=True, corrupt=corrupt), FakePeer("elsewhere", 3, 6, sign=True))
    checker, node = checker_for(swarm)
    checker.local = FakeLocalBlocks(budget_blocks=3)
    alone = str(swarm.by_name("alone").peer_id)
    with caplog.at_level(logging.WARNING, logger="reputation.checks"):
        assert check(checker, served_step(swarm, swarm.by_name("alone"))) == outcome
    assert checker.local.runs == 1 and checker.stats.local == 1 and checker.stats.unverifiable == 0
    node.refresh(force=True)
    assert node.is_blacklisted(alone) == (outcome == "fail")
    if outcome == "fail":
        assert any("confirmed by this client's own run" in r.getMessage() for r in caplog.records)
    assert checker._verifiable(alone, 0, 3)  # its work earns credit: it could be checked


def test_a_hop_larger_than_the_clients_budget_for_local_blocks_stays_unverifiable():
    swarm = FakeSwarm(FakePeer("alone", 0, 3, sign=True, corrupt=lie), FakePeer("elsewhere", 3, 6, sign=True))
    checker, node = checker_for(swarm)
    checker.local = FakeLocalBlocks(budget_blocks=2)
    assert check(checker, served_step(swarm, swarm.by_name("alone"))) == "unverifiable"
    assert checker.local.runs == 0 and not checker._verifiable(str(swarm.by_name("alone").peer_id), 0, 3)


def test_a_hop_others_serve_is_checked_on_their_route_not_on_local_blocks():
    swarm = FakeSwarm(FakePeer("subject", 0, 3, sign=True), FakePeer("checker", 0, 3, sign=True))
    checker, _ = checker_for(swarm)
    checker.local = FakeLocalBlocks(budget_blocks=3)
    assert check(checker, served_step(swarm, swarm.by_name("subject"))) == "pass"
    assert checker.local.runs == 0 and checker.stats.executions == 1


def test_a_checker_that_fails_is_replaced_and_a_check_with_none_left_is_unverifiable():
    swarm = FakeSwarm(*(FakePeer(n, 0, 3, sign=True) for n in ("subject", "flaky", "steady")))
    checker, _ = checker_for(swarm)
    record = served_step(swarm, swarm.by_name("subject"))

    async def announced():  # a peer that just died is still announced
        return [p.span for p in swarm.peers.values()]

    swarm.read = announced
    swarm.dead.add("flaky")
    assert check(checker, record) == "pass"
    swarm.dead.add("steady")
    assert check(checker, record) == "unverifiable"
    assert checker.stats.unverifiable_reasons["the checker route failed"] == 1


def test_a_step_whose_receipt_does_not_match_its_tensors_is_unverifiable():
    swarm = FakeSwarm(FakePeer("subject", 0, 3, sign=True), FakePeer("checker", 0, 3, sign=True))
    checker, _ = checker_for(swarm)
    record = served_step(swarm, swarm.by_name("subject"))
    tampered = StepRecord(record.session_id, record.peer_id, record.start, record.end, record.position,
                          record.inputs, record.output + 1.0, record.history, record.padded, record.receipt)
    assert check(checker, tampered) == "unverifiable"
    assert checker.stats.bad_receipts == 1 and checker.stats.unverifiable == 1


def test_a_padded_step_without_its_mask_is_unverifiable():
    swarm = FakeSwarm(FakePeer("subject", 0, 3, sign=True), FakePeer("checker", 0, 3, sign=True))
    checker, _ = checker_for(swarm)
    mask = torch.ones(2, 4, dtype=torch.int64)
    mask[0, 0] = 0
    record = served_step(swarm, swarm.by_name("subject"), mask=mask)
    stripped = StepRecord(record.session_id, record.peer_id, record.start, record.end, record.position,
                          record.inputs, record.output, record.history, True, record.receipt, None)
    assert check(checker, stripped) == "unverifiable"


def test_a_check_weighs_every_peer_by_the_trust_it_had_when_the_check_began():
    # A fresh client: its first check passes at a cold start and vouches for both peers. When the background
    # refresh publishes that while the next check's execution is under way, the next check must not weigh the
    # checker by the old snapshot (untrusted) and the subject by the new one (trusted): it would find "agreement
    # with an untrusted peer" and leave an honest step unverified.
    swarm = FakeSwarm(FakePeer("a", 0, 3, sign=True), FakePeer("b", 0, 3, sign=True))
    checker, node = checker_for(swarm)
    assert check(checker, served_step(swarm, swarm.by_name("a"))) == "pass"
    real_forward = swarm.forward

    async def forward(peer_id, start, end, hidden, timeout=60.0, *, mask=None):
        node.refresh(force=True)  # the background refresh lands during the checker's execution
        return await real_forward(peer_id, start, end, hidden, timeout, mask=mask)

    record = served_step(swarm, swarm.by_name("a"), seed=2)
    swarm.forward = forward
    assert check(checker, record) == "pass"
    assert checker.stats.inconclusive == 0

# ---- the effect check: a steer inside the tolerance is caught by what it does to the answer ----------------


def knife_edge(inputs: torch.Tensor, lead: float = 10.0):
    """(a head, a steer) for the hop 0:3 on `inputs`. The head has two tokens whose lead hangs on one direction u,
    along which the honest output at the last position sits just 0.002 of its update's norm on token 1's side,
    where token 1 leads by `lead` logits; the steer moves the last position across, to as far on token 0's side: a
    push of 0.004 of the update, far inside any tolerance (a real LM head's leads also hang on directions an
    update barely moves)."""
    honest = run_blocks(0, 3, inputs)[0, -1]
    offset = 0.002 * float((honest - inputs[0, -1]).norm())
    u = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(11))
    u = u / u.norm()
    edge = float(honest @ u) - offset  # token 1 wins on this side of the edge ...
    scale = lead / offset  # ... by `lead` logits at the honest output

    def head(hidden: torch.Tensor) -> torch.Tensor:  # (batch, tokens, hidden) -> (batch, tokens, 2)
        side = scale * (hidden.float() @ u - edge)
        return torch.stack([torch.zeros_like(side), side], dim=-1)

    def steer(output: torch.Tensor) -> torch.Tensor:
        steered = output.clone()
        across = (steered[:, -1] @ u - edge + offset)[:, None]  # to `offset` on token 0's side
        steered[:, -1] = steered[:, -1] - across * u
        return steered

    return head, steer


def test_a_steer_inside_the_tolerance_fails_by_its_effect_on_the_answer():
    inputs = torch.randn(1, 4, HIDDEN, generator=torch.Generator().manual_seed(1))  # served_step's (seed 1)
    head, steer = knife_edge(inputs)
    swarm = FakeSwarm(*(FakePeer(n, 0, 3, sign=True) for n in ("checker", "ref1", "ref2")))
    checker, node = checker_for(swarm, head=head, num_blocks=3)
    establish(swarm, checker, "checker", "ref1", "ref2")  # honest steps pass the effect check too
    assert checker.stats.effect_checks > 0 and checker.stats.effect_fails == 0 and checker.stats.faults == 0
    steering = FakePeer("steer", 0, 3, sign=True, corrupt=steer)
    swarm.add(steering)
    node.known_peers.add(str(steering.peer_id))
    record = served_step(swarm, steering)
    honest = run_blocks(0, 3, inputs)
    fp32 = pair_profile(("float32", "none"), ("float32", "none"))
    agreement = compare_updates(inputs, honest, record.output)
    assert agreement.rel_l2 < 0.01 and judge(agreement, fp32) == "pass"  # the tolerance alone lets it through
    assert int(head(honest[:, -1:]).argmax()) == 1 and int(head(record.output[:, -1:]).argmax()) == 0
    assert check(checker, record) == "fail"
    assert checker.stats.effect_only >= 2  # the checker and the referees saw the answer change
    assert node.is_blacklisted(str(steering.peer_id))
    never_blamed(node, swarm, "checker", "ref1", "ref2")
    (fault,) = [a for kind, data in node.messages() if kind == "attestation"
                for a in [Attestation.decode(data)] if a.verdict == "fail"]
    assert fault.subject == str(steering.peer_id) and fault.profile == "fp32~fp32+effect"
    assert fault.evidence is not None and fault.evidence.matches(fault.receipt)  # the step, to re-run without it


def test_the_effect_check_applies_only_to_hops_that_end_at_the_last_block():
    inputs = torch.randn(1, 4, HIDDEN, generator=torch.Generator().manual_seed(1))
    head, steer = knife_edge(inputs)
    swarm = FakeSwarm(FakePeer("steer", 0, 3, sign=True, corrupt=steer), FakePeer("checker", 0, 3, sign=True))
    record = served_step(swarm, swarm.by_name("steer"))
    for head_given, num_blocks in ((head, 4), (None, 3)):  # blocks 0:3 of a 4-block model; no head given
        checker, _ = checker_for(swarm, head=head_given, num_blocks=num_blocks)
        assert check(checker, record) == "pass"  # within the tolerance, which is all that applies
        assert checker.stats.effect_checks == 0
