"""Steps of several sessions in one message (`rpc_bundle`, `swarm.bundles`): the peer's side driven in-process, and a
client's sessions over two real p2p daemons on loopback (bundled, and falling back where a peer has no bundles)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from peers.handler import BlockHandler
from handler_kit import NUM_BLOCKS, FakeContext, Stream, hidden
from swarm import protocol
from swarm.blocks import SpanInput
from swarm.protocol import BlocksReply, BundledStep, BundleReply, PushTarget, StepBundle, StepRequest
from swarm.remote import HivemindTransport

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def step_meta(session: str, position: int, **fields) -> StepRequest:
    return StepRequest(session_id=session, start=0, end=NUM_BLOCKS, position=position, max_length=16, **fields)


def bundle_request(steps: list[tuple[StepRequest, tuple[torch.Tensor, ...]]], bundle: int = 7
                   ) -> runtime_pb2.ExpertRequest:
    message = StepBundle(bundle=bundle, steps=[BundledStep(step=meta, tensors=len(ts)) for meta, ts in steps])
    return runtime_pb2.ExpertRequest(metadata=protocol.pack(message),
                                     tensors=protocol.serialize_tensors(*[t for _, ts in steps for t in ts]))


async def serve_bundle(handler, request: runtime_pb2.ExpertRequest, remote_id: str = "QmTestClient"
                       ) -> list[tuple[BundleReply, list[torch.Tensor]]]:
    """One bundle through `rpc_bundle` on a stream that ends after it: every reply message, read."""
    async def one():
        yield request

    return [(protocol.unpack(m.metadata, BundleReply), protocol.deserialize_tensors(m.tensors))
            async for m in handler.rpc_bundle(one(), FakeContext(remote_id=remote_id))]


def by_item(messages) -> dict[int, tuple[BlocksReply, list[torch.Tensor]]]:
    """Each step's reply and tensors, by its index in the bundle, over every reply message."""
    replies = {}
    for message, tensors in messages:
        assert message.error is None, message.error
        offset = 0
        for reply in message.replies:
            replies[reply.item] = (reply.reply, tensors[offset : offset + reply.tensors])
            offset += reply.tensors
    return replies


def session_lengths(handler) -> dict[str, int]:
    return {session.session_id: session.length for session in handler.sessions()}


async def open_sessions(handler, *sessions: str, remote_id: str = "QmTestClient") -> Stream:
    stream = Stream(handler)
    stream._replies = handler.rpc_inference(stream._requests(), FakeContext(remote_id=remote_id))
    for i, session in enumerate(sessions):
        reply, _ = await stream.step(session, 0, hidden(1, 4, seed=i))
        assert reply.error is None, reply.error
    return stream


def test_a_bundle_of_sessions_steps_gives_each_the_output_of_its_own_stream(make_handler):
    bundled, alone = make_handler(), make_handler()
    steps = [(step_meta(s, 4), (hidden(1, 1, seed=10 + i),)) for i, s in enumerate(("a", "b"))]

    async def scenario():
        stream = await open_sessions(bundled, "a", "b")  # kept: a stream dropped frees its sessions
        messages = await serve_bundle(bundled, bundle_request(steps))
        reference = await open_sessions(alone, "a", "b")
        expected = [(await reference.step(meta.session_id, 4, *tensors))[1][0] for meta, tensors in steps]
        for each in (stream, reference):
            await each.close()
        return messages, expected

    messages, expected = asyncio.run(scenario())
    replies = by_item(messages)
    assert all(message.bundle == 7 for message, _ in messages)
    for item, output in enumerate(expected):
        reply, tensors = replies[item]
        assert reply.error is None and reply.length == 5 and reply.receipt == ""
        torch.testing.assert_close(tensors[0], output)
    assert bundled.stats.bundled_steps == 2 and bundled.scheduler.stats.largest_batch == 2
    assert len(messages) == 1  # computed in one run, answered in one message


def test_a_bundle_never_opens_nor_steps_another_clients_session(make_handler):
    handler = make_handler()

    async def scenario():
        streams = [await open_sessions(handler, "mine"),  # kept: a stream dropped frees its sessions
                   await open_sessions(handler, "theirs", remote_id="QmSomeoneElse")]
        messages = await serve_bundle(handler, bundle_request([
            (step_meta("mine", 4), (hidden(1, 1),)),
            (step_meta("theirs", 4), (hidden(1, 1),)),
            (step_meta("new", 0), (hidden(1, 4),)),
        ]))
        lengths = session_lengths(handler)
        for stream in streams:
            await stream.close()
        return messages, lengths

    messages, lengths = asyncio.run(scenario())
    replies = by_item(messages)
    assert replies[0][0].error is None
    for item in (1, 2):
        assert replies[item][0].error.kind == "unknown_session" and replies[item][1] == []
    assert lengths == {"mine": 5, "theirs": 4}


