"""Push chains (issue 15): a decode step travels client -> first hop -> next hop ... with each hop replying to the
client, over a fake transport (sessions) and in-process handlers (the peer's side of `rpc_push`)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.utils.crypto import RSAPrivateKey

from fake_swarm import HIDDEN, FakePeer, FakeSwarm, run_blocks
from handler_kit import FakeContext, Stream, hidden, read_reply
from peers.handler import BlockHandler
import peers.push
from peers.push import PushInbox, PushTimeout, push_message, take_batch
from reputation.client import ClientTrust
from swarm import protocol
from swarm.config import ClientConfig
from swarm.hooks import ClientContext
from swarm.network import Identity
from swarm.protocol import MAX_PUSHES_PER_MESSAGE, PushBatch, PushRequest, PushTarget, StepRequest, tensor_digest
from swarm.sequence import RemoteSequence
from swarm.session import InferenceSession

CFG = ClientConfig(initial_peers=(), missing_blocks_timeout=0.0, request_timeout=5.0, check_rate=0.0)
PROMPT = torch.randn(1, 5, HIDDEN, generator=torch.Generator().manual_seed(0))


def three_hops(**peer_options) -> FakeSwarm:
    spans = {"a": (0, 2), "b": (2, 4), "c": (4, 6)}
    return FakeSwarm(*(FakePeer(name, start, end, **peer_options.get(name, {})) for name, (start, end) in spans.items()))


def session_over(swarm: FakeSwarm, push: bool = True, trust: bool = False) -> InferenceSession:
    sequence = RemoteSequence(swarm, swarm, "fake", 6, CFG)
    if not trust:
        return InferenceSession(sequence, swarm, 64, push=push)
    identity = Identity(Path("/nonexistent"), RSAPrivateKey(), temporary=True)
    layer = ClientTrust(ClientContext(swarm, sequence, identity, None, None, CFG))
    layer.checker.rng = random.Random(0)
    sequence.use_trust(layer.trust)
    return InferenceSession(sequence, swarm, 64, layer.observer, layer.verifier, push=push)


def decode(session: InferenceSession, steps: int) -> list[torch.Tensor]:
    async def scenario():
        outputs, inputs = [], PROMPT
        for _ in range(steps + 1):
            outputs.append((await session.step(inputs)).hidden)
            inputs = outputs[-1][:, -1:]
        await session.close()
        return outputs

    return asyncio.run(scenario())


def reference(steps: int) -> list[torch.Tensor]:
    sequence, outputs, inputs = PROMPT, [], PROMPT
    for _ in range(steps + 1):
        outputs.append(run_blocks(0, 6, sequence)[:, -inputs.shape[1]:])
        inputs = outputs[-1][:, -1:]
        sequence = torch.cat([sequence, inputs], dim=1)
    return outputs


def assert_same(outputs: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(outputs) == len(expected)
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# ---- sessions ----------------------------------------------------------------------------------------------------


def test_pushed_steps_equal_client_driven_ones():
    swarm = three_hops()
    session = session_over(swarm)
    assert_same(decode(session, 4), reference(4))
    assert session.pushed_steps == 4 and session.push_fallbacks == 0  # the prefill went client-driven
    assert swarm.pushed_steps == 2 * 4  # hops b and c took their input from a push at each decode step
    inputs_to_b = [call for call in swarm.calls if call[1] == "b"]
    assert len(inputs_to_b) == 5


def test_pushing_is_off_when_asked_or_when_a_hop_is_relayed():
    swarm = three_hops()
    session = session_over(swarm, push=False)
    assert_same(decode(session, 3), reference(3))
    assert session.pushed_steps == 0 and swarm.pushed_steps == 0


def test_a_lost_push_times_out_and_the_session_goes_on_client_driven():
    swarm = three_hops(b={"push": "drop"})
    session = session_over(swarm)
    assert_same(decode(session, 4), reference(4))
    assert session.push_fallbacks == 1 and session.pushed_steps == 0
    assert not session.push  # the rest of the session went client-driven
    assert session.failovers == []  # nobody was banned for a lost push


def test_a_tampered_push_is_caught_and_redone_from_the_output_the_client_saw():
    swarm = three_hops(a={"push": "tamper"})
    session = session_over(swarm)
    assert_same(decode(session, 3), reference(3))  # b computed on the altered input once; the client redid it
    assert session.push_fallbacks == 1 and session.pushed_steps == 0


def test_pushed_steps_keep_receipts_and_history_valid():
    """With the real receipt verifier: every pushed hop's receipt names the input the previous hop returned, step
    numbers stay in step after a fallback (the redone steps count), and replay after a failure still works."""
    swarm = FakeSwarm(*(FakePeer(name, start, end, sign=True, throughput=1000.0 if name != "b2" else 1.0)
                        for name, start, end in (("a", 0, 2), ("b", 2, 4), ("c", 4, 6), ("b2", 2, 4))))
    session = session_over(swarm, trust=True)
    steps = 6

    async def scenario():
        outputs, inputs = [], PROMPT
        for index in range(steps + 1):
            if index == 3:
                swarm.dead.add("b")  # b dies mid-session: b2 is rebuilt from the recorded (pushed) inputs
            outputs.append((await session.step(inputs)).hidden)
            inputs = outputs[-1][:, -1:]
        await session.close()
        return outputs

    assert_same(asyncio.run(scenario()), reference(steps))
    assert session.pushed_steps == 2 and session.push_fallbacks == 1
    assert [event.replacement for event in session.failovers] == [[str(swarm.by_name("b2").peer_id)]]


def test_a_tampering_pusher_is_caught_with_receipts_on():
    swarm = FakeSwarm(*(FakePeer(name, start, end, sign=True, push="tamper" if name == "b" else "honest")
                        for name, start, end in (("a", 0, 2), ("b", 2, 4), ("c", 4, 6))))
    session = session_over(swarm, trust=True)
    assert_same(decode(session, 3), reference(3))
    assert session.push_fallbacks == 1


# ---- the peer's side ---------------------------------------------------------------------------------------------


def test_inbox_hands_a_push_to_its_step_whichever_comes_first():
    async def scenario():
        inbox = PushInbox()
        early = torch.ones(1, 1, 4)
        inbox.deliver(("s", 0, 3), "alice", early)
        assert torch.equal(await inbox.take(("s", 0, 3), "alice", 1.0), early)
        waiting = asyncio.ensure_future(inbox.take(("s", 0, 4), "alice", 1.0))
        await asyncio.sleep(0)
        late = torch.zeros(1, 1, 4)
        inbox.deliver(("s", 0, 4), "mallory", late + 5)  # not the peer the step takes pushes from
        inbox.deliver(("s", 0, 4), "alice", late)
        assert torch.equal(await waiting, late)
        with pytest.raises(PushTimeout):
            await inbox.take(("s", 0, 5), "alice", 0.05)
        return inbox.received

    assert asyncio.run(scenario()) == 2


def test_a_flooding_stranger_evicts_only_its_own_pushes():
    async def scenario():
        step = torch.ones(1, 1, 4)  # 16 bytes
        inbox = PushInbox(max_bytes=40 * 16, max_sender_bytes=16 * 16)
        inbox.deliver(("s", 0, 7), "alice", step)
        inbox.deliver(("s", 0, 7), "mallory", step + 5)  # the same step: it does not replace alice's push
        for position in range(100):
            inbox.deliver(("flood", 0, position), "mallory", step)
        assert inbox._sender_bytes["mallory"] <= inbox.max_sender_bytes  # its oldest went first
        for sybil in range(10):  # many identities: the one holding the most loses its oldest
            for position in range(16):
                inbox.deliver(("flood", sybil, position), f"sybil{sybil}", step)
        assert inbox.held_bytes <= inbox.max_bytes
        assert torch.equal(await inbox.take(("s", 0, 7), "alice", 0.01), step)
        with pytest.raises(PushTimeout):  # mallory's oldest pushes are gone
            await inbox.take(("flood", 0, 0), "mallory", 0.01)

    asyncio.run(scenario())


def test_held_pushes_expire_and_free_their_bytes():
    inbox = PushInbox(ttl=0.0)
    inbox.deliver(("s", 0, 1), "alice", torch.ones(1, 1, 4))
    inbox.deliver(("s", 0, 2), "bob", torch.ones(1, 1, 4))  # finds alice's push expired
    assert list(inbox._sender_bytes) == ["bob"] and inbox.held_bytes == 16


class Direct:
    """Pushes straight into another in-process handler's `rpc_push`, as `peers.push.PushLinks` does over P2P."""

    def __init__(self, receiver, sender_id: str):
        self.receiver, self.context = receiver, FakeContext(remote_id=sender_id)
        self.acks: list = []  # the receiver's acks
        self.tasks: list[asyncio.Task] = []

    def send(self, peer_id: PeerID, meta: PushRequest, hidden_states: torch.Tensor) -> None:
        async def one():
            yield protocol.make_request("", meta, hidden_states)

        async def deliver():
            async for ack in self.receiver.rpc_push(one(), self.context):
                self.acks.append(read_reply(ack)[0])

        self.tasks.append(asyncio.ensure_future(deliver()))


