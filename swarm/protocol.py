"""What crosses the wire between a client and a peer.

Transport: hivemind P2P RPC with its generic protobufs (`ExpertRequest` / `ExpertResponse`): tensors go
in `tensors` (hivemind serialisation), everything else is a typed, versioned pydantic model packed
with msgpack into `metadata`. RPCs (handler `rpc_x` on the peer, caller `call_x` on the client):

- `rpc_info`       unary: the peer's `PeerInfo` (also used as the ping)
- `rpc_forward`    unary: hidden states through blocks [start, end), no state kept
- `rpc_inference`  bidirectional stream: `StepRequest`s of one or more sessions, one reply each;
                   a session's KV cache lives as long as the stream that opened it
- `rpc_push`       bidirectional stream between peers: `PushBatch`es of `PushRequest`s, each a hop's output pushed to
                   the next hop
                   of a push chain (a client's `StepRequest` with `push_to` / `pushed`), one `BlocksReply` ack each
- `rpc_bundle`     bidirectional stream: `StepBundle`s, the decode steps of several of one client's sessions (opened on
                   their own `rpc_inference` streams) in one message each way; `BundleReply`s, in any order
- `rpc_train`      bidirectional stream, stateless: a `TrainRequest` (a training forward, or a backward that
                   recomputes the forward under autograd) whose tensors travel in parts over as many messages
                   as they need (`swarm.parts`), answered by a `TrainReply` the same way
"""

from __future__ import annotations

import hashlib
from typing import Literal

import msgpack
import numpy as np
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from pydantic import ConfigDict, Field, ValidationError

from swarm.schema import StrictModel, first_error, load_msgpack

from swarm.errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_METADATA_BYTES = 64 * 1024


class WireModel(StrictModel):
    """Base for RPC messages: frozen, strictly typed (no "5" for 5), unknown fields ignored (a newer
    sender may add some)."""

    model_config = ConfigDict(extra="ignore")


class PeerInfo(WireModel):
    """A peer's answer to `rpc_info`."""

    version: int = PROTOCOL_VERSION
    model: str  # the DHT prefix of the model it serves
    start: int
    end: int
    dtype: str
    throughput: float  # block-steps per second (one token through one block)
    max_length: int  # longest session it accepts, in tokens
    cache_tokens_left: int
    sessions: int


class SpanRequest(WireModel):
    """Hidden states through blocks [start, end) of the peer (the `rpc_forward` request). Tensors: hidden states
    (batch, tokens, hidden); deep prompts (end - start, prompt_length, hidden) if `prompts` (as in a `StepRequest`
    at position 0); the 0/1 attention mask (batch, tokens) when some row is padded."""

    version: int = PROTOCOL_VERSION
    start: int
    end: int
    prompts: bool = False


class PushTarget(WireModel):
    """The next hop of a push chain: where a peer sends its output for this step (`rpc_push`)."""

    peer_id: str = Field(min_length=1, max_length=128)  # base58
    start: int  # the next hop's blocks in this session
    end: int


class StepRequest(WireModel):
    """One step of an inference session (the messages of `rpc_inference`).

    The first step of a session (position 0) opens it with `max_length`; later steps continue it.
    `position` is how many tokens the client believes the session already holds: equal to the
    peer's count continues, smaller rolls the cache back to it, larger is an error.
    Tensors, in order: hidden states (batch, new, hidden); deep prompts (end - start, prompt_length, hidden) if
    `prompts`; the 0/1 attention mask (batch, position + new) when some prompt in the batch is padded.

    Deep prompts (a client's trained `swarm.tuning.PromptTuning`): block i's prompt is added to the block's input at
    the session's positions 0..prompt_length-1. A step at `position` adds `prompts[i, position:prompt_length]` to its
    first new tokens, so only steps that start below `prompt_length` carry them (a later one that does is refused);
    the peer's receipt then commits to them too (`inputs_digest`).
    """

    version: int = PROTOCOL_VERSION
    session_id: str = Field(min_length=1, max_length=128)
    start: int
    end: int
    position: int = Field(ge=0)
    max_length: int = Field(ge=1)
    close: bool = False  # end the session after this message (no tensors needed)
    prompts: bool = False  # deep prompts of blocks [start, end) follow the hidden states (never with `pushed`)
    # Push chain (issue 15): the client sends every hop its request at once; each hop passes its output on itself.
    push_to: PushTarget | None = None  # also send the output to this next hop (`rpc_push`), besides replying
    pushed: bool = False  # the hidden states come by push from `push_from`, not in this message (tensors: the mask)
    push_from: str = Field(default="", max_length=128)  # the only peer whose push this step takes (base58)


