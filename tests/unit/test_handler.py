"""The peer's BlockHandler, driven in-process (no network): every malformed or over-limit request gets a typed
error reply, changes nothing, and the handler (and the stream it came on) keeps serving."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import torch
from hivemind.proto import runtime_pb2

from handler_kit import NUM_BLOCKS, Stream, forward, hidden
from swarm import protocol
from swarm.blocks import SpanInput
from swarm.protocol import SpanRequest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_error(reply, kind: str, words: str = "") -> None:
    assert reply.error is not None, "expected an error reply"
    assert reply.error.kind == kind, reply.error
    assert words in reply.error.message, reply.error.message


def assert_serves(handler) -> None:
    """A good forward still gets the span's output."""
    x = hidden(1, 2, seed=99)
    reply, tensors = forward(handler, x)
    assert reply.error is None, reply.error
    torch.testing.assert_close(tensors[0], handler.span(x, None, SpanInput(None, 0)))


def raw_request(metadata: bytes, *tensors: torch.Tensor) -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(uid="", metadata=metadata, tensors=protocol.serialize_tensors(*tensors))


def span_request(*tensors: torch.Tensor, start: int = 0, end: int = NUM_BLOCKS) -> runtime_pb2.ExpertRequest:
    return protocol.make_request("", SpanRequest(start=start, end=end), *tensors)


def failing(message: str):
    def forward(*args, **kwargs):
        raise RuntimeError(message)

    return forward


# --- rpc_forward ---------------------------------------------------------------------------------------------


def test_forward_returns_the_span_output_and_counts_tokens(make_handler) -> None:
    handler = make_handler()
    x = hidden(2, 3)
    reply, tensors = forward(handler, x)
    assert reply.error is None and reply.length == 3 and len(tensors) == 1
    torch.testing.assert_close(tensors[0], handler.span(x, None, SpanInput(None, 0)))
    reply, tensors = forward(handler, x, start=1, end=2)
    torch.testing.assert_close(tensors[0], handler.span(x, None, SpanInput(None, 0), 1, 2))
    assert handler.stats.tokens_served == 12
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    reply, tensors = forward(handler, x, request=span_request(x, mask))
    assert reply.error is None
    torch.testing.assert_close(tensors[0][1], handler.span(x, None, SpanInput(None, 0))[1])


BAD_FORWARDS = {
    # name: (request, error kind, words in the message)
    "metadata not msgpack": (lambda: raw_request(b"\xc1\xc1", hidden()), "bad_request", "not msgpack"),
    "metadata not a map": (lambda: raw_request(msgpack.packb([0, 3]), hidden()), "bad_request", "not a map"),
    "metadata of wrong types": (lambda: raw_request(msgpack.packb({"start": "0", "end": 3}), hidden()),
                                "bad_request", "SpanRequest"),
    "metadata too large": (lambda: raw_request(b"\x00" * (protocol.MAX_METADATA_BYTES + 1), hidden()),
                           "bad_request", "more than"),
    "no tensor": (lambda: span_request(), "bad_request", "expected 1 or 2 tensors"),
    "three tensors": (lambda: span_request(hidden(), hidden(), hidden()), "bad_request", "expected 1 or 2 tensors"),
    "wrong hidden size": (lambda: span_request(hidden(size=32)), "bad_request", "hidden states must be"),
    "not 3-d": (lambda: span_request(hidden()[0]), "bad_request", "hidden states must be"),
    "not floating point": (lambda: span_request(torch.ones(1, 4, 64, dtype=torch.int64)), "bad_request",
                           "floating point"),
    "NaN input": (lambda: span_request(hidden().index_fill(2, torch.tensor([5]), float("nan"))), "bad_request",
                  "NaN"),
    "infinite input": (lambda: span_request(hidden().index_fill(1, torch.tensor([0]), float("inf"))),
                       "bad_request", "infinity"),
    "batch over max_batch": (lambda: span_request(hidden(5, 1)), "bad_request", "batch must be 1..4"),
    "no tokens": (lambda: span_request(hidden(1, 0)), "bad_request", "tokens >= 1"),
    "tokens per request": (lambda: span_request(hidden(4, 17)), "too_long", "in one request exceed 64"),
    "tokens over max_length": (lambda: span_request(hidden(1, 33)), "too_long", "limit of 32"),
    "mask of wrong shape": (lambda: span_request(hidden(1, 4), torch.ones(1, 5)), "bad_request", "attention mask"),
    "mask not 0/1": (lambda: span_request(hidden(1, 2), torch.tensor([[2, 1]])), "bad_request", "attention mask"),
    "blocks beyond the span": (lambda: span_request(hidden(), start=1, end=NUM_BLOCKS + 1), "bad_span", "not within"),
    "empty block range": (lambda: span_request(hidden(), start=2, end=2), "bad_span", "not within"),
}


