"""Tests of swarm.protocol: wire messages and tensors survive a round trip; bad input is one ProtocolError."""

from __future__ import annotations

import hashlib

import msgpack
import pytest
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor

from swarm.protocol import (
    MAX_METADATA_BYTES,
    PROTOCOL_VERSION,
    ErrorInfo,
    PeerInfo,
    ProtocolError,
    SpanRequest,
    BlocksReply,
    StepRequest,
    WireModel,
    all_finite,
    deserialize_tensors,
    error_reply,
    make_reply,
    make_request,
    pack,
    serialize_tensors,
    tensor_digest,
    unpack,
)

MESSAGES: list[WireModel] = [
    PeerInfo(
        model="tiny@abc", start=2, end=7, dtype="bfloat16", throughput=12.5, max_length=4096,
        cache_tokens_left=100_000, sessions=3,
    ),
    SpanRequest(start=0, end=4),
    StepRequest(session_id="s-1", start=3, end=9, position=17, max_length=512),
    StepRequest(session_id="x" * 128, start=0, end=1, position=0, max_length=1, close=True),
    BlocksReply(length=42),
    BlocksReply(error=ErrorInfo(kind="unknown_session", message="no session s-1")),
    ErrorInfo(kind="busy", message="try later"),
]


def raw(fields: object) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def assert_one_line_protocol_error(data: bytes, model: type[WireModel], match: str) -> ProtocolError:
    with pytest.raises(ProtocolError, match=match) as info:
        unpack(data, model)
    assert "\n" not in str(info.value)
    return info.value


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_pack_unpack_round_trip(message):
    data = pack(message)
    assert isinstance(data, bytes)
    decoded = unpack(data, type(message))
    assert decoded == message
    assert type(decoded) is type(message)


def test_version_is_sent():
    assert msgpack.unpackb(pack(SpanRequest(start=0, end=1)))["version"] == PROTOCOL_VERSION


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"\xc1", "not msgpack"),  # a byte msgpack never uses
        (b"\x92\x01", "not msgpack"),  # a truncated array
        (b"\x80\x01", "not msgpack"),  # trailing bytes after a complete value
        (b"", "not msgpack"),
    ],
)
def test_garbage_bytes(data, reason):
    assert_one_line_protocol_error(data, SpanRequest, reason)


@pytest.mark.parametrize("value", [[1, 2], 5, "start", None, b"bytes"])
def test_non_map_msgpack(value):
    assert_one_line_protocol_error(raw(value), SpanRequest, "not a map")


def test_oversized_metadata():
    data = raw({"start": 0, "end": 1, "padding": "x" * MAX_METADATA_BYTES})
    error = assert_one_line_protocol_error(data, SpanRequest, "more than")
    assert str(len(data)) in str(error)


def test_metadata_at_the_limit_is_accepted():
    base = raw({"start": 0, "end": 1, "padding": ""})
    data = raw({"start": 0, "end": 1, "padding": "x" * (MAX_METADATA_BYTES - len(base) - 2)})  # str16 header is 3 bytes, not 1
    assert len(data) == MAX_METADATA_BYTES
    assert unpack(data, SpanRequest) == SpanRequest(start=0, end=1)


@pytest.mark.parametrize(
    "fields, model, where",
    [
        ({"start": "abc", "end": 1}, SpanRequest, "start"),
        ({"start": 0, "end": [1]}, SpanRequest, "end"),
        ({"start": 0, "end": None}, SpanRequest, "end"),
        ({"start": 0.5, "end": 1}, SpanRequest, "start"),
        ({"session_id": 7, "start": 0, "end": 1, "position": 0, "max_length": 8}, StepRequest, "session_id"),
        ({"session_id": "", "start": 0, "end": 1, "position": 0, "max_length": 8}, StepRequest, "session_id"),
        ({"session_id": "s" * 129, "start": 0, "end": 1, "position": 0, "max_length": 8}, StepRequest, "session_id"),
        ({"session_id": "s", "start": 0, "end": 1, "position": -1, "max_length": 8}, StepRequest, "position"),
        ({"session_id": "s", "start": 0, "end": 1, "position": 0, "max_length": 0}, StepRequest, "max_length"),
        ({"error": {"kind": "nonsense", "message": "m"}}, BlocksReply, "error.kind"),
        ({"error": "broken"}, BlocksReply, "error"),
        ({"model": "m", "start": 0, "end": 1, "dtype": "f", "throughput": "fast", "max_length": 1,
          "cache_tokens_left": 0, "sessions": 0}, PeerInfo, "throughput"),
    ],
)
def test_wrong_field_types(fields, model, where):
    error = assert_one_line_protocol_error(raw(fields), model, f"invalid {model.__name__}: {where}:")
    assert str(error).startswith(f"invalid {model.__name__}")


def test_numbers_must_not_be_coerced_from_strings_or_booleans():
    with pytest.raises(ProtocolError):
        unpack(raw({"start": "5", "end": 6}), SpanRequest)
    with pytest.raises(ProtocolError):
        unpack(raw({"start": 0, "end": True}), SpanRequest)


