"""The trust layer live on loopback: real peers (three honest, fp32 and bf16; adversaries started per test),
real clients that spot-check, gossip between them, blacklists, and the status and rewards commands."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from hivemind.p2p import PeerID

from peers.local import LocalSwarm
from reputation.spotcheck import responses_to_detect
from swarm import DistributedModelForCausalLM
from swarm.models import DEFAULT_MODEL

pytestmark = pytest.mark.slow

ANSWER = "The capital of France is Paris."
GOSSIP = ("--gossip-period", "1")


@pytest.fixture(scope="module")
def trust_swarm():
    """Three honest peers serving every block: two in float32, one in bfloat16."""
    with LocalSwarm(model=DEFAULT_MODEL) as swarm:
        swarm.honest = swarm.add_peers(
            ("honest-fp32-a", "0:30", GOSSIP),
            ("honest-bf16", "0:30", (*GOSSIP, "--dtype", "bfloat16")),
            ("honest-fp32-b", "0:30", GOSSIP),
        )
        yield swarm


def _client(swarm, **options) -> DistributedModelForCausalLM:
    """A client that believes announced throughputs, so that adversaries (10x theirs) draw its traffic."""
    return DistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, [swarm.initial_peers], gossip_period=1.0,
                                                        route_on_evidence=False, **options)


@pytest.fixture(scope="module")
def checker_client(trust_swarm):
    """The client that does the checking (adaptive check rates: newcomers at 0.3)."""
    model = _client(trust_swarm)
    yield model
    model.shutdown()


def _answer(model, chat_ids, tokens: int = 8) -> str:
    out = model.generate(chat_ids, max_new_tokens=tokens)
    model.loop.run(model.trust_layer.checker.drain())
    return model.tokenizer.decode(out[0, chat_ids.shape[1]:], skip_special_tokens=True)


def _wait(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return condition()


def _honest_never_flagged(model, swarm) -> None:
    for peer in swarm.honest:
        assert not model.trust_layer.node.is_blacklisted(peer.peer_id), f"{peer.name} was blacklisted"
    rows = {row.peer_id: row for row in model.trust_layer.node.standings()}
    for peer in swarm.honest:
        assert rows.get(peer.peer_id) is None or rows[peer.peer_id].fails == 0, f"{peer.name} was found at fault"


def _route_through_until_avoided(model, peer, others) -> None:
    """`model`'s routes leave `others` out until its trust layer avoids `peer`, so they go through `peer` whatever
    the throughputs announced: a 10x boast over a throughput measured while the machine was busy need not win.
    Spot checks still re-run `peer`'s work on `others` (they do not route through `make_route`)."""
    excluded_first = frozenset(PeerID.from_base58(p.peer_id) for p in others)
    make_route = model.sequence.make_route

    async def through_peer(start=0, end=None, excluded=frozenset(), *args, **kwargs):
        if not model.trust_layer.node.avoids(peer.peer_id):
            excluded = excluded | excluded_first
        return await make_route(start, end, excluded, *args, **kwargs)

    model.sequence.make_route = through_peer


def test_occasional_cheater_is_caught_as_the_formula_predicts(trust_swarm, chat_ids) -> None:
    # first in the module, so no other adversary is running yet
    p, q = 0.5, 0.1
    cheater = trust_swarm.add_peer("0:30", *GOSSIP, "--adversary", f"cheat:{q}", name="cheater")
    model = _client(trust_swarm, check_rate=p)
    bound = responses_to_detect(p, q, confidence=0.999)
    try:
        stats = model.trust_layer.checker.stats
        while not model.trust_layer.node.is_blacklisted(cheater.peer_id) and stats.responses[cheater.peer_id] < bound:
            _answer(model, chat_ids, tokens=16)
        assert model.trust_layer.node.is_blacklisted(cheater.peer_id), f"not caught within {bound} responses"
        assert stats.caught_after[cheater.peer_id] <= bound
        assert stats.skipped == 0  # every chosen check ran, so the check rate in use was p
        assert _answer(model, chat_ids) == ANSWER
        _honest_never_flagged(model, trust_swarm)
        assert sum(n for (a, b), n in stats.pairs.items() if {a, b} == {"float32", "bfloat16"}) >= 1
    finally:
        model.shutdown()
        cheater.signal(2)