@pytest.mark.parametrize("case", list(BAD_FORWARDS))
def test_forward_rejects_a_bad_request_and_keeps_serving(make_handler, case: str) -> None:
    handler = make_handler()
    request, kind, words = BAD_FORWARDS[case]
    reply, tensors = forward(handler, None, request=request())
    assert_error(reply, kind, words)
    assert tensors == [] and handler.stats.tokens_served == 0
    assert_serves(handler)


def test_forward_failure_inside_the_blocks_is_an_internal_error(make_handler, monkeypatch) -> None:
    handler = make_handler()
    with monkeypatch.context() as patch:
        patch.setattr(handler.span, "forward", failing("out of memory, say"))
        reply, _ = forward(handler, hidden())
    assert_error(reply, "internal", "RuntimeError: out of memory")
    assert_serves(handler)


def test_forward_is_refused_while_draining(make_handler) -> None:
    handler = make_handler()
    handler.draining = True
    reply, _ = forward(handler, hidden())
    assert_error(reply, "busy", "moving")
    handler.draining = False
    assert_serves(handler)


# --- rpc_inference -------------------------------------------------------------------------------------------


def test_inference_matches_the_stateless_forward_and_frees_sessions_with_the_stream(make_handler) -> None:
    handler = make_handler()
    x = hidden(1, 6)

    async def scenario():
        stream = Stream(handler)
        prefill, (first,) = await stream.step("a", 0, x[:, :5])
        decode, (second,) = await stream.step("a", 5, x[:, 5:])
        assert (prefill.length, decode.length) == (5, 6) and prefill.error is None and decode.error is None
        assert len(handler.sessions()) == 1 and handler.reserved_tokens() == 16
        assert handler.info().cache_tokens_left == 48 - 16 and handler.info().sessions == 1
        await stream.close()
        return torch.cat([first, second], dim=1)

    stepped = asyncio.run(scenario())
    torch.testing.assert_close(stepped, forward(handler, x)[1][0], atol=1e-5, rtol=1e-4)
    assert handler.sessions() == [] and handler.reserved_tokens() == 0
    assert handler.stats.tokens_served == 6 + 6


def run_stream(handler, scenario) -> None:
    """Run `scenario(stream)`, then check the same stream still serves a new session and the handler a forward."""

    async def main():
        stream = Stream(handler)
        await scenario(stream)
        reply, tensors = await stream.step("after", 0, hidden(1, 2))
        assert reply.error is None and reply.length == 2 and tensors[0].shape == (1, 2, 64), reply.error
        await stream.close()

    asyncio.run(main())
    assert_serves(handler)


def test_malformed_step_metadata(make_handler) -> None:
    async def scenario(stream):
        reply, _ = await stream.send(raw_request(b"\xc1", hidden()))
        assert_error(reply, "bad_request", "not msgpack")
        bad = dict(session_id="", start=0, end=NUM_BLOCKS, position=0, max_length=16)
        reply, _ = await stream.send(raw_request(msgpack.packb(bad), hidden()))
        assert_error(reply, "bad_request", "session_id")
        reply, _ = await stream.send(raw_request(msgpack.packb({**bad, "session_id": "s", "position": -1}), hidden()))
        assert_error(reply, "bad_request", "position")

    run_stream(make_handler(), scenario)