class PushRequest(WireModel):
    """A hop's output, pushed to the next hop of the route (`rpc_push`): the input of the receiver's step of
    session `session_id` on blocks [start, end) at `position`. Tensor: hidden states (batch, new, hidden)."""

    version: int = PROTOCOL_VERSION
    session_id: str = Field(min_length=1, max_length=128)
    start: int
    end: int
    position: int = Field(ge=0)


MAX_PUSHES_PER_MESSAGE = 64


class PushBatch(WireModel):
    """The pushes of one `rpc_push` message, one tensor each in order: the outputs of a batched run that go to the
    same next hop travel together. (A message whose metadata is one `PushRequest` carries that push alone.)"""

    version: int = PROTOCOL_VERSION
    pushes: list[PushRequest] = Field(min_length=1, max_length=MAX_PUSHES_PER_MESSAGE)


MAX_STEPS_PER_BUNDLE = 64


class BundledStep(WireModel):
    """One step of a `StepBundle`, and how many of the message's tensors are its own (as a `StepRequest`'s, in order)."""

    step: StepRequest
    tensors: int = Field(ge=0, le=2)


class StepBundle(WireModel):
    """Steps of several sessions of one client in one `rpc_bundle` message: each session's step as on its own stream,
    computed together (the sessions were opened on the client's `rpc_inference` streams to this peer). A bundle never
    opens, closes or prompts a session. Tensors: each step's, in order."""

    version: int = PROTOCOL_VERSION
    bundle: int = Field(ge=0)  # the client's number for this message; replies name it
    steps: list[BundledStep] = Field(min_length=1, max_length=MAX_STEPS_PER_BUNDLE)


class BundledReply(WireModel):
    """The reply to step `item` of a bundle, and how many of the message's tensors are its own."""

    item: int = Field(ge=0, lt=MAX_STEPS_PER_BUNDLE)
    reply: "BlocksReply"
    tensors: int = Field(ge=0, le=1)


class BundleReply(WireModel):
    """Replies to some of a bundle's steps (those done together), in one `rpc_bundle` message; tensors: each reply's,
    in order. `error`: the whole message was refused (`bundle` is None when it could not be read)."""

    version: int = PROTOCOL_VERSION
    bundle: int | None = None
    replies: list[BundledReply] = Field(default_factory=list, max_length=MAX_STEPS_PER_BUNDLE)
    error: "ErrorInfo | None" = None


class ErrorInfo(WireModel):
    kind: Literal[
        "bad_request", "bad_span", "too_long", "unknown_session", "bad_position", "busy", "internal", "no_training",
        "push_timeout",  # a pushed step's input did not arrive in time (the client sends it itself instead)
    ]
    message: str


class BlocksReply(WireModel):
    """The reply to any request that runs blocks (a `StepRequest` or a `SpanRequest`): hidden states, or an error."""

    version: int = PROTOCOL_VERSION
    error: ErrorInfo | None = None
    length: int = 0  # tokens the session holds after this step
    receipt: str = Field(default="", max_length=8192)  # base64 of the peer's signed reputation Receipt, or ""
    input_digest: str = Field(default="", max_length=64)  # of a pushed step: `tensor_digest` of the input it used


BundledReply.model_rebuild()
BundleReply.model_rebuild()


class TrainRequest(WireModel):
    """A training call on blocks [start, end) (the first message of `rpc_train`; later messages carry only
    tensor parts). Tensors, in order: hidden states (batch, tokens, hidden); for "backward" the gradient of the
    blocks' output (the same shape); the 0/1 attention mask (batch, tokens) if `mask`; deep prompts
    (end - start, prompt_length, hidden) if `prompts`. The reply: the blocks' output ("forward"), or the
    gradient of the hidden states and, if `prompts`, of the prompts ("backward")."""

    version: int = PROTOCOL_VERSION
    kind: Literal["forward", "backward"]
    request_id: str = Field(min_length=1, max_length=128)  # names the work in the receipt
    start: int
    end: int
    tensors: int = Field(ge=1, le=4)  # how many tensors the request carries (in parts)
    mask: bool = False
    prompts: bool = False
    keep: bool = False  # "forward": keep its autograd graph a while, for a backward that names it
    forward_id: str = Field(default="", max_length=128)  # "backward": the kept forward to use (else recomputed)


class TrainReply(WireModel):
    """The first message of a reply to a `TrainRequest` (or an error); `tensors` tensors follow in parts."""

    version: int = PROTOCOL_VERSION
    error: ErrorInfo | None = None
    tensors: int = 0
    receipt: str = Field(default="", max_length=8192)


