"""Bad replies from real peers reach a real client as one typed error that blames (and bans) the sender.

The misbehaving peers are `peers.testing` handlers (`--adversary junk-info|nan|wrong-shape`); each advertises 10x
its throughput, and the hidden-state tests hold the honest head back until it fails (a CI run on a loaded machine
routed past it once, on pings), so the client routes to it first (it believes announcements: `route_on_evidence=False`;
every route has two hops: 0:15 and 15:30). An honest peer serves
0:15 for the fail-over, and another serves 15:30, so the hop after a bad one is honest and must not be blamed.
"""

from __future__ import annotations

import pytest

from peers.local import LocalSwarm
from swarm import DistributedModelForCausalLM
from swarm.models import DEFAULT_MODEL

pytestmark = pytest.mark.slow

BAD_MODES = ("junk-info", "nan", "wrong-shape")


class Excluded:
    """A trust view that keeps the given peers out of routes (a cooldown would expire on a slow machine)."""

    def __init__(self, peer_ids: set[str]):
        self.peer_ids = peer_ids

    def is_blacklisted(self, peer_id: str) -> bool:
        return peer_id in self.peer_ids

    def avoids(self, peer_id: str) -> bool:
        return self.is_blacklisted(peer_id)

    def score(self, peer_id: str) -> float:
        return 1.0


class ThroughFirst(Excluded):
    """`Excluded`, and `reserve` stays out of routes too until `first` fails (is in cooldown): the first route goes
    through `first` whatever the pings measure on a loaded machine, and `reserve` is there for the fail-over."""

    def __init__(self, peer_ids: set[str], sequence, first: str, reserve: str):
        super().__init__(peer_ids)
        self.sequence, self.first, self.reserve = sequence, first, reserve

    def is_blacklisted(self, peer_id: str) -> bool:
        if peer_id == self.reserve:
            return self.first not in {str(p) for p in self.sequence.cooldowns.active()}
        return super().is_blacklisted(peer_id)


@pytest.fixture(scope="module")
def bad_swarm():
    with LocalSwarm(model=DEFAULT_MODEL) as swarm:
        peers = swarm.add_peers(
            ("honest-head", "0:15", ()),
            ("honest-tail", "15:30", ()),
            *((mode, "0:15", ("--adversary", mode)) for mode in BAD_MODES),
        )
        swarm.by_name = {peer.name: peer for peer in peers}
        yield swarm


def _generate_past(swarm, bad_mode: str, chat_ids, first: bool = False):
    """Generate with a fresh client that may route only to the honest peers and to `bad_mode`'s peer (`first`: the
    first route goes through that peer, and the honest head is the fail-over)."""
    model = DistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, [swarm.initial_peers], spot_checks=False,
                                                        route_on_evidence=False)
    try:
        others = {swarm.by_name[m].peer_id for m in BAD_MODES if m != bad_mode}
        if first:
            model.sequence.use_trust(ThroughFirst(others, model.sequence, swarm.by_name[bad_mode].peer_id,
                                                  swarm.by_name["honest-head"].peer_id))
        else:
            model.sequence.use_trust(Excluded(others))  # keep the other misbehaving peers out of this test, for good
        with model.inference_session(max_length=64) as session:
            output = model.generate(chat_ids, max_new_tokens=8, session=session)
            events = list(session.inner.failovers)
            route = [str(hop.peer_id) for hop in session.route]
        banned = {str(peer_id) for peer_id in model.sequence.banned()}
    finally:
        model.shutdown()
    return output, events, route, banned


@pytest.mark.parametrize("mode, problem", [("nan", "NaN or infinity"), ("wrong-shape", "does not match")])
def test_a_bad_hidden_state_reply_is_blamed_on_its_sender(bad_swarm, local_model, chat_ids, mode, problem):
    output, events, route, banned = _generate_past(bad_swarm, mode, chat_ids, first=True)
    bad, tail = bad_swarm.by_name[mode].peer_id, bad_swarm.by_name["honest-tail"].peer_id
    assert [e.peer_id for e in events] == [bad]  # one typed error, naming the sender
    assert events[0].reason.startswith(f"peer {bad} sent an invalid reply") and problem in events[0].reason
    assert bad in banned and tail not in banned  # the honest next hop is not the one blamed
    assert bad not in route
    expected = local_model.generate(chat_ids, max_new_tokens=8, do_sample=False)
    assert output.tolist() == expected.tolist()


def test_a_peer_answering_info_with_junk_is_banned_and_routing_goes_on(bad_swarm, local_model, chat_ids):
    output, events, route, banned = _generate_past(bad_swarm, "junk-info", chat_ids)
    junk = bad_swarm.by_name["junk-info"].peer_id
    assert junk in banned and junk not in route
    assert events == []  # found at the ping, before any route used it
    expected = local_model.generate(chat_ids, max_new_tokens=8, do_sample=False)
    assert output.tolist() == expected.tolist()