def test_bad_tensors_in_a_step(make_handler) -> None:
    async def scenario(stream):
        for tensors, words in [
            ((), "expected 1 or 2 tensors"),
            ((hidden(size=32),), "hidden states must be"),
            ((torch.ones(1, 2, 64, dtype=torch.int32),), "floating point"),
            ((hidden().index_fill(1, torch.tensor([1]), float("nan")),), "NaN"),
            ((hidden(5, 1),), "batch must be"),
        ]:
            reply, _ = await stream.step("s", 0, *tensors)
            assert_error(reply, "bad_request", words)
        reply, _ = await stream.step("s", 0, hidden(1, 4))
        assert reply.error is None
        # the mask of a later step covers the cached tokens too
        reply, _ = await stream.step("s", 4, hidden(1, 1), torch.ones(1, 1))
        assert_error(reply, "bad_request", "attention mask")
        reply, _ = await stream.step("s", 4, hidden(2, 1))
        assert_error(reply, "bad_request", "batch size 2 differs")
        reply, _ = await stream.step("s", 4, hidden(1, 1), torch.ones(1, 5))
        assert reply.error is None and reply.length == 5

    run_stream(make_handler(), scenario)


def test_step_limits_on_tokens_and_lengths(make_handler) -> None:
    async def scenario(stream):
        reply, _ = await stream.step("s", 0, hidden(4, 17), max_length=32)
        assert_error(reply, "too_long", "in one request exceed 64")
        reply, _ = await stream.step("s", 0, hidden(1, 4), max_length=33)
        assert_error(reply, "too_long", "limit of 32")
        reply, _ = await stream.step("s", 0, hidden(1, 17), max_length=16)
        assert_error(reply, "too_long", "max_length 16")
        reply, _ = await stream.step("s", 0, hidden(1, 10), max_length=16)
        assert reply.error is None and reply.length == 10
        reply, _ = await stream.step("s", 10, hidden(1, 7), max_length=16)
        assert_error(reply, "too_long", "17 tokens exceed")
        reply, _ = await stream.step("s", 10, hidden(1, 6), max_length=16)
        assert reply.error is None and reply.length == 16

    run_stream(make_handler(), scenario)


def test_a_refused_first_step_opens_no_session(make_handler, monkeypatch) -> None:
    handler = make_handler()  # max_sessions=2

    async def scenario(stream):
        for session in ("a", "b", "c"):
            reply, _ = await stream.step(session, 0, hidden(1, 20), max_length=16)
            assert_error(reply, "too_long")
            reply, _ = await stream.step(session, 0, hidden(size=32))
            assert_error(reply, "bad_request")
        with monkeypatch.context() as patch:
            patch.setattr(handler.span, "forward", failing("device lost"))
            reply, _ = await stream.step("d", 0, hidden(1, 2))
            assert_error(reply, "internal")
        assert handler.sessions() == [] and handler.reserved_tokens() == 0
        reply, _ = await stream.step("a", 1, hidden(1, 1))
        assert_error(reply, "unknown_session")
        reply, _ = await stream.step("a", 0, hidden(1, 2))
        assert reply.error is None
        await stream.step("a", 2, close=True)

    run_stream(handler, scenario)


def test_unknown_session_and_bad_position(make_handler) -> None:
    async def scenario(stream):
        reply, _ = await stream.step("never-opened", 3, hidden(1, 1))
        assert_error(reply, "unknown_session", "position 0")
        reply, _ = await stream.step("s", 0, hidden(1, 4))
        assert reply.error is None
        reply, _ = await stream.step("s", 6, hidden(1, 1))
        assert_error(reply, "bad_position", "holds 4 tokens")
        reply, _ = await stream.step("s", 4, hidden(1, 1))
        assert reply.error is None and reply.length == 5

    run_stream(make_handler(), scenario)