@pytest.mark.usefixtures("one_torch_thread")
def test_handlers_push_from_hop_to_hop_and_equal_the_client_driven_path(make_handler):
    """Blocks 0:1 on one handler, 1:3 on another: a pushed decode step gives the same output as a client-driven
    one, the receiver reports the digest of the input it used, and a push that never comes is a push_timeout."""
    first, second, reference_handler = make_handler(), make_handler(), make_handler()
    first_id = "QmFirstHop"
    target = PushTarget(peer_id=str(PeerID(b"\x12\x20" + bytes(32)).to_base58()), start=1, end=3)
    first.pushes = Direct(second, first_id)
    prompt, token = hidden(tokens=4, seed=1), hidden(tokens=1, seed=2)

    async def scenario():
        a, b, ref = Stream(first), Stream(second), Stream(reference_handler)
        _, (expected_prompt,) = await ref.step("s", 0, prompt)
        _, (expected,) = await ref.step("s", 4, token)
        _, (out_a,) = await a.step("s", 0, prompt, start=0, end=1)
        _, (out_b,) = await b.step("s", 0, out_a, start=1, end=3)
        torch.testing.assert_close(out_b, expected_prompt, rtol=0, atol=1e-5)
        # the pushed step is asked for before the push exists: it waits for it
        meta_b = StepRequest(session_id="s", start=1, end=3, position=4, max_length=16, pushed=True,
                             push_from=first_id)
        pending = asyncio.ensure_future(b.send(protocol.make_request("", meta_b)))
        meta_a = StepRequest(session_id="s", start=0, end=1, position=4, max_length=16, push_to=target)
        _, (step_a,) = await a.send(protocol.make_request("", meta_a, token))
        reply_b, (step_b,) = await pending
        assert reply_b.error is None and reply_b.input_digest == tensor_digest(step_a)
        torch.testing.assert_close(step_b, expected, rtol=0, atol=1e-5)
        # no push for the next position: a typed error, and the session is unchanged
        meta_late = meta_b.model_copy(update={"position": 5})
        late, _ = await b.send(protocol.make_request("", meta_late))
        assert late.error is not None and late.error.kind == "push_timeout"
        assert second.sessions()[0].length == 5
        for stream in (a, b, ref):
            await stream.close()

    asyncio.run(scenario())
    assert second.stats.pushed_steps == 1


