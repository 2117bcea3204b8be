"""A peer behind a delaying relay (peers.testing.netem) that it announces with --announce-maddrs: the client
reaches it only through the relay, and every token pays the link's round trip."""

from __future__ import annotations


import pytest

from peers.local import LocalSwarm
from peers.testing.netem import RelayProcess, free_port
from peers.testing.streamers import TokenTimes
from swarm import DistributedModelForCausalLM
from swarm.models import DEFAULT_MODEL

pytestmark = pytest.mark.slow

DELAY_MS = 50  # one way


def test_a_client_reaches_a_peer_only_through_its_announced_relay(chat_ids):
    port = free_port()
    with RelayProcess([port]) as relays, LocalSwarm(model=DEFAULT_MODEL) as swarm:
        relay_port = relays.ports[port]
        peer = swarm.add_peer("0:30", "--port", str(port), "--announce-maddrs", f"/ip4/127.0.0.1/tcp/{relay_port}")
        assert f"/ip4/127.0.0.1/tcp/{relay_port}/p2p/{peer.peer_id}" in peer.log()  # what it says it is reached at
        model = DistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, [swarm.initial_peers])
        try:
            direct = model.generate(chat_ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            before = relays.stats()[port]
            relays.set_delay(DELAY_MS)
            times = TokenTimes()
            delayed = model.generate(chat_ids, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                     streamer=times)
            after = relays.stats()[port]
        finally:
            model.shutdown()
    assert delayed.tolist() == direct.tolist()
    hidden_state = chat_ids.shape[1] * 576 * 4  # the prompt's hidden states (576 features, float32) passed it
    assert after.bytes_to_target - before.bytes_to_target > hidden_state
    assert after.bytes_from_target - before.bytes_from_target > hidden_state
    gaps = times.gaps()
    assert min(gaps) >= 2 * DELAY_MS / 1000  # a round trip through the relay per token