@pytest.mark.parametrize(
    "fields, model, where",
    [
        ({}, SpanRequest, "start"),
        ({"start": 0}, SpanRequest, "end"),
        ({"start": 0, "end": 1, "position": 0, "max_length": 8}, StepRequest, "session_id"),
        ({"error": {"kind": "busy"}}, BlocksReply, "error.message"),
    ],
)
def test_missing_fields(fields, model, where):
    assert_one_line_protocol_error(raw(fields), model, f"invalid {model.__name__}: {where}: Field required")


def test_unknown_extra_fields_are_ignored():
    fields = {"version": 2, "start": 1, "end": 3, "priority": "high", "nested": {"a": [1, 2]}}
    message = unpack(raw(fields), SpanRequest)
    assert message == SpanRequest(version=2, start=1, end=3)
    assert not hasattr(message, "priority")


def test_messages_are_frozen():
    message = SpanRequest(start=0, end=1)
    with pytest.raises(Exception):
        message.start = 5  # type: ignore[misc]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_make_request_round_trip(dtype):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 3, 8, generator=generator).to(dtype)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.int64)
    message = StepRequest(session_id="abc", start=0, end=4, position=0, max_length=16)
    request = make_request("model_block0", message, hidden, mask)
    assert request.uid == "model_block0"
    assert unpack(request.metadata, StepRequest) == message
    got_hidden, got_mask = deserialize_tensors(request.tensors)
    assert got_hidden.dtype == dtype and torch.equal(got_hidden, hidden)
    assert got_mask.dtype == torch.int64 and torch.equal(got_mask, mask)


def test_make_reply_and_error_reply():
    hidden = torch.randn(1, 2, 4)
    reply = make_reply(BlocksReply(length=2), hidden)
    assert unpack(reply.metadata, BlocksReply) == BlocksReply(length=2)
    assert torch.equal(deserialize_tensors(reply.tensors)[0], hidden)

    refused = error_reply("too_long", "session would exceed 16 tokens")
    decoded = unpack(refused.metadata, BlocksReply)
    assert decoded.error == ErrorInfo(kind="too_long", message="session would exceed 16 tokens")
    assert list(refused.tensors) == []


def test_empty_tensor_list():
    assert deserialize_tensors(serialize_tensors()) == []


def test_corrupt_tensor_buffer():
    (proto,) = serialize_tensors(torch.randn(4, 4))
    proto.buffer = proto.buffer[:10]  # 10 bytes cannot hold 16 float32 values
    with pytest.raises(ProtocolError, match="cannot be decoded") as info:
        deserialize_tensors([proto])
    assert "\n" not in str(info.value)


def test_tensor_with_a_wrong_shape():
    (proto,) = serialize_tensors(torch.randn(4, 4))
    del proto.size[:]
    proto.size.extend([5, 5])  # 25 values announced, 16 sent
    with pytest.raises(ProtocolError, match="cannot be decoded"):
        deserialize_tensors([proto])


TENSORS = [
    torch.randn(1, 1, 576), torch.randn(2, 3, 8).half(), torch.randn(2, 5).double(), torch.arange(12).reshape(3, 4),
    torch.ones(2, 7, dtype=torch.int32), torch.randn(4, 6).t(), torch.randn(2, 3).bfloat16(), torch.zeros(0, 4),
    torch.randn(3, requires_grad=True), torch.tensor(2.5),
]
TENSOR_IDS = ["decode", "float16", "float64", "int64", "int32", "transposed", "bfloat16", "empty", "requires-grad", "0-d"]


@pytest.mark.parametrize("tensor", TENSORS, ids=TENSOR_IDS)
def test_tensors_serialise_to_the_message_hivemind_makes_and_back_as_hivemind_reads_it(tensor):
    message = serialize_tensors(tensor)[0]
    assert message == serialize_torch_tensor(tensor)
    (back,) = deserialize_tensors([message])
    reference = deserialize_torch_tensor(message)
    assert back.dtype == reference.dtype == tensor.dtype and back.shape == reference.shape == tensor.shape
    assert torch.equal(back, tensor.detach()) and back.requires_grad == reference.requires_grad
    if back.numel():
        back.detach().view(-1)[0] = 1  # writable, and not the message's memory
        assert deserialize_tensors([message])[0].view(-1)[0] == reference.view(-1)[0]


def _general_digest(t: torch.Tensor) -> str:
    """tensor_digest's definition, spelled out: sha256 over dtype, shape and the C-order bytes."""
    h = hashlib.sha256()
    h.update(str(t.dtype).encode())
    h.update(repr(tuple(t.shape)).encode())
    h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("tensor", TENSORS, ids=TENSOR_IDS)
def test_tensor_digests_are_the_same_for_every_layout_and_dtype(tensor):
    assert tensor_digest(tensor) == _general_digest(tensor)
    assert tensor_digest(tensor.detach().contiguous()) == tensor_digest(tensor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.bfloat16])
def test_all_finite_finds_nan_and_infinity(dtype):
    clean = torch.randn(2, 3, 8).to(dtype)
    assert all_finite(clean) and all_finite(clean[:, 1:].transpose(1, 2))
    for bad in (float("nan"), float("inf"), float("-inf")):
        broken = clean.clone()
        broken[1, 2, 5] = bad
        assert not all_finite(broken)