@pytest.mark.usefixtures("one_torch_thread")
def test_a_push_from_another_peer_than_named_is_not_used(make_handler):
    receiver = make_handler(push_timeout=0.2)

    async def scenario():
        stream = Stream(receiver)
        await stream.step("s", 0, hidden(tokens=2), start=0, end=3)
        push = PushRequest(session_id="s", start=0, end=3, position=2)

        async def one():
            yield protocol.make_request("", push, hidden(tokens=1, seed=9))
        async for _ in receiver.rpc_push(one(), FakeContext(remote_id="QmMallory")):
            pass
        meta = StepRequest(session_id="s", start=0, end=3, position=2, max_length=16, pushed=True,
                           push_from="QmAlice")
        reply, _ = await stream.send(protocol.make_request("", meta))
        assert reply.error is not None and reply.error.kind == "push_timeout"
        await stream.close()

    asyncio.run(scenario())


def test_an_unexpected_failure_on_one_push_answers_it_and_keeps_the_pushers_stream(make_handler, monkeypatch):
    # a fault no well-formed or malformed push causes today: the inbox raising (faked, as a future bug would)
    receiver = make_handler()
    real_deliver, calls = receiver.inbox.deliver, []

    def deliver_once_broken(*args):
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("inbox broke")
        return real_deliver(*args)

    monkeypatch.setattr(receiver.inbox, "deliver", deliver_once_broken)

    async def scenario() -> list:
        async def two():
            for position in (2, 3):
                yield protocol.make_request("", PushRequest(session_id="s", start=0, end=3, position=position),
                                            hidden(tokens=1, seed=position))
        return [read_reply(ack)[0] async for ack in receiver.rpc_push(two(), FakeContext(remote_id="QmAlice"))]

    first, second = asyncio.run(scenario())
    assert first.error is not None and first.error.kind == "internal" and "inbox broke" in first.error.message
    assert second.error is None and len(calls) == 2


