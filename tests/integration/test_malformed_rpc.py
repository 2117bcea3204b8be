"""A live peer answers malformed requests with typed errors and keeps serving everyone else."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import torch
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from swarm import protocol
from swarm.errors import RemoteError
from swarm.protocol import SpanRequest, StepRequest, TrainRequest
from swarm.parts import to_messages
from swarm.remote import BlockService, InferenceStream, call_forward, call_info

pytestmark = pytest.mark.slow

HIDDEN = 576


@pytest.fixture(scope="module")
def first_hop(client):
    route = client.loop.run(client.sequence.make_route())
    return route[0]


def run(client, coroutine):
    return client.loop.run(coroutine, timeout=60)


def forward_raw(client, peer_id, request: runtime_pb2.ExpertRequest) -> runtime_pb2.ExpertResponse:
    stub = BlockService.get_stub(client.p2p, peer_id)
    return run(client, stub.rpc_forward(request, timeout=30))


def assert_error(reply: runtime_pb2.ExpertResponse, kind: str) -> str:
    meta = protocol.unpack(reply.metadata, protocol.BlocksReply)
    assert meta.error is not None and meta.error.kind == kind, meta
    assert "\n" not in meta.error.message
    return meta.error.message


def assert_still_serving(client, first_hop, local_model, chat_ids):
    """A correct request from another client still gets the right answer."""
    with torch.inference_mode():
        hidden = local_model.model.embed_tokens(chat_ids)
        position_ids = torch.arange(chat_ids.shape[1])[None]
        embeddings = local_model.model.rotary_emb(hidden, position_ids)
        expected = hidden
        for layer in local_model.model.layers[first_hop.start : first_hop.end]:
            expected = layer(expected, None, position_ids, None, position_embeddings=embeddings)
            expected = expected[0] if isinstance(expected, tuple) else expected
    produced = run(client, call_forward(client.p2p, first_hop.peer_id, first_hop.start, first_hop.end, hidden)).output
    assert torch.allclose(produced, expected, atol=1e-4)


def test_garbage_bytes_on_unary_and_stream_handlers(client, first_hop, local_model, chat_ids):
    p2p: P2P = client.p2p

    async def garbage_unary():
        handle = BlockService._get_handle_name(None, "rpc_forward")
        try:
            await asyncio.wait_for(p2p._client.call_unary_handler(first_hop.peer_id, handle, b"\xff\x00garbage"), 20)
        except Exception as e:  # the peer reports a decoding error; any error type is fine, a hang is not
            return type(e).__name__
        return "answered"

    async def garbage_stream():
        handle = BlockService._get_handle_name(None, "rpc_inference")
        closed = []
        for frame in (P2P.MESSAGE_MARKER, b"\x7f"):  # a framed non-protobuf message; an unknown frame type
            _, reader, writer = await p2p.call_binary_stream_handler(first_hop.peer_id, handle)
            try:
                writer.write(frame)
                try:
                    await P2P.send_raw_data(b"\xff\xff\xff garbage that is no protobuf", writer)
                except ConnectionError:  # the peer closed the stream at the bad frame, before the rest was written
                    closed.append(True)
                    continue
                await asyncio.wait_for(reader.read(), 20)  # returns once the peer closes the stream
                closed.append(True)
            finally:
                writer.close()
        return closed

    run(client, garbage_unary())
    assert run(client, garbage_stream()) == [True, True]
    assert_still_serving(client, first_hop, local_model, chat_ids)


def test_bad_metadata_shapes_and_dtypes_are_refused(client, first_hop, local_model, chat_ids):
    peer = first_hop.peer_id
    good_meta = SpanRequest(start=first_hop.start, end=first_hop.end)
    cases = {
        "not msgpack": runtime_pb2.ExpertRequest(metadata=b"\xc1\xc1", tensors=protocol.serialize_tensors(torch.zeros(1, 2, HIDDEN))),
        "wrong field type": runtime_pb2.ExpertRequest(
            metadata=msgpack.packb({"start": "zero", "end": 10}), tensors=protocol.serialize_tensors(torch.zeros(1, 2, HIDDEN))
        ),
        "wrong hidden size": protocol.make_request("", good_meta, torch.zeros(1, 2, HIDDEN + 1)),
        "wrong rank": protocol.make_request("", good_meta, torch.zeros(2, HIDDEN)),
        "integer dtype": protocol.make_request("", good_meta, torch.zeros(1, 2, HIDDEN, dtype=torch.int64)),
        "no tensors": protocol.make_request("", good_meta),
        "NaN input": protocol.make_request("", good_meta, torch.full((1, 2, HIDDEN), float("nan"))),
    }
    for name, request in cases.items():
        message = assert_error(forward_raw(client, peer, request), "bad_request")
        assert message, name
    out_of_span = protocol.make_request("", SpanRequest(start=0, end=31), torch.zeros(1, 2, HIDDEN))
    assert_error(forward_raw(client, peer, out_of_span), "bad_span")
    assert_still_serving(client, first_hop, local_model, chat_ids)


def test_session_errors_keep_the_stream_and_the_peer_alive(client, first_hop, local_model, chat_ids):
    peer = first_hop.peer_id
    info, _ = run(client, call_info(client.p2p, peer))

    def meta(session_id: str, position: int, max_length: int = 64) -> StepRequest:
        return StepRequest(session_id=session_id, start=first_hop.start, end=first_hop.end, position=position,
                           max_length=max_length)

    async def scenario():
        stream = InferenceStream(client.p2p, peer)
        errors = {}
        for name, (message, hidden) in {
            "unknown_session": (meta("never-opened", 5), torch.zeros(1, 1, HIDDEN)),
            "too_long": (meta("s1", 0, max_length=info.max_length + 1), torch.zeros(1, 1, HIDDEN)),
            "too_long_for_session": (meta("s2", 0, max_length=4), torch.zeros(1, 5, HIDDEN)),
        }.items():
            try:
                await stream.step(message, hidden, timeout=30)
            except RemoteError as e:
                errors[name] = e.kind
        # The same stream still works: prefill, then a step that skips ahead (position beyond the cache).
        await stream.step(meta("s3", 0), torch.zeros(1, 3, HIDDEN), timeout=30)
        try:
            await stream.step(meta("s3", 7), torch.zeros(1, 1, HIDDEN), timeout=30)
        except RemoteError as e:
            errors["bad_position"] = e.kind
        reply = await stream.step(meta("s3", 3), torch.zeros(1, 1, HIDDEN), timeout=30)
        await stream.close()
        return errors, reply.length, reply.output.shape

    errors, length, shape = run(client, scenario())
    assert errors == {
        "unknown_session": "unknown_session",
        "too_long": "too_long",
        "too_long_for_session": "too_long",
        "bad_position": "bad_position",
    }
    assert length == 4 and tuple(shape) == (1, 1, HIDDEN)
    assert_still_serving(client, first_hop, local_model, chat_ids)


def test_malformed_bundles_are_refused_and_the_peer_keeps_serving(client, first_hop, local_model, chat_ids):
    peer = first_hop.peer_id
    step = StepRequest(session_id="never-opened", start=first_hop.start, end=first_hop.end, position=3, max_length=64)
    bundle = protocol.StepBundle(bundle=5, steps=[protocol.BundledStep(step=step, tensors=1)])
    messages = [
        runtime_pb2.ExpertRequest(metadata=b"\xc1\xc1", tensors=protocol.serialize_tensors(torch.zeros(1, 1, HIDDEN))),
        runtime_pb2.ExpertRequest(metadata=protocol.pack(bundle)),  # its step's tensor is missing
        runtime_pb2.ExpertRequest(metadata=protocol.pack(bundle),
                                  tensors=protocol.serialize_tensors(torch.zeros(1, 1, HIDDEN))),  # no such session
    ]

    async def call():
        async def requests():
            for message in messages:
                yield message

        replies = await BlockService.get_stub(client.p2p, peer).rpc_bundle(requests())
        return [protocol.unpack(reply.metadata, protocol.BundleReply) async for reply in replies]

    unreadable, miscounted, unknown = sorted(run(client, call()), key=lambda r: (r.bundle is not None, r.error is None))
    assert unreadable.bundle is None and unreadable.error.kind == "bad_request"
    assert miscounted.bundle == 5 and miscounted.error.kind == "bad_request"
    assert unknown.bundle == 5 and unknown.replies[0].reply.error.kind == "unknown_session"
    assert_still_serving(client, first_hop, local_model, chat_ids)


def train_raw(client, peer_id, messages: list[runtime_pb2.ExpertRequest]) -> list[runtime_pb2.ExpertResponse]:
    async def call():
        async def requests():
            for message in messages:
                yield message

        replies = await BlockService.get_stub(client.p2p, peer_id).rpc_train(requests())
        return [reply async for reply in replies]

    return run(client, call())


def train_request(first_hop, kind: str, *tensors: torch.Tensor, **fields) -> runtime_pb2.ExpertRequest:
    meta = TrainRequest(kind=kind, request_id="t", start=first_hop.start, end=first_hop.end,
                        tensors=fields.pop("count", len(tensors)), **fields)
    return protocol.make_request("", meta, *tensors)


def in_parts(first_hop, kind: str, *tensors: torch.Tensor) -> list[runtime_pb2.ExpertRequest]:
    messages = to_messages(tensors)
    meta = TrainRequest(kind=kind, request_id="t", start=first_hop.start, end=first_hop.end, tensors=len(tensors))
    return [runtime_pb2.ExpertRequest(metadata=protocol.pack(meta), tensors=messages[0]),
            *(runtime_pb2.ExpertRequest(tensors=parts) for parts in messages[1:])]


def test_malformed_training_requests_are_refused_and_the_peer_keeps_serving(client, first_hop, local_model, chat_ids):
    hidden = torch.randn(1, 5, HIDDEN)
    cases = [
        ([runtime_pb2.ExpertRequest(metadata=b"\x93junk")], "bad_request"),
        ([train_request(first_hop, "backward", hidden)], "bad_request"),  # no gradient
        ([train_request(first_hop, "backward", hidden, torch.randn(1, 4, HIDDEN))], "bad_request"),  # wrong shape
        ([train_request(first_hop, "forward", torch.randn(1, 5, HIDDEN + 1))], "bad_request"),
        ([train_request(first_hop, "forward", hidden.masked_fill(hidden > 1, float("nan")))], "bad_request"),
        ([train_request(first_hop, "backward", hidden, hidden, torch.randn(2, 3, HIDDEN), prompts=True)],
         "bad_request"),  # prompts for 2 blocks, not the hop's
        ([train_request(first_hop, "forward", torch.randn(1, 9000, 8))], "bad_request"),
        (in_parts(first_hop, "forward", torch.randn(3, 3000, HIDDEN)), "too_long"),  # over --max-train-tokens
    ]
    for messages, kind in cases:
        try:
            replies = train_raw(client, first_hop.peer_id, messages)
        except ConnectionError:  # hivemind can reset a stream whose handler ended while the caller still wrote
            replies = train_raw(client, first_hop.peer_id, messages)
        assert len(replies) == 1
        assert_error(replies[0], kind)
    try:  # a stream that ends before the tensors it announced: the peer answers an error or drops the stream
        replies = train_raw(client, first_hop.peer_id, [train_request(first_hop, "forward", hidden, count=2)])
        assert len(replies) == 1 and assert_error(replies[0], "bad_request")
    except ConnectionError:
        pass
    assert_still_serving(client, first_hop, local_model, chat_ids)


def test_malformed_deep_prompts_in_a_session_are_refused_and_the_stream_goes_on(client, first_hop, local_model,
                                                                                 chat_ids):
    blocks = first_hop.end - first_hop.start
    good = 0.1 * torch.randn(blocks, 4, HIDDEN)
    nan = good.clone()
    nan[0, 1, 2] = float("nan")

    def meta(position: int, prompts: bool = True) -> StepRequest:
        return StepRequest(session_id="deep", start=first_hop.start, end=first_hop.end, position=position,
                           max_length=64, prompts=prompts)

    async def scenario():
        stream = InferenceStream(client.p2p, first_hop.peer_id)
        kinds = []
        for prompts in (good[:-1], nan, good[:, :, :-1], good.to(torch.int32)):
            try:
                await stream.step(meta(0), torch.zeros(1, 6, HIDDEN), timeout=30, prompts=prompts)
            except RemoteError as e:
                kinds.append(e.kind)
        opened = await stream.step(meta(0), torch.zeros(1, 6, HIDDEN), timeout=30, prompts=good)
        try:  # position 6 is past the prompts' 4 positions: nothing to add them to
            await stream.step(meta(6), torch.zeros(1, 1, HIDDEN), timeout=30, prompts=good)
        except RemoteError as e:
            kinds.append(e.kind)
        decoded = await stream.step(meta(6, prompts=False), torch.zeros(1, 1, HIDDEN), timeout=30)
        await stream.close()
        return kinds, opened.length, decoded.length

    kinds, opened, decoded = run(client, scenario())
    assert kinds == ["bad_request"] * 5 and (opened, decoded) == (6, 7)
    assert_still_serving(client, first_hop, local_model, chat_ids)