def test_a_session_lives_on_its_own_stream(make_handler) -> None:
    handler = make_handler()

    async def scenario():
        first, second = Stream(handler), Stream(handler)
        reply, _ = await first.step("s", 0, hidden(1, 4))
        assert reply.error is None
        reply, _ = await second.step("s", 4, hidden(1, 1))
        assert_error(reply, "unknown_session")
        await first.close()
        await second.close()

    asyncio.run(scenario())
    assert handler.sessions() == []


def test_bad_span(make_handler) -> None:
    async def scenario(stream):
        reply, _ = await stream.step("s", 0, hidden(1, 2), start=1, end=NUM_BLOCKS + 1)
        assert_error(reply, "bad_span", "not within")
        reply, _ = await stream.step("s", 0, hidden(1, 2), start=1, end=2)
        assert reply.error is None
        reply, _ = await stream.step("s", 2, hidden(1, 1), start=0, end=2)
        assert_error(reply, "bad_span", "session covers blocks 1:2")
        reply, _ = await stream.step("s", 2, hidden(1, 1), start=1, end=2)
        assert reply.error is None and reply.length == 3

    run_stream(make_handler(), scenario)


def test_max_sessions_busy(make_handler) -> None:
    handler = make_handler()  # max_sessions=2

    async def scenario(stream):
        for session in ("a", "b"):
            reply, _ = await stream.step(session, 0, hidden(1, 2))
            assert reply.error is None
        other = Stream(handler)
        reply, _ = await other.step("c", 0, hidden(1, 2))
        assert_error(reply, "busy", "maximum of 2 sessions")
        await other.close()
        assert len(handler.sessions()) == 2
        reply, _ = await stream.step("a", 2, close=True)
        assert reply.error is None

    run_stream(handler, scenario)


def test_cache_budget_busy(make_handler) -> None:
    handler = make_handler(cache_tokens=48)

    async def scenario(stream):
        reply, _ = await stream.step("a", 0, hidden(1, 2), max_length=32)
        assert reply.error is None and handler.reserved_tokens() == 32
        reply, _ = await stream.step("b", 0, hidden(1, 2), max_length=32)
        assert_error(reply, "busy", "no KV-cache room for 1 x 32 tokens (16 of 48 left)")
        reply, _ = await stream.step("b", 0, hidden(2, 2), max_length=16)
        assert_error(reply, "busy", "no KV-cache room for 2 x 16 tokens")
        assert [s.session_id for s in handler.sessions()] == ["a"] and handler.reserved_tokens() == 32
        reply, _ = await stream.step("a", 0, close=True)
        reply, _ = await stream.step("b", 0, hidden(1, 2), max_length=16)
        assert reply.error is None and handler.reserved_tokens() == 16
        reply, _ = await stream.step("b", 2, close=True)

    run_stream(handler, scenario)


def test_rollback_crops_the_cache(make_handler) -> None:
    handler = make_handler()
    x, y = hidden(1, 6), hidden(1, 1, seed=5)
    expected = forward(handler, torch.cat([x[:, :3], y], dim=1))[1][0][:, 3:]

    async def scenario(stream):
        reply, _ = await stream.step("s", 0, x[:, :5])
        reply, _ = await stream.step("s", 5, x[:, 5:])
        assert reply.length == 6
        reply, (rolled,) = await stream.step("s", 3, y)
        assert reply.error is None and reply.length == 4
        torch.testing.assert_close(rolled, expected, atol=1e-5, rtol=1e-4)
        reply, _ = await stream.step("s", 4, hidden(1, 1))
        assert reply.error is None and reply.length == 5

    run_stream(handler, scenario)


def test_close_ends_a_session(make_handler) -> None:
    handler = make_handler()

    async def scenario(stream):
        reply, _ = await stream.step("s", 0, hidden(1, 3))
        assert reply.error is None and handler.reserved_tokens() == 16
        reply, tensors = await stream.step("s", 3, close=True)
        assert reply.error is None and tensors == [] and handler.sessions() == []
        reply, _ = await stream.step("s", 3, hidden(1, 1))
        assert_error(reply, "unknown_session")
        reply, _ = await stream.step("never-opened", 0, close=True)  # closing twice or never is harmless
        assert reply.error is None

    run_stream(handler, scenario)