class _PushRecorder:
    def __init__(self):
        self.sent: list[torch.Tensor] = []

    def send(self, peer_id: PeerID, meta: PushRequest, hidden_states: torch.Tensor) -> None:
        self.sent.append(hidden_states)


class _NotesPushesAtSigning(BlockHandler):
    """Signs "receipt-N", N being how many pushes had left when it signed."""

    def sign_reply(self, hidden, output, start, end, work, prompts=None):
        return output, f"receipt-{len(self.pushes.sent)}"


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("inline_step_seconds", [0.05, 0.0], ids=["on the event loop", "on the compute thread"])
def test_a_pushed_output_leaves_before_its_receipt_is_signed(make_handler, inline_step_seconds):
    """The next hop starts computing while this one signs; the reply still carries the receipt of what was pushed."""
    handler = make_handler(_NotesPushesAtSigning, inline_step_seconds=inline_step_seconds)
    handler.pushes = _PushRecorder()
    target = PushTarget(peer_id=str(PeerID(b"\x12\x20" + bytes(32)).to_base58()), start=1, end=3)

    async def scenario():
        stream = Stream(handler)
        prefill, _ = await stream.step("s", 0, hidden(tokens=4, seed=1))
        meta = StepRequest(session_id="s", start=0, end=3, position=4, max_length=16, push_to=target)
        reply, (output,) = await stream.send(protocol.make_request("", meta, hidden(tokens=1, seed=2)))
        return prefill, reply, output

    prefill, reply, output = asyncio.run(scenario())
    assert prefill.receipt == "receipt-0" and reply.error is None and reply.receipt == "receipt-1"
    assert torch.equal(handler.pushes.sent[0], output)


@pytest.mark.usefixtures("one_torch_thread")
def test_a_step_waiting_for_a_push_fails_at_once_when_the_pushers_link_closes(make_handler):
    """The pusher died (its link to this peer closed): the step waiting for its push is a push_timeout now, not after
    the timeout, so the client goes on client-driven without a stall; pushes from other peers still wait."""
    handler = make_handler(push_timeout=30.0)
    pusher = "QmFirstHop"

    async def scenario():
        stream = Stream(handler)
        reply, _ = await stream.step("s", 0, hidden(tokens=3, seed=1))
        assert reply.error is None, reply.error
        meta = StepRequest(session_id="s", start=0, end=3, position=3, max_length=16, pushed=True, push_from=pusher)
        pending = asyncio.ensure_future(stream.send(protocol.make_request("", meta)))
        other = asyncio.ensure_future(handler.inbox.take(("t", 0, 3), "QmSomeoneElse", 30.0))
        await asyncio.sleep(0.05)
        assert not pending.done()

        async def link_that_closes():
            return
            yield

        began = asyncio.get_running_loop().time()
        async for _ in handler.rpc_push(link_that_closes(), FakeContext(remote_id=pusher)):
            pass
        reply, _ = await asyncio.wait_for(pending, 5.0)
        assert reply.error is not None and reply.error.kind == "push_timeout"
        assert asyncio.get_running_loop().time() - began < 5.0 and not other.done()
        other.cancel()
        await stream.close()

    asyncio.run(scenario())