# dtypes numpy holds as they are: their uncompressed wire form is the raw bytes (bfloat16 is not among them)
_NUMPY_DTYPES = frozenset({torch.float32, torch.float16, torch.float64, torch.int64, torch.int32})
_NUMPY_DTYPE_NAMES = frozenset(str(dtype).removeprefix("torch.") for dtype in _NUMPY_DTYPES)


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 hex over dtype, shape and raw bytes, so equal digests mean bit-identical tensors."""
    h = hashlib.sha256()
    h.update(str(t.dtype).encode())
    h.update(repr(tuple(t.shape)).encode())
    if t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES and t.is_contiguous():
        h.update((t.detach() if t.requires_grad else t).numpy())  # the same bytes, with fewer torch calls
        return h.hexdigest()
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


def inputs_digest(hidden: torch.Tensor, prompts: torch.Tensor | None = None) -> str:
    """What a receipt's input digest commits to: the hidden states, and the deep prompts when the request carried
    some (sha256 hex over both digests, so a peer cannot later claim other prompts)."""
    if prompts is None:
        return tensor_digest(hidden)
    return hashlib.sha256(f"{tensor_digest(hidden)}+prompts:{tensor_digest(prompts)}".encode()).hexdigest()


def pack(message: WireModel) -> bytes:
    return msgpack.packb(message.model_dump(mode="json"), use_bin_type=True)


def unpack(data: bytes, model: type[WireModel]) -> WireModel:
    try:
        fields = load_msgpack(data, MAX_METADATA_BYTES, "metadata")
    except ValueError as e:
        raise ProtocolError(str(e)) from None
    if not isinstance(fields, dict):
        raise ProtocolError("metadata is not a map")
    try:
        return model.model_validate(fields)
    except ValidationError as e:
        raise ProtocolError(f"invalid {model.__name__}: {first_error(e)}") from None


def serialize_tensor(t: torch.Tensor) -> runtime_pb2.Tensor:
    """hivemind's uncompressed message of `t`. A CPU tensor of a numpy dtype is written directly (the message
    `serialize_torch_tensor` makes, without its compression lookup: a third of its time for a decode step's
    tensors); any other goes through hivemind."""
    if t.device.type != "cpu" or t.requires_grad or t.dtype not in _NUMPY_DTYPES:
        return serialize_torch_tensor(t)
    return runtime_pb2.Tensor(compression=runtime_pb2.CompressionType.NONE, buffer=t.numpy().tobytes(),
                              size=t.shape, dtype=str(t.dtype).removeprefix("torch."), requires_grad=False)


def serialize_tensors(*tensors: torch.Tensor) -> list[runtime_pb2.Tensor]:
    return [serialize_tensor(t) for t in tensors]


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of the floating-point `t` is finite (numpy checks a CPU tensor of its dtypes: for a
    decode step's tensors, a fifth of torch's per-call cost)."""
    if t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES:
        return bool(np.isfinite(t.detach().numpy()).all())
    return bool(torch.isfinite(t).all())


def deserialize_tensor(p: runtime_pb2.Tensor) -> torch.Tensor:
    """The tensor of a hivemind message; an uncompressed one of a numpy dtype is read directly (what
    `deserialize_torch_tensor` gives, through fewer calls), any other through hivemind."""
    if p.compression != runtime_pb2.CompressionType.NONE or p.dtype not in _NUMPY_DTYPE_NAMES:
        return deserialize_torch_tensor(p)
    array = np.frombuffer(bytearray(p.buffer), dtype=p.dtype)  # a writable copy, as hivemind's
    return torch.from_numpy(array).reshape(tuple(p.size)).requires_grad_(p.requires_grad)


def deserialize_tensors(protos) -> list[torch.Tensor]:
    try:
        return [deserialize_tensor(p) for p in protos]
    except Exception as e:  # corrupt buffers surface as numpy/torch errors of many kinds
        raise ProtocolError(f"a tensor cannot be decoded: {type(e).__name__}: {e}") from None


def make_request(uid: str, message: WireModel, *tensors: torch.Tensor) -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(uid=uid, metadata=pack(message), tensors=serialize_tensors(*tensors))


def make_reply(message: BlocksReply, *tensors: torch.Tensor) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(metadata=pack(message), tensors=serialize_tensors(*tensors))


def error_reply(kind: str, message: str) -> runtime_pb2.ExpertResponse:
    return make_reply(BlocksReply(error=ErrorInfo(kind=kind, message=message)))


def handle_name(service: str, namespace: str | None, method_name: str) -> str:
    """A fixed RPC handler name, "efedllm.<service>.<method>" (hivemind would name it after the subclass), so that
    stubs built from a service's base class reach the handlers of any subclass."""
    name = f"efedllm.{service}.{method_name}"
    return name if namespace is None else f"{namespace}::{name}"