def test_a_bundled_step_may_not_close_carry_prompts_or_race_its_sessions_other_step(make_handler):
    handler = make_handler(inline_step_seconds=0)  # steps run on the compute thread: the first is still running

    async def scenario():
        stream = await open_sessions(handler, "a")  # kept: a stream dropped frees its sessions
        messages = await serve_bundle(handler, bundle_request([
            (step_meta("a", 4), (hidden(1, 1, seed=1),)),
            (step_meta("a", 4), (hidden(1, 1, seed=2),)),
            (step_meta("a", 5, close=True), ()),
        ]))
        lengths = session_lengths(handler)
        await stream.close()
        return messages, lengths

    messages, lengths = asyncio.run(scenario())
    replies = by_item(messages)
    assert replies[0][0].error is None and len(replies[0][1]) == 1
    assert replies[1][0].error.kind == "bad_request" and "still computing" in replies[1][0].error.message
    assert replies[2][0].error.kind == "bad_request" and "cannot close" in replies[2][0].error.message
    assert lengths == {"a": 5}  # one step went in, and the session is still open


class _PushRecorder(list):
    """Where `_push` sends: a list of the pushed outputs."""

    def send(self, peer_id, meta, hidden_states) -> None:
        self.append(hidden_states)


class _SignsAfterPushes(BlockHandler):
    """Records pushes instead of sending them; signs "receipt-N", N being how many pushes had left at signing."""

    def sign_reply(self, hidden, output, start, end, work, prompts=None):
        return output, f"receipt-{len(self.pushes)}"


def test_pushed_steps_of_one_run_push_then_sign_in_one_hand_off_and_are_answered_in_one_message(make_handler):
    handler = make_handler(_SignsAfterPushes)
    handler.pushes = _PushRecorder()
    hand_offs = []  # work sent to the compute thread besides step runs
    call = handler.scheduler.call

    async def counted(fn):
        hand_offs.append(fn)
        return await call(fn)

    handler.scheduler.call = counted
    target = PushTarget(peer_id=str(PeerID(b"\x12\x20" + bytes(32)).to_base58()), start=1, end=3)
    steps = [(step_meta(s, 4, push_to=target), (hidden(1, 1, seed=10 + i),)) for i, s in enumerate(("a", "b"))]

    async def scenario():
        stream = await open_sessions(handler, "a", "b")  # kept: a stream dropped frees its sessions
        messages = await serve_bundle(handler, bundle_request(steps))
        await stream.close()
        return messages

    messages = asyncio.run(scenario())
    assert len(messages) == 1 and len(handler.pushes) == 2 and len(hand_offs) == 1  # both signed in one hand-off
    replies = by_item(messages)
    assert [replies[i][0].receipt for i in (0, 1)] == ["receipt-2", "receipt-2"]
    for i in (0, 1):
        assert torch.equal(replies[i][1][0], handler.pushes[i])


@pytest.mark.parametrize("fault", ["unreadable", "tensors miscounted", "too many tokens"])
def test_a_malformed_bundle_is_refused_whole_and_the_stream_goes_on(make_handler, fault):
    handler = make_handler()  # max_tokens_per_request=64
    if fault == "unreadable":
        bad = runtime_pb2.ExpertRequest(metadata=b"\xc1", tensors=protocol.serialize_tensors(hidden(1, 1)))
    elif fault == "tensors miscounted":
        bad = bundle_request([(step_meta("a", 4), (hidden(1, 1),))])
        bad.tensors.append(protocol.serialize_tensor(hidden(1, 1)))
    else:
        bad = bundle_request([(step_meta("a", 4), (hidden(1, 40),)), (step_meta("b", 4), (hidden(1, 40),))])
    good = bundle_request([(step_meta("a", 4), (hidden(1, 1),))], bundle=8)

    async def scenario():
        stream = await open_sessions(handler, "a", "b")  # kept: a stream dropped frees its sessions

        async def two():
            yield bad
            await asyncio.sleep(0.05)
            yield good

        replies = [(protocol.unpack(m.metadata, BundleReply), list(m.tensors))
                   async for m in handler.rpc_bundle(two(), FakeContext())]
        lengths = session_lengths(handler)
        await stream.close()
        return replies, lengths

    ((refusal, _), (served, tensors)), lengths = asyncio.run(scenario())
    assert refusal.error.kind == "bad_request" and refusal.replies == []
    assert refusal.bundle == (None if fault == "unreadable" else 7)
    assert served.bundle == 8 and served.replies[0].reply.error is None and len(tensors) == 1
    assert lengths == {"a": 5, "b": 4}


