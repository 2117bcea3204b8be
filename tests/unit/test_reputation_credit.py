"""Credit that cannot be minted, end to end on the client: the tokens a session sent through each hop (replays,
re-sends and rollbacks included), countersigned at close; inflated receipts are faults; unverifiable hops earn
nothing. Sessions run over the fake swarm, whose peers sign real receipts counting their work per stream, as
real peers do (tests/unit/fake_swarm.py)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import torch
from hivemind.utils.crypto import RSAPrivateKey

from fake_swarm import HIDDEN, FakePeer, FakeSwarm
from reputation.attest import Countersigned
from reputation.checks import SpotChecker
from reputation.node import ReputationNode
from reputation.sent_tokens import SentTokens
from swarm.config import ClientConfig
from swarm.hooks import StepRecord
from swarm.sequence import RemoteSequence
from swarm.session import InferenceSession

CFG = ClientConfig(initial_peers=(), missing_blocks_timeout=0.0, request_timeout=5.0)
PROMPT = torch.randn(1, 5, HIDDEN, generator=torch.Generator().manual_seed(0))


class View:
    def __init__(self, swarm: FakeSwarm):
        self.swarm = swarm
        self.spans = asyncio.run(swarm.read())

    async def refresh_spans(self, force: bool = False):
        self.spans = await self.swarm.read()
        return self.spans

    def banned(self):
        return frozenset()


class Blacklist:
    def __init__(self):
        self.peers: set[str] = set()

    def is_blacklisted(self, peer_id: str) -> bool:
        return peer_id in self.peers

    def avoids(self, peer_id: str) -> bool:
        return self.is_blacklisted(peer_id)

    def score(self, peer_id: str) -> float:
        return 1.0


def swarm_of(**peers: tuple[int, int, dict]) -> FakeSwarm:
    return FakeSwarm(*(FakePeer(name, start, end, sign=True, **options) for name, (start, end, options) in peers.items()))


def run_session(swarm: FakeSwarm, steps: int = 4, trust: Blacklist | None = None, before_step=None, batch: int = 1):
    """One session through the swarm with a SpotChecker that never checks; returns its node and the swarm's calls."""
    node = ReputationNode(RSAPrivateKey())
    checker = SpotChecker(node, swarm, View(swarm), rng=random.Random(0), check_rate=0.0)
    sequence = RemoteSequence(swarm, swarm, "fake", 6, CFG)
    if trust is not None:
        sequence.use_trust(trust)
    session = InferenceSession(sequence, swarm, 64, observer=checker)

    async def scenario():
        hidden = PROMPT.expand(batch, -1, -1).contiguous()
        for index in range(steps + 1):
            if before_step is not None:
                before_step(index, session)
            hidden = (await session.step(hidden)).hidden[:, -1:]
        await session.close()

    asyncio.run(scenario())
    return node


def countersigned(node: ReputationNode) -> list[Countersigned]:
    return [Countersigned.decode(data) for kind, data in node.messages() if kind == "work"]


def computed(swarm: FakeSwarm, batch: int = 1) -> Counter:
    """batch x tokens each peer computed for the session (its step calls)."""
    tokens = Counter()
    for call, name, _position, new in swarm.calls:
        if call == "step":
            tokens[name] += batch * new
    return tokens


def test_an_honest_session_is_countersigned_with_exactly_what_each_hop_was_sent() -> None:
    swarm = swarm_of(a=(0, 3, {}), b=(3, 6, {}), a2=(0, 3, {"throughput": 1.0}), b2=(3, 6, {"throughput": 1.0}))
    node = run_session(swarm, steps=4, batch=2)
    work = {str(c.receipt.signer): c for c in countersigned(node)}
    names = {str(p.peer_id): p.name for p in swarm.peers.values()}
    assert {names[p] for p in work} == {"a", "b"}
    sent = computed(swarm, batch=2)
    for peer, c in work.items():
        assert c.tokens == sent[names[peer]] == 2 * (5 + 4) and c.receipt.tokens == c.tokens
    assert node.blacklisted() == frozenset()