def test_random_output_peer_is_blacklisted_and_avoided(trust_swarm, checker_client, chat_ids) -> None:
    liar = trust_swarm.add_peer("0:30", *GOSSIP, "--adversary", "random", name="random-output")
    stats = checker_client.trust_layer.checker.stats
    node = checker_client.trust_layer.node
    _route_through_until_avoided(checker_client, liar, trust_swarm.honest)
    for _ in range(20):  # routes take it until it is caught
        _answer(checker_client, chat_ids)
        if node.is_blacklisted(liar.peer_id) or stats.responses[liar.peer_id] >= 100:
            break
    assert node.is_blacklisted(liar.peer_id)
    assert 1 <= stats.caught_after[liar.peer_id] <= 100
    served = stats.responses[liar.peer_id]
    for _ in range(3):  # once blacklisted it is never routed to, and answers are right again
        assert _answer(checker_client, chat_ids) == ANSWER
    assert stats.responses[liar.peer_id] == served
    _honest_never_flagged(checker_client, trust_swarm)


class RecordRewinds:
    """A streamer that only records the rewinds of the answers it follows."""

    def __init__(self):
        self.rewinds: list[int] = []

    def put(self, value) -> None:
        pass

    def rewind(self, kept_new_tokens: int) -> None:
        self.rewinds.append(kept_new_tokens)

    def end(self) -> None:
        pass


class WaitForChecksAtFirstToken(RecordRewinds):
    """At the first generated token, waits for the spot checks under way, so the verdict on a cheating peer
    lands while the answer is being written."""

    def __init__(self, model: DistributedModelForCausalLM):
        super().__init__()
        self.model, self.waiting = model, False

    def put(self, value) -> None:
        if value.ndim == 2:  # the prompt: a new answer begins
            self.waiting = True
        elif self.waiting:
            self.waiting = False
            self.model.loop.run(self.model.trust_layer.checker.drain())

    def rewind(self, kept_new_tokens: int) -> None:
        super().rewind(kept_new_tokens)
        if kept_new_tokens == 0:  # written again from its first token (after another cheater was caught): wait there too
            self.waiting = True


def _answer_through_a_new_liar(swarm, checker_client, chat_ids, tokens: int, make_streamer,
                               **options) -> tuple[str, RecordRewinds]:
    """Start a random-output peer nobody has heard of and a new client that checks every step, and answer until
    an answer's route went through the liar (it advertises 10x throughput, so the first route should); returns
    that answer and its streamer. The liar may instead be caught as a checker of another peer's step before any
    route used it; then it is tried once more with a fresh liar and client."""
    others = [p for p in swarm.processes if p.name == "random-output"]  # the module's other liar, if running
    if others:  # learn of it from the checking client (as a seed): an accusation, which its own checks confirm
        checker_client.loop.run(checker_client.trust_layer.sync())
        options["trusted_peers"] = (checker_client.trust_layer.node.peer_id,)
    for attempt in range(2):
        liar = swarm.add_peer("0:30", *GOSSIP, "--adversary", "random", name=f"random-output-{tokens}-{attempt}")
        model = _client(swarm, check_rate=1.0, **options)
        try:
            node = model.trust_layer.node
            for other in others:
                assert _wait(lambda: node.is_accused(other.peer_id) or node.is_blacklisted(other.peer_id)), \
                    "no verdict by gossip"
            for _ in range(3):
                streamer = make_streamer(model)
                session = model.inference_session(max_length=chat_ids.shape[1] + tokens)
                with session:
                    out = model.generate(chat_ids, max_new_tokens=tokens, streamer=streamer, session=session)
                answer = model.tokenizer.decode(out[0, chat_ids.shape[1]:], skip_special_tokens=True)
                if any(event.peer_id == liar.peer_id for event in session.inner.failovers):
                    assert model.trust_layer.node.avoids(liar.peer_id)  # blacklisted, or disputed at a cold start
                    return answer, streamer
                assert answer == ANSWER[: len(answer)]  # not through the liar: right all the same
                if model.trust_layer.node.avoids(liar.peer_id):
                    break  # caught as a checker: no route will use it now
        finally:
            model.shutdown()
            liar.signal(2)
    raise AssertionError("no route went through a random-output peer before it was caught")


def test_an_answer_keeps_nothing_from_a_peer_caught_while_writing_it(trust_swarm, checker_client, chat_ids) -> None:
    answer, streamer = _answer_through_a_new_liar(trust_swarm, checker_client, chat_ids, 16, WaitForChecksAtFirstToken,
                                                  settle_checks=False)
    assert answer == ANSWER
    # everything a liar touched was dropped and written again (the module's other liar may be the replacement)
    assert streamer.rewinds and set(streamer.rewinds) == {0}


