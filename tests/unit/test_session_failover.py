"""Sessions over a fake transport: fail-over, replay, reopening, bad replies and rewind bookkeeping.

The same code paths as a real swarm (routing, cooldowns, recovery, replay), in milliseconds: peers are
in-process fakes behind `swarm.transport.Transport` (tests/unit/fake_swarm.py).
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from fake_swarm import HIDDEN, FakePeer, FakeSwarm, run_blocks
from swarm.config import ClientConfig
from swarm.errors import BadReplyError, MissingBlocksError, PeerUnreachableError
from swarm.sequence import RemoteSequence
from swarm.session import InferenceSession

RELAY, OTHER_RELAY = (str(FakePeer(name, 0, 1).peer_id) for name in ("relay", "other relay"))
CFG = ClientConfig(initial_peers=(), missing_blocks_timeout=0.0, request_timeout=5.0)


class Blacklist:
    def __init__(self):
        self.peers: set[str] = set()

    def is_blacklisted(self, peer_id: str) -> bool:
        return peer_id in self.peers

    def avoids(self, peer_id: str) -> bool:
        return self.is_blacklisted(peer_id)

    def score(self, peer_id: str) -> float:
        return 1.0


def make_session(swarm: FakeSwarm, trust: Blacklist | None = None, max_length: int = 64):
    sequence = RemoteSequence(swarm, swarm, "fake", 6, CFG)
    if trust is not None:
        sequence.use_trust(trust)
    return sequence, InferenceSession(sequence, swarm, max_length)


def run(coroutine):
    return asyncio.run(coroutine)


async def generate(session: InferenceSession, prompt: torch.Tensor, steps: int, before_step=None):
    """Feed the prompt, then `steps` single tokens (the last output of each step); every output, in order."""
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
    """The same feeding, computed locally over the whole sequence each time."""
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


PROMPT = torch.randn(1, 5, HIDDEN, generator=torch.Generator().manual_seed(0))


def three_hops(**overrides) -> FakeSwarm:
    peers = {"a": (0, 2), "b": (2, 4), "c": (4, 6), "b2": (2, 4)}
    made = []
    for name, (start, end) in peers.items():
        options = overrides.get(name, {})
        made.append(FakePeer(name, start, end, throughput=1000.0 if name != "b2" else 10.0, **options))
    return FakeSwarm(*made)


def test_steps_through_three_hops_equal_the_local_computation():
    swarm = three_hops()
    _, session = make_session(swarm)
    outputs, untrusted = run(generate(session, PROMPT, 4))
    assert_same(outputs, reference(PROMPT, 4))
    assert [h.peer_id for h in session.route] == [swarm.by_name(n).peer_id for n in "abc"]
    assert untrusted == [None] * 5 and session.failovers == []


def test_a_peer_dying_mid_session_is_replaced_and_the_replacement_replays_its_history():
    swarm = three_hops(b={"fail_after": 3})
    sequence, session = make_session(swarm)
    outputs, untrusted = run(generate(session, PROMPT, 5))
    assert_same(outputs, reference(PROMPT, 5))
    assert [e.peer_id for e in session.failovers] == [str(swarm.by_name("b").peer_id)]
    assert session.failovers[0].replacement == [str(swarm.by_name("b2").peer_id)]
    assert swarm.by_name("b").peer_id in sequence.banned()
    # b2 received the whole history b had (prompt + 2 tokens) in one replay at position 0, then the new step
    b2_calls = [c for c in swarm.calls if c[1] == "b2"]
    assert b2_calls[0] == ("step", "b2", 0, 5 + 2) and b2_calls[1] == ("step", "b2", 7, 1)
    assert untrusted == [None] * 6  # a crash is not a lie: nothing is regenerated


def test_a_peer_that_lost_the_cache_is_reopened_not_banned():
    swarm = three_hops(b={"lose_cache_at_step": 2})
    sequence, session = make_session(swarm)
    outputs, _ = run(generate(session, PROMPT, 4))
    assert_same(outputs, reference(PROMPT, 4))
    assert [e.reason.split(":")[0] for e in session.failovers] == ["unknown_session"]
    assert session.failovers[0].replacement == [str(swarm.by_name("b").peer_id)]
    assert swarm.by_name("b").peer_id not in sequence.banned()


@pytest.mark.parametrize("corrupt, problem", [
    (lambda out: out * float("nan"), "NaN or infinity"),
    (lambda out: out[:, :-1] if out.shape[1] > 1 else out[..., :-1], "does not match"),
])
def test_a_bad_reply_blames_the_peer_that_sent_it_not_the_next_one(corrupt, problem):
    swarm = three_hops(b={"corrupt": corrupt})
    sequence, session = make_session(swarm)
    outputs, _ = run(generate(session, PROMPT, 2))
    assert_same(outputs, reference(PROMPT, 2))  # routed around b from its first reply on
    events = session.failovers
    assert [e.peer_id for e in events] == [str(swarm.by_name("b").peer_id)]
    assert problem in events[0].reason
    assert sequence.banned() == {swarm.by_name("b").peer_id}  # c, the next hop, is not blamed


def test_the_transport_check_raises_one_typed_error_naming_the_sender():
    swarm = FakeSwarm(FakePeer("nan", 0, 6, corrupt=lambda out: out + float("inf")))
    peer = swarm.by_name("nan")
    with pytest.raises(BadReplyError) as info:
        run(swarm.forward(peer.peer_id, 0, 6, PROMPT))
    assert info.value.peer == str(peer.peer_id) and "\n" not in str(info.value)


def test_a_peer_answering_info_with_junk_is_banned_and_routing_goes_on():
    swarm = three_hops(b={"junk_info": True})
    sequence, session = make_session(swarm)
    outputs, _ = run(generate(session, PROMPT, 2))
    assert_same(outputs, reference(PROMPT, 2))
    assert [h.peer_id for h in session.route] == [swarm.by_name(n).peer_id for n in ("a", "b2", "c")]
    assert swarm.by_name("b").peer_id in sequence.cooldowns


def test_no_replacement_raises_the_original_error():
    swarm = FakeSwarm(FakePeer("a", 0, 3), FakePeer("b", 3, 6, fail_after=2))
    _, session = make_session(swarm)
    with pytest.raises(PeerUnreachableError):
        run(generate(session, PROMPT, 3))


def test_a_route_needs_every_block():
    swarm = FakeSwarm(FakePeer("a", 0, 3))
    _, session = make_session(swarm)
    with pytest.raises(MissingBlocksError, match="block.*3-5"):
        run(session.step(PROMPT))


def test_blocks_served_only_by_a_peer_that_cannot_be_dialled_are_missing_and_the_error_names_it():
    swarm = FakeSwarm(FakePeer("a", 0, 3), FakePeer("home", 3, 6, dialable=False))
    _, session = make_session(swarm)
    with pytest.raises(MissingBlocksError, match="block.*3-5.*cannot be dialled") as info:
        run(session.step(PROMPT))
    assert info.value.undialable == [str(swarm.by_name("home").peer_id)]


def test_a_route_takes_the_direct_peer_over_a_relayed_one_and_the_relayed_one_when_alone():
    swarm = FakeSwarm(FakePeer("a", 0, 3), FakePeer("home", 3, 6, relays=(RELAY,), rtt=0.0005),
                      FakePeer("direct", 3, 6, rtt=0.001))
    _, session = make_session(swarm)
    run(session.step(PROMPT))
    assert [h.peer_id for h in session.route] == [swarm.by_name("a").peer_id, swarm.by_name("direct").peer_id]
    swarm.dead.add("direct")
    _, session = make_session(swarm)
    run(session.step(PROMPT))
    assert [h.peer_id for h in session.route] == [swarm.by_name("a").peer_id, swarm.by_name("home").peer_id]


def test_a_relayed_peer_whose_stream_drops_is_dialled_again_and_rebuilds_its_cache():
    swarm = FakeSwarm(FakePeer("a", 0, 3), FakePeer("home", 3, 6, relays=(RELAY, OTHER_RELAY), drop_stream_at=3),
                      FakePeer("slow", 3, 6, throughput=1.0))
    sequence, session = make_session(swarm)
    outputs, _ = run(generate(session, PROMPT, 4))
    assert_same(outputs, reference(PROMPT, 4))
    home = swarm.by_name("home")
    assert [(e.peer_id, e.replacement) for e in session.failovers] == [(str(home.peer_id), [str(home.peer_id)])]
    assert home.peer_id not in sequence.cooldowns  # not banned: it was its relay that went
    assert [h.peer_id for h in session.route] == [swarm.by_name("a").peer_id, home.peer_id]


def test_a_relayed_peer_that_stays_unreachable_is_banned_and_routed_around():
    swarm = FakeSwarm(FakePeer("a", 0, 3), FakePeer("home", 3, 6, relays=(RELAY,), fail_after=3),
                      FakePeer("slow", 3, 6, throughput=1.0))
    sequence, session = make_session(swarm)
    outputs, _ = run(generate(session, PROMPT, 4))
    assert_same(outputs, reference(PROMPT, 4))
    assert swarm.by_name("home").peer_id in sequence.cooldowns
    assert [h.peer_id for h in session.route] == [swarm.by_name("a").peer_id, swarm.by_name("slow").peer_id]


def test_a_blacklisted_peer_nobody_can_replace_ends_the_session_with_the_missing_blocks_and_why():
    swarm = FakeSwarm(FakePeer("a", 0, 3), FakePeer("b", 3, 6))
    trust = Blacklist()
    b = swarm.by_name("b")

    def blacklist_b_at(step: int):
        if step == 2:
            trust.peers.add(str(b.peer_id))

    _, session = make_session(swarm, trust)
    with pytest.raises(MissingBlocksError, match=rf"block\(s\) 3-5 .*peer {b.peer_id} is left out: blacklisted by spot"):
        run(generate(session, PROMPT, 4, before_step=blacklist_b_at))


def test_a_blacklisted_peer_is_evicted_and_its_outputs_reported_untrusted_once():
    swarm = three_hops()
    trust = Blacklist()
    b = swarm.by_name("b")

    def blacklist_b_at(step: int):
        if step == 3:  # b served the prompt and two tokens, then it is caught
            trust.peers.add(str(b.peer_id))

    sequence, session = make_session(swarm, trust)
    outputs, untrusted = run(generate(session, PROMPT, 4, before_step=blacklist_b_at))
    assert_same(outputs, reference(PROMPT, 4))  # (b told the truth; the replacement agrees)
    assert untrusted == [None, None, None, 0, None]  # b served from the prompt: everything since, once
    assert [e.reason for e in session.failovers] == ["blacklisted: blacklisted by spot checks"]
    route = [h.peer_id for h in session.route]
    assert b.peer_id not in route and swarm.by_name("b2").peer_id in route
    # c's cache was rebuilt from b2's outputs: a replay at position 0 of the whole history before step 3
    c_replays = [call for call in swarm.calls if call[1] == "c" and call[2] == 0]
    assert len(c_replays) == 2 and c_replays[1][3] == 5 + 2


def test_a_peer_that_joined_later_only_taints_the_outputs_since_it_joined():
    swarm = three_hops(b={"fail_after": 2})
    trust = Blacklist()

    def blacklist_b2_at(step: int):
        if step == 4:  # b2 took over from b at step 2 (position 6)
            trust.peers.add(str(swarm.by_name("b2").peer_id))

    swarm.peers[swarm.by_name("b").peer_id].fail_after = 2
    extra = FakePeer("b3", 2, 4, throughput=1.0)
    swarm.peers[extra.peer_id] = extra
    _, session = make_session(swarm, trust)
    _, untrusted = run(generate(session, PROMPT, 5, before_step=blacklist_b2_at))
    assert untrusted == [None, None, None, None, 6, None]


def test_settle_reports_what_the_observer_blacklisted():
    swarm = three_hops()
    trust = Blacklist()

    class CatchesB:
        def on_step(self, record):
            pass

        def on_close(self, session_id):
            pass

        async def settle(self, session_id):
            trust.peers.add(str(swarm.by_name("b").peer_id))

    sequence = RemoteSequence(swarm, swarm, "fake", 6, CFG)
    sequence.use_trust(trust)
    session = InferenceSession(sequence, swarm, 64, observer=CatchesB())

    async def scenario():
        await generate(session, PROMPT, 2)
        first = await session.settle()
        second = await session.settle()
        return first, second

    assert run(scenario()) == (0, None)


def test_rollback_resends_from_the_earlier_position_and_stays_exact():
    swarm = three_hops()
    _, session = make_session(swarm)

    async def scenario():
        first = (await session.step(PROMPT)).hidden
        await session.step(first[:, -1:])
        session.rollback(5)
        again = (await session.step(first[:, -1:])).hidden
        return first, again

    first, again = run(scenario())
    expected = reference(PROMPT, 1)
    torch.testing.assert_close(again, expected[1], rtol=0, atol=1e-6)
