"""Gossip: the wire form, per-sender budgets, and a real push-pull exchange between two hivemind P2P nodes."""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest
import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2
from hivemind.utils.crypto import RSAPrivateKey

from reputation.attest import MAX_MESSAGE_BYTES, Evidence, Receipt, tensor_digest
from reputation.gossip import (
    MAX_EXCHANGE_BYTES,
    MAX_MESSAGES_PER_EXCHANGE,
    Exchange,
    GossipAgent,
    GossipService,
    Pushed,
    SenderBudget,
    exchange,
    messages_for,
    pack_exchange,
    receive,
    unpack_exchange,
)
from reputation.node import ReputationNode, message_id, peer_id_of_key
from reputation.tolerance import Agreement


def _attest(node: ReputationNode, server: RSAPrivateKey, session: str):
    r = Receipt(
        session_id=session, step=0, dht_prefix="m", block_start=0, block_end=2, tokens=4, dtype="float32",
        compression="none", input_digest="1" * 64, output_digest="2" * 64, signer=peer_id_of_key(server), signed_at=0.0,
    ).sign(server)
    return node.attest(r, Agreement(1.0, 0.0), "pass", "fp32")


def test_exchange_round_trip_and_malformed() -> None:
    ids = [message_id("work", b"a"), message_id("work", b"b")]
    message = Exchange(have=ids, push=[("attestation", b"\x01\x02")], pull=True)
    assert message.push == [Pushed("attestation", b"\x01\x02")]
    assert unpack_exchange(pack_exchange(message)) == message
    for garbage in (b"\xc1", b"\x93\x01\x02\x03", pack_exchange(Exchange())[:-1]):
        with pytest.raises(ValueError):
            unpack_exchange(garbage)
    for fields in (
        {"have": "notalist"},
        {"have": ["not an id"]},
        {"push": [["rumour", b"x"]]},  # an unknown kind
        {"push": [["work", "not bytes"]]},
        {"push": [["work", b"x", b"extra"]]},
        {"push": [["work", b"x" * (MAX_MESSAGE_BYTES + 1)]]},  # over the size of any message
        {"push": [["work", b"x"]] * (MAX_MESSAGES_PER_EXCHANGE + 1)},
        {"pull": 1},
    ):
        with pytest.raises(ValueError):
            unpack_exchange(msgpack.packb(fields, use_bin_type=True))
    assert unpack_exchange(msgpack.packb({"pull": True, "newer": 1})).pull  # a newer sender's extra field is ignored


def test_a_peer_answering_garbage_is_charged_for_it() -> None:
    async def scenario() -> tuple[int, int]:
        class Liar(GossipService):
            async def rpc_exchange(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
                return runtime_pb2.ExpertResponse(metadata=msgpack.packb({"push": [["rumour", b"x"]]}))

        server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=await server.get_visible_maddrs())
        try:
            await Liar(ReputationNode(RSAPrivateKey())).add_p2p_handlers(server)
            budget = SenderBudget(max_invalid=2)
            for _ in range(2):
                with pytest.raises(ValueError):
                    await exchange(ReputationNode(RSAPrivateKey()), client, server.peer_id, budget)
            return budget.allow(str(server.peer_id), 1, time.monotonic()), budget.allow("someone else", 1, time.monotonic())
        finally:
            await client.shutdown()
            await server.shutdown()

    assert asyncio.run(scenario()) == (0, 1)  # ignored after max_invalid bad answers


def test_agent_runs_rounds_until_stopped() -> None:
    async def scenario() -> int:
        agent = GossipAgent(ReputationNode(RSAPrivateKey()), None, lambda: [], period=0.01)  # type: ignore[arg-type]
        agent.p2p = type("P2P", (), {"peer_id": "me"})()
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.wait_for(task, timeout=1.0)
        return agent.rounds

    assert asyncio.run(scenario()) >= 3


def test_sender_budget_limits_and_ignores_invalid_senders() -> None:
    budget = SenderBudget(rate=1.0, burst=10.0, max_invalid=3, ignore_s=60.0)
    assert budget.allow("a", 25, now=0.0) == 10
    assert budget.allow("a", 5, now=2.0) == 2  # refilled at 1 per second
    assert budget.allow("b", 5, now=2.0) == 5  # budgets are per sender
    for _ in range(3):
        budget.invalid("c", now=3.0)
    assert budget.allow("c", 1, now=4.0) == 0
    assert budget.allow("c", 1, now=70.0) == 1


def test_receive_drops_unknown_kinds_and_counts_only_new_valid_messages() -> None:
    keys = [RSAPrivateKey() for _ in range(3)]
    sender, receiver = ReputationNode(keys[0]), ReputationNode(keys[1])
    data = _attest(sender, keys[2], "s").encode()
    budget = SenderBudget()
    assert receive(receiver, budget, "x", [("attestation", data), ("attestation", data), ("bogus", b""), ("work", b"?")]) == 1


def test_push_pull_between_two_live_nodes() -> None:
    async def scenario() -> tuple[int, int, set, set]:
        keys = [RSAPrivateKey() for _ in range(3)]
        left, right = ReputationNode(keys[0]), ReputationNode(keys[1])
        for i in range(3):
            _attest(left, keys[2], f"l{i}")
        for i in range(2):
            _attest(right, keys[2], f"r{i}")
        server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=await server.get_visible_maddrs())
        try:
            await GossipService(right).add_p2p_handlers(server)
            got, pushed = await exchange(left, client, server.peer_id, SenderBudget())
            return got, pushed, set(left.inventory()), set(right.inventory())
        finally:
            await client.shutdown()
            await server.shutdown()

    got, pushed, left_ids, right_ids = asyncio.run(scenario())
    assert (got, pushed) == (2, 3)
    assert left_ids == right_ids and len(left_ids) == 5


def test_large_verdicts_travel_over_several_exchanges_each_within_one_call() -> None:
    """Fail verdicts carrying evidence near 1 MiB each: every exchange stays within what hivemind carries in
    one call (4 MiB), and a backlog bigger than that arrives over a few rounds."""
    keys = [RSAPrivateKey() for _ in range(3)]
    left, right = ReputationNode(keys[0]), ReputationNode(keys[1])
    for i in range(6):
        history = (torch.randn(1, 100, 4096), torch.randn(1, 1, 4096))
        inputs, output = history[-1], history[-1] + 1
        r = Receipt(
            session_id=f"e{i}", step=0, dht_prefix="m", block_start=0, block_end=2, tokens=4, dtype="float32",
            compression="none", input_digest=tensor_digest(inputs), output_digest=tensor_digest(output),
            signer=peer_id_of_key(keys[2]), signed_at=0.0,
        ).sign(keys[2])
        att = left.attest(r, Agreement(0.0, 1.0), "fail", "fp32", evidence=Evidence.of_step(history, inputs, output))
        assert att.evidence is not None and len(att.encode()) > 800_000
    assert sum(len(data) for _, data in messages_for(left, left.inventory())) <= MAX_EXCHANGE_BYTES - 1_000_000

    async def scenario() -> list[int]:
        server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=await server.get_visible_maddrs())
        try:
            await GossipService(right).add_p2p_handlers(server)
            pushed = []
            for _ in range(4):
                pushed.append((await exchange(left, client, server.peer_id, SenderBudget()))[1])
            return pushed
        finally:
            await client.shutdown()
            await server.shutdown()

    pushed = asyncio.run(scenario())
    assert pushed[0] < 6 and sum(pushed) == 6 and set(right.inventory()) == set(left.inventory())
    assert len(right.pending_evidence(peer_id_of_key(keys[2]))) == 6