def test_an_answer_is_verified_before_it_is_returned(trust_swarm, checker_client, chat_ids) -> None:
    # with one token, the liar can be caught only once the answer is complete
    answer, streamer = _answer_through_a_new_liar(trust_swarm, checker_client, chat_ids, 1, lambda model: RecordRewinds())
    assert answer == ANSWER.split()[0]
    assert streamer.rewinds and set(streamer.rewinds) == {0}


def test_a_verdict_spreads_by_gossip_as_an_accusation_that_the_receivers_own_checks_confirm(
    trust_swarm, checker_client, chat_ids
) -> None:
    liar = next(p for p in trust_swarm.processes if p.name == "random-output")
    assert checker_client.trust_layer.node.is_blacklisted(liar.peer_id)
    other = _client(trust_swarm, trusted_peers=(checker_client.trust_layer.node.peer_id,))
    node = other.trust_layer.node
    _route_through_until_avoided(other, liar, trust_swarm.honest)
    try:
        assert _wait(lambda: node.is_accused(liar.peer_id)), "the verdict did not arrive by gossip"
        assert not node.is_blacklisted(liar.peer_id)  # no signer's word alone convicts, not even a seed's
        assert node.check_rate(liar.peer_id) == 1.0  # ... it is checked on every reply instead
        stats = other.trust_layer.checker.stats
        for _ in range(12):  # routes take it until this client's checks catch it
            assert _answer(other, chat_ids) == ANSWER  # what it touched is checked, dropped and written again
            if node.is_blacklisted(liar.peer_id):
                break
        served = stats.served[liar.peer_id]
        assert served > 0, "no route of this client used the accused peer"
        assert node.is_blacklisted(liar.peer_id), (f"served {served} steps and not caught ({stats.checks} checks, "
                                                   f"{stats.inconclusive} inconclusive, {stats.unverifiable} unverifiable)")
        assert not node.is_accused(liar.peer_id)
        _honest_never_flagged(other, trust_swarm)
    finally:
        other.shutdown()


def test_status_and_rewards_show_trust(trust_swarm, checker_client) -> None:
    liar = next(p for p in trust_swarm.processes if p.name == "random-output")
    checker_client.loop.run(checker_client.trust_layer.sync())  # push this client's verdicts and work now
    env = {**trust_swarm.env, "SWARM_TRUSTED_PEERS": checker_client.trust_layer.node.peer_id}
    status = subprocess.run([sys.executable, "-m", "peers.cli", "status"], env=env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    header = next(line for line in status.stdout.splitlines() if line.startswith("blocks"))
    assert header.split()[-1] == "trust"
    liar_row = next(line for line in status.stdout.splitlines() if liar.peer_id in line)
    assert liar_row.rstrip().endswith("ACCUSED")  # the seed's verdict; this view checks nobody, so it convicts nobody
    for peer in trust_swarm.honest:
        row = next(line for line in status.stdout.splitlines() if peer.peer_id in line)
        assert not row.rstrip().endswith(("BLACKLISTED", "ACCUSED"))
    rewards = subprocess.run([sys.executable, "-m", "peers.cli", "rewards"], env=env, capture_output=True, text=True, timeout=120)
    assert rewards.returncode == 0, rewards.stderr
    rows = {line.split()[0]: line.split() for line in rewards.stdout.splitlines()[1:] if line.startswith("Qm")}
    assert rows[liar.peer_id][-1] == "ACCUSED" and float(rows[liar.peer_id][5]) == 0.0  # nothing pending
    assert any(float(rows[p.peer_id][5]) > 0 for p in trust_swarm.honest if p.peer_id in rows)  # honest work credited


def test_colluding_liar_accusations_are_refuted(trust_swarm, checker_client, chat_ids) -> None:
    liar = next(p for p in trust_swarm.processes if p.name == "random-output")
    colluder = trust_swarm.add_peer("0:30", *GOSSIP, "--adversary", "collude", "--fellows", liar.peer_id, name="colluder")
    node = checker_client.trust_layer.node
    assert _wait(lambda: node.accuser_record(colluder.peer_id).accusations >= 1, timeout=60), "no accusation arrived"
    for _ in range(10):
        _answer(checker_client, chat_ids)
        if node.accuser_record(colluder.peer_id).refuted >= 1:
            break
    record = node.accuser_record(colluder.peer_id)
    assert record.refuted >= 1, record
    assert node.is_blacklisted(liar.peer_id)  # vouching for a cheater does not lift its ban
    _honest_never_flagged(checker_client, trust_swarm)
    assert _answer(checker_client, chat_ids) == ANSWER