def test_idle_sessions_expire(make_handler) -> None:
    handler = make_handler(session_idle_timeout=60.0)

    async def scenario(stream):
        for session in ("idle", "busy"):
            reply, _ = await stream.step(session, 0, hidden(1, 3))
        assert handler.expire_idle_sessions() == 0
        next(s for s in handler.sessions() if s.session_id == "idle").last_used -= 61.0
        assert handler.expire_idle_sessions() == 1
        assert [s.session_id for s in handler.sessions()] == ["busy"]
        reply, _ = await stream.step("idle", 3, hidden(1, 1))
        assert_error(reply, "unknown_session")
        reply, _ = await stream.step("busy", 3, hidden(1, 1))
        assert reply.error is None and reply.length == 4
        reply, _ = await stream.step("idle", 0, hidden(1, 3))  # the client replays it from the start
        assert reply.error is None and reply.length == 3
        await stream.step("idle", 3, close=True)

    run_stream(handler, scenario)


def test_draining_refuses_new_sessions_but_finishes_open_ones(make_handler) -> None:
    handler = make_handler()

    async def scenario(stream):
        reply, _ = await stream.step("open", 0, hidden(1, 3))
        handler.draining = True
        reply, _ = await stream.step("new", 0, hidden(1, 3))
        assert_error(reply, "busy", "moving to other blocks")
        reply, _ = await stream.step("open", 3, hidden(1, 1))
        assert reply.error is None and reply.length == 4
        handler.draining = False
        await stream.step("open", 4, close=True)

    run_stream(handler, scenario)


def test_a_failing_step_is_internal_and_leaves_the_stream_open(make_handler, monkeypatch) -> None:
    handler = make_handler()

    async def scenario(stream):
        reply, _ = await stream.step("s", 0, hidden(1, 3))
        with monkeypatch.context() as patch:
            patch.setattr(handler.span, "forward", failing("device lost"))
            reply, _ = await stream.step("s", 3, hidden(1, 1))
        assert_error(reply, "internal", "RuntimeError: device lost")
        reply, _ = await stream.step("s", 3, hidden(1, 1))  # failing before the blocks ran changed nothing
        assert reply.error is None and reply.length == 4
        await stream.step("s", 0, close=True)

    run_stream(handler, scenario)


def test_replace_span_drops_sessions(make_handler, make_span) -> None:
    handler = make_handler()

    async def scenario(stream):
        reply, _ = await stream.step("s", 0, hidden(1, 3))
        handler.replace_span(make_span(1, NUM_BLOCKS), throughput=50.0)
        assert handler.sessions() == [] and handler.info().start == 1 and handler.info().throughput == 50.0
        reply, _ = await stream.step("s", 3, hidden(1, 1))
        assert_error(reply, "unknown_session")
        reply, _ = await stream.step("after", 0, hidden(1, 2), start=0)
        assert_error(reply, "bad_span", "1:3")
        reply, _ = await stream.step("s", 0, hidden(1, 2), start=1)
        assert reply.error is None
        await stream.step("s", 2, close=True, start=1)

    async def main():
        stream = Stream(handler)
        await scenario(stream)
        await stream.close()

    asyncio.run(main())
    reply, _ = forward(handler, hidden(1, 2), start=1)
    assert reply.error is None


def test_info_rpc(make_handler) -> None:
    handler = make_handler(throughput=12.5)
    reply = asyncio.run(handler.rpc_info(runtime_pb2.ExpertUID(uid=""), None))
    info = protocol.unpack(reply.serialized_info, protocol.PeerInfo)
    assert (info.model, info.start, info.end, info.dtype) == ("tiny@test", 0, NUM_BLOCKS, "float32")
    assert (info.throughput, info.max_length, info.cache_tokens_left, info.sessions) == (12.5, 32, 48, 0)