# --- a client's sessions over real p2p daemons -------------------------------------------------------------


async def _serve(handler, bundles: bool = True) -> P2P:
    server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    await handler.add_p2p_handlers(server)
    if not bundles:  # a peer from before bundles: no such handler
        await server.remove_protobuf_handler(protocol.handle_name("BlockService", None, "rpc_bundle"),
                                             stream_input=True, stream_output=True)
    return server


async def _sessions_step_together(server: P2P, transport: HivemindTransport, count: int, steps: int
                                  ) -> list[list[torch.Tensor]]:
    """`count` sessions on their own streams: a prefill each, then `steps` decode steps, all sessions at once."""
    streams = [transport.open_stream(server.peer_id) for _ in range(count)]
    outputs: list[list[torch.Tensor]] = [[] for _ in range(count)]

    async def run(i: int) -> None:
        outputs[i].append((await streams[i].step(step_meta(f"s{i}", 0), hidden(1, 4, seed=i), timeout=30)).output)
        for position in range(4, 4 + steps):
            x = hidden(1, 1, seed=100 * i + position)
            outputs[i].append((await streams[i].step(step_meta(f"s{i}", position), x, timeout=30)).output)

    try:
        await asyncio.gather(*(run(i) for i in range(count)))
    finally:
        for stream in streams:
            await stream.close()
    return outputs


async def _on_a_live_peer(handler, bundles: bool, work) -> tuple[object, int]:
    """`work(server, transport)` with `handler` served on one p2p daemon and a client's transport on another; what it
    returned, and the steps the client sent in bundles."""
    server = await _serve(handler, bundles)
    client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=await server.get_visible_maddrs())
    transport = HivemindTransport(client)
    try:
        return await work(server, transport), transport.bundled_steps
    finally:
        await client.shutdown()
        await server.shutdown()


def _expected(handler, count: int, steps: int) -> list[list[torch.Tensor]]:
    expected = []
    for i in range(count):
        cache = handler.span.new_cache(0, NUM_BLOCKS)
        outs = [handler.span(hidden(1, 4, seed=i), cache, SpanInput(None, 0))]
        for position in range(4, 4 + steps):
            outs.append(handler.span(hidden(1, 1, seed=100 * i + position), cache, SpanInput(None, position)))
        expected.append(outs)
    return expected


@pytest.mark.parametrize("bundles", [True, False], ids=["bundled", "peer without bundles"])
def test_concurrent_sessions_bundle_their_steps_where_the_peer_can_and_stay_exact(make_handler, bundles):
    handler = make_handler()  # max_sessions=2

    async def scenario():
        return await _on_a_live_peer(handler, bundles, lambda server, transport: _sessions_step_together(
            server, transport, 2, 4))

    outputs, bundled = asyncio.run(scenario())
    assert (bundled > 0) == bundles and handler.stats.bundled_steps == bundled
    for got, want in zip(outputs, _expected(handler, 2, 4)):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_a_lone_session_keeps_to_its_own_stream(make_handler):
    handler = make_handler()

    async def scenario():
        return await _on_a_live_peer(handler, True, lambda server, transport: _sessions_step_together(
            server, transport, 1, 4))

    _, bundled = asyncio.run(scenario())
    assert bundled == 0 and handler.stats.bundled_steps == 0


def test_sessions_that_follow_closed_ones_bundle_on_a_new_stream_without_waiting(make_handler):
    """The bundle stream closes with the last session; sessions opened right after get a new one, and none of their
    steps waits for a reply that the old stream's end swallowed."""
    # room for the closed sessions too: the peer frees them when it sees their streams end, which may come later
    handler = make_handler(max_sessions=16, cache_tokens=256)

    async def scenario():
        async def four_times(server, transport):
            for _ in range(4):
                await asyncio.wait_for(_sessions_step_together(server, transport, 2, 3), timeout=20)

        return await _on_a_live_peer(handler, True, four_times)

    _, bundled = asyncio.run(scenario())
    assert bundled > 0