# ---- pushes that leave together ----------------------------------------------------------------------------------


def _queued(*sizes: int, close: bool = False) -> asyncio.Queue:
    outbox: asyncio.Queue = asyncio.Queue()
    for position, tokens in enumerate(sizes):
        outbox.put_nowait((PushRequest(session_id=f"s{position}", start=0, end=3, position=4), hidden(tokens=tokens)))
    if close:
        outbox.put_nowait(None)
    return outbox


def test_pushes_queued_together_leave_in_one_message_within_its_limits(monkeypatch):
    outbox = _queued(1, 1, 1)
    batch, carried, closing = take_batch(outbox.get_nowait(), outbox)
    assert [meta.session_id for meta, _ in batch] == ["s0", "s1", "s2"] and carried is None and not closing

    monkeypatch.setattr(peers.push, "MAX_PUSH_MESSAGE_BYTES", 2 * hidden(tokens=1).numel() * 4)
    outbox = _queued(1, 1, 1)
    batch, carried, closing = take_batch(outbox.get_nowait(), outbox)
    assert len(batch) == 2 and carried[0].session_id == "s2" and outbox.empty()  # the third goes next
    outbox = _queued(3)  # a push larger than the limit still goes, alone
    assert len(take_batch(outbox.get_nowait(), outbox)[0]) == 1

    outbox = _queued(1, 1, close=True)
    batch, carried, closing = take_batch(outbox.get_nowait(), outbox)
    assert len(batch) == 2 and closing


def test_a_lone_push_goes_as_a_push_request_that_older_peers_read(make_handler):
    lone, several = _queued(1), _queued(1, 1)
    lone_message = push_message([lone.get_nowait()])
    assert protocol.unpack(lone_message.metadata, PushRequest).session_id == "s0"
    assert len(protocol.unpack(push_message([several.get_nowait(), several.get_nowait()]).metadata,
                               PushBatch).pushes) == 2
    receiver = make_handler()
    (ack,) = asyncio.run(_push(receiver, lone_message))
    assert ack.error is None and receiver.inbox.held_bytes > 0


def _push_message(count: int, tensors: list[torch.Tensor] | None = None):
    metas = [PushRequest(session_id="s", start=0, end=3, position=2 + i) for i in range(count)]
    tensors = [hidden(tokens=1, seed=i) for i in range(count)] if tensors is None else tensors
    return protocol.make_request("", PushBatch(pushes=metas), *tensors), tensors


async def _push(receiver, request) -> list:
    async def one():
        yield request

    return [read_reply(ack)[0] async for ack in receiver.rpc_push(one(), FakeContext(remote_id="QmAlice"))]


def test_a_message_of_several_pushes_delivers_each_to_its_step(make_handler):
    receiver = make_handler()
    request, tensors = _push_message(3)

    async def scenario():
        (ack,) = await _push(receiver, request)
        taken = [await receiver.inbox.take(("s", 0, 2 + i), "QmAlice", 0.01) for i in range(3)]
        return ack, taken

    ack, taken = asyncio.run(scenario())
    assert ack.error is None and all(torch.equal(a, b) for a, b in zip(taken, tensors))


@pytest.mark.parametrize("fault", ["a tensor missing", "one push not finite", "too many pushes"])
def test_a_malformed_push_message_is_refused_whole_and_delivers_nothing(make_handler, fault):
    receiver = make_handler()
    if fault == "a tensor missing":
        request, _ = _push_message(3, [hidden(tokens=1), hidden(tokens=1)])
    elif fault == "one push not finite":
        request, _ = _push_message(2, [hidden(tokens=1), torch.full((1, 1, HIDDEN), float("nan"))])
    else:
        metas = [PushRequest(session_id="s", start=0, end=3, position=i) for i in range(MAX_PUSHES_PER_MESSAGE + 1)]
        request = protocol.make_request("", PushBatch.model_construct(pushes=metas),
                                        *[hidden(tokens=1)] * len(metas))
    (ack,) = asyncio.run(_push(receiver, request))
    assert ack.error is not None and ack.error.kind == "bad_request"
    assert receiver.inbox.held_bytes == 0
