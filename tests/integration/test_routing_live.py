"""Routes on measured behaviour, live on loopback with the real model: a peer that announces 10x its speed but
serves slower (`--adversary slow`) draws a client's first session, and the client's own step times demote it."""

from __future__ import annotations

import pytest
from hivemind.p2p import PeerID

from peers.local import LocalSwarm
from swarm import DistributedModelForCausalLM
from swarm.models import DEFAULT_MODEL
from swarm.routing import OVERCLAIM_RATIO, effective_throughput

pytestmark = pytest.mark.slow


def _route(model, chat_ids) -> list[str]:
    with model.inference_session(max_length=chat_ids.shape[1] + 8) as session:
        model.generate(chat_ids, max_new_tokens=8, session=session)
        return [str(hop.peer_id) for hop in session.route]


def test_a_peer_slower_than_it_claims_is_demoted_by_measured_step_times(chat_ids) -> None:
    with LocalSwarm(model=DEFAULT_MODEL) as swarm:
        honest, boaster = swarm.add_peers(("honest", "0:30", ()), ("boaster", "0:30", ("--adversary", "slow")))
        model = DistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, [swarm.initial_peers], spot_checks=False)
        try:
            assert _route(model, chat_ids) == [boaster.peer_id]  # believed at first: 10x the announced speed
            boaster_id = PeerID.from_base58(boaster.peer_id)
            measured = model.sequence.measured_throughput[boaster_id]
            announced = next(s.info.throughput for s in model.sequence.spans if s.peer_id == boaster_id)
            assert measured * OVERCLAIM_RATIO < announced
            assert effective_throughput(announced, measured) < measured
            for _ in range(2):  # every later session goes to the peer that is as fast as it says
                assert _route(model, chat_ids) == [honest.peer_id]
        finally:
            model.shutdown()