def test_replays_resends_reopens_and_rollbacks_never_make_an_honest_receipt_look_inflated() -> None:
    swarm = swarm_of(
        a=(0, 2, {}), b=(2, 4, {"fail_after": 2}), c=(4, 6, {"lose_cache_at_step": 3}),
        b2=(2, 4, {"throughput": 10.0}), b3=(2, 4, {"throughput": 1.0}), a2=(0, 2, {"throughput": 1.0}),
        c2=(4, 6, {"throughput": 1.0}),
    )
    trust = Blacklist()

    def events(step: int, session: InferenceSession) -> None:
        if step == 4:  # b2 replaced b at step 2 (a replay); now it is blacklisted: c's cache is re-sent
            trust.peers.add(str(swarm.by_name("b2").peer_id))
        if step == 5:
            session.rollback(session.position - 2)

    node = run_session(swarm, steps=6, trust=trust, before_step=events)
    assert node.blacklisted() == frozenset()  # no inflation fault on any honest peer
    names = {str(p.peer_id): p.name for p in swarm.peers.values()}
    sent = computed(swarm)
    work = countersigned(node)
    assert {names[str(c.receipt.signer)] for c in work} >= {"a", "b2", "c"}
    for c in work:
        assert c.receipt.tokens <= c.tokens <= sent[names[str(c.receipt.signer)]]
    replays = [call for call in swarm.calls if call[0] == "step" and call[2] == 0 and call[1] in ("b2", "b3", "c")]
    assert len(replays) >= 3  # b2's replay, c's re-send after the eviction, c's reopen


def test_an_inflating_peer_is_caught_by_the_client_that_countersigns() -> None:
    swarm = swarm_of(a=(0, 3, {"inflate": 1000}), b=(3, 6, {}), a2=(0, 3, {"throughput": 1.0}), b2=(3, 6, {"throughput": 1.0}))
    node = run_session(swarm)
    inflater, honest = str(swarm.by_name("a").peer_id), str(swarm.by_name("b").peer_id)
    assert node.is_blacklisted(inflater) and node.inflations(inflater) == 1
    assert {str(c.receipt.signer) for c in countersigned(node)} == {honest}  # no credit for the inflater
    assert not node.is_blacklisted(honest)


def test_a_hop_nobody_else_serves_is_not_countersigned() -> None:
    swarm = swarm_of(a=(0, 4, {}), b=(4, 6, {}), b2=(4, 6, {"throughput": 1.0}), c=(0, 2, {"throughput": 1.0}))
    node = run_session(swarm)
    assert {str(c.receipt.signer) for c in countersigned(node)} == {str(swarm.by_name("b").peer_id)}
    # once another route of peers covers blocks 0:4 between them, the same hop is verifiable
    swarm = swarm_of(a=(0, 4, {}), b=(4, 6, {}), b2=(4, 6, {"throughput": 1.0}), c=(0, 2, {"throughput": 1.0}),
                     d=(2, 4, {"throughput": 1.0}))
    node = run_session(swarm)
    assert {str(c.receipt.signer) for c in countersigned(node)} == {str(swarm.by_name(n).peer_id) for n in "ab"}


def _record(peer, sent: int, receipt: str = "r") -> StepRecord:
    x = torch.zeros(1, 1, HIDDEN)
    return StepRecord("s", peer, 0, 2, 0, x, x, (x,), False, receipt, None, sent)


def test_sent_tokens_follow_the_sessions_count_per_stream() -> None:
    peer = FakePeer("p", 0, 2).peer_id
    tally = SentTokens()
    tally.observe(_record(peer, 10))  # prompt, batch 2
    tally.observe(_record(peer, 12))
    tally.observe(_record(peer, 26, receipt=""))  # a step after a replay: no receipt this time
    (hop,) = tally.close("s")
    assert (hop.sent, hop.receipt) == (26, "r")
    assert tally.close("s") == []
    tally.observe(_record(peer, 30, receipt="old"))
    tally.observe(_record(peer, 4, receipt="new"))  # the peer was reopened: a new stream counts from 0
    (hop,) = tally.close("s")
    assert (hop.sent, hop.receipt) == (4, "new")
