"""The hivemind implementation of `swarm.transport.Transport`: the peer RPCs over a P2P instance.

Every reply is decoded and checked inside the same `try` as the call, so an undecodable, mis-shaped or
non-finite answer becomes a `BadReplyError` blaming its sender, and a dead peer a `PeerUnreachableError`.
A peer that cannot be dialled is reached through one of the relays it announced (`swarm.relays`); the relay passes
messages on unchanged, so replies are checked (and blamed) the same way.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Awaitable, Callable, Sequence, TypeVar

import torch
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2

from swarm import protocol
from swarm.bundles import MAX_BUNDLED_TOKENS, BundleUnavailable, StepBundler
from swarm.errors import BadReplyError, PeerUnreachableError, ProtocolError, RemoteError
from swarm.parts import PartsReader, to_messages
from swarm.protocol import PeerInfo, SpanRequest, BlocksReply, StepRequest, TrainReply, TrainRequest
from swarm.relays import RelayService, relay_stub
from swarm.streams import open_reply_stream
from swarm.transport import Reply, TrainResult, check_output

T = TypeVar("T")


class BlockService(ServicerBase):
    """The RPC signatures the peer implements (peers.handler.BlockHandler); used here to build stubs.

    The peer's handler subclasses it; handler names are fixed here (hivemind would name them after
    the subclass) so that stubs built from this class reach them.
    """

    @classmethod
    def _get_handle_name(cls, namespace: str | None, method_name: str) -> str:
        return protocol.handle_name("BlockService", namespace, method_name)

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        raise NotImplementedError

    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        raise NotImplementedError

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        raise NotImplementedError
        yield  # pragma: no cover  (makes this an async generator, as the annotation says)

    async def rpc_train(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        raise NotImplementedError
        yield  # pragma: no cover

    async def rpc_bundle(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        raise NotImplementedError
        yield  # pragma: no cover

    async def rpc_push(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        raise NotImplementedError
        yield  # pragma: no cover


def _stub(p2p: P2P, peer_id: PeerID):
    return BlockService.get_stub(p2p, peer_id)


def read_reply(peer_id: PeerID, reply: runtime_pb2.ExpertResponse, expected_shape: torch.Size) -> Reply:
    """A checked `Reply`; `RemoteError` for the peer's own error, `BadReplyError` for anything invalid."""
    try:
        meta = protocol.unpack(reply.metadata, BlocksReply)
    except ProtocolError as e:
        raise BadReplyError(str(peer_id), str(e)) from None
    return check_reply(peer_id, meta, reply.tensors, expected_shape)


def check_reply(peer_id: PeerID, meta: BlocksReply, protos: Sequence[runtime_pb2.Tensor], expected_shape: torch.Size
                ) -> Reply:
    """`read_reply` of a reply already unpacked (`meta`) with its tensors."""
    if meta.error is not None:
        raise RemoteError(str(peer_id), meta.error.kind, meta.error.message)
    try:
        tensors = protocol.deserialize_tensors(protos)
    except ProtocolError as e:
        raise BadReplyError(str(peer_id), str(e)) from None
    return Reply(check_output(peer_id, tensors, expected_shape), meta.receipt, meta.length, meta.input_digest)


def _extra_tensors(prompts: torch.Tensor | None, mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The tensors after the hidden states, in the protocol's order: deep prompts, then the attention mask."""
    return (*(() if prompts is None else (prompts,)), *(() if mask is None else (mask,)))


def _through(relay: PeerID | None) -> str:
    return "" if relay is None else f" through relay {relay}"


async def call_info(p2p: P2P, peer_id: PeerID, timeout: float = 5.0, relay: PeerID | None = None) -> tuple[PeerInfo, float]:
    """The peer's info and the round-trip time in seconds (through `relay`, if given: `swarm.relays`)."""
    began = time.perf_counter()
    try:
        if relay is None:
            reply = await _stub(p2p, peer_id).rpc_info(runtime_pb2.ExpertUID(uid=""), timeout=timeout)
        else:
            reply = await relay_stub(p2p, relay).rpc_relay_info(runtime_pb2.ExpertUID(uid=str(peer_id)), timeout=timeout)
    except asyncio.TimeoutError:
        raise PeerUnreachableError(str(peer_id), f"peer {peer_id} did not answer within {timeout:.0f} s{_through(relay)}") from None
    except Exception as e:  # p2pd reports unreachable peers with several error types
        raise PeerUnreachableError(str(peer_id), f"peer {peer_id} is unreachable{_through(relay)}: {e}") from None
    rtt = time.perf_counter() - began
    try:
        return protocol.unpack(reply.serialized_info, PeerInfo), rtt
    except ProtocolError as e:
        raise BadReplyError(str(peer_id), str(e)) from None


async def call_forward(
    p2p: P2P, peer_id: PeerID, start: int, end: int, hidden: torch.Tensor, timeout: float = 60.0,
    mask: torch.Tensor | None = None, relay: PeerID | None = None, prompts: torch.Tensor | None = None,
) -> Reply:
    """Hidden states through the peer's blocks [start, end), with the peer's signed receipt; `mask` (batch,
    tokens) of 0/1 travels beside them when some row is padded, and deep prompts when given. `relay`: the peer's
    relay to go through."""
    extra = _extra_tensors(prompts, mask)
    meta = SpanRequest(start=start, end=end, prompts=prompts is not None)
    try:
        if relay is None:
            request = protocol.make_request("", meta, hidden, *extra)
            reply = await _stub(p2p, peer_id).rpc_forward(request, timeout=timeout)
        else:
            request = protocol.make_request(str(peer_id), meta, hidden, *extra)
            reply = await relay_stub(p2p, relay).rpc_relay_forward(request, timeout=timeout)
    except asyncio.TimeoutError:
        raise PeerUnreachableError(str(peer_id), f"peer {peer_id} did not answer within {timeout:.0f} s{_through(relay)}") from None
    except Exception as e:  # p2pd reports unreachable peers with several error types
        raise PeerUnreachableError(str(peer_id), f"peer {peer_id} is unreachable{_through(relay)}: {e}") from None
    return read_reply(peer_id, reply, hidden.shape)


async def call_train(p2p: P2P, peer_id: PeerID, meta: TrainRequest, tensors: Sequence[torch.Tensor],
                     expected_shapes: Sequence[torch.Size], timeout: float = 60.0) -> TrainResult:
    """One training pass on the peer (`rpc_train`): `tensors` go in parts, and the reply's tensors, checked
    against `expected_shapes` (finite, floating point), come back the same way."""
    messages = to_messages(tensors)

    async def requests() -> AsyncIterator[runtime_pb2.ExpertRequest]:
        yield runtime_pb2.ExpertRequest(metadata=protocol.pack(meta), tensors=messages[0])
        for parts in messages[1:]:
            yield runtime_pb2.ExpertRequest(tensors=parts)

    async def call() -> tuple[TrainReply, list[runtime_pb2.Tensor]]:
        replies = await _stub(p2p, peer_id).rpc_train(requests())
        try:
            first = await anext(replies)
            try:
                reply = protocol.unpack(first.metadata, TrainReply)
            except ProtocolError as e:
                raise BadReplyError(str(peer_id), str(e)) from None
            if reply.error is not None:
                raise RemoteError(str(peer_id), reply.error.kind, reply.error.message)
            if reply.tensors != len(expected_shapes):
                raise BadReplyError(str(peer_id), f"expected {len(expected_shapes)} tensors, got {reply.tensors}")
            reader = PartsReader(reply.tensors, max_bytes=sum(8 * s.numel() for s in expected_shapes) + (1 << 20))
            reader.feed(first.tensors)
            while not reader.done:
                message = await anext(replies, None)
                if message is None:
                    break
                reader.feed(message.tensors)
            return reply, reader.tensors()
        except ProtocolError as e:
            raise BadReplyError(str(peer_id), str(e)) from None
        finally:
            await replies.aclose()

    try:
        reply, outputs = await asyncio.wait_for(call(), timeout)
    except (BadReplyError, RemoteError):
        raise
    except asyncio.TimeoutError:
        raise PeerUnreachableError(str(peer_id), f"peer {peer_id} did not answer within {timeout:.0f} s") from None
    except Exception as e:  # p2pd reports unreachable peers with several error types
        raise PeerUnreachableError(str(peer_id), f"peer {peer_id} is unreachable: {e}") from None
    for output, shape in zip(outputs, expected_shapes):
        check_output(peer_id, [output], shape)
    return TrainResult(outputs, reply.receipt)


class InferenceStream:
    """One open `rpc_inference` stream to a peer (directly, or through `relay`): send a step, await its checked
    reply, in order. `on_relay_failure(relay)` hears of a stream through a relay that could not open or broke.
    With a `bundler`, steps after the first may go in bundles with other sessions' steps to the same peer."""

    def __init__(self, p2p: P2P, peer_id: PeerID, relay: PeerID | None = None,
                 on_relay_failure: Callable[[PeerID], None] = lambda relay: None, bundler: StepBundler | None = None):
        self.peer_id = peer_id
        self.relay = relay
        self.bundler = bundler
        self._p2p = p2p
        self._on_relay_failure = on_relay_failure
        self._uid = "" if relay is None else str(peer_id)  # a relay reads the target from each request's uid
        self._outbox: asyncio.Queue[runtime_pb2.ExpertRequest | None] = asyncio.Queue()
        self._replies: AsyncIterator[runtime_pb2.ExpertResponse] | None = None

    async def _requests(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        while True:
            request = await self._outbox.get()
            if request is None:
                return
            yield request

    async def open(self) -> None:
        try:
            if self.relay is None:
                self._replies = await open_reply_stream(self._p2p, self.peer_id, BlockService, "rpc_inference",
                                                        self._requests())
            else:
                self._replies = await open_reply_stream(self._p2p, self.relay, RelayService, "rpc_relay_inference",
                                                        self._requests())
        except Exception as e:  # p2pd reports unreachable peers with several error types
            self._relay_failed()
            raise PeerUnreachableError(
                str(self.peer_id), f"cannot open a stream to peer {self.peer_id}{_through(self.relay)}: {e}") from None

    def _relay_failed(self) -> None:
        if self.relay is not None:
            self._on_relay_failure(self.relay)

    async def send(self, meta: StepRequest, *tensors: torch.Tensor, timeout: float | None = None) -> runtime_pb2.ExpertResponse:
        """One raw request and its raw reply (for closing messages and tests of malformed input)."""
        if self._replies is None:
            await self.open()
        self._outbox.put_nowait(protocol.make_request(self._uid, meta, *tensors))
        via = _through(self.relay)
        try:
            return await asyncio.wait_for(anext(self._replies), timeout=timeout)
        except StopAsyncIteration:
            self._relay_failed()
            raise PeerUnreachableError(str(self.peer_id), f"peer {self.peer_id} closed the stream{via}") from None
        except asyncio.TimeoutError:
            self._relay_failed()
            raise PeerUnreachableError(str(self.peer_id), f"peer {self.peer_id} did not answer within {timeout:.0f} s{via}") from None
        except Exception as e:  # the stream broke: the peer (or its relay) died, or the connection dropped
            self._relay_failed()
            raise PeerUnreachableError(str(self.peer_id), f"lost the stream to peer {self.peer_id}{via}: {e}") from None

    async def step(self, meta: StepRequest, hidden: torch.Tensor, mask: torch.Tensor | None = None,
                   timeout: float | None = None, prompts: torch.Tensor | None = None) -> Reply:
        if meta.prompts != (prompts is not None):
            raise ValueError("a step's deep prompts go with meta.prompts set, and only then")
        return await self._step(meta, (hidden, *_extra_tensors(prompts, mask)), hidden.shape, timeout)

    async def step_pushed(self, meta: StepRequest, shape: torch.Size, mask: torch.Tensor | None = None,
                          timeout: float | None = None) -> Reply:
        return await self._step(meta, () if mask is None else (mask,), shape, timeout)

    async def _step(self, meta: StepRequest, tensors: tuple[torch.Tensor, ...], shape: torch.Size,
                    timeout: float | None) -> Reply:
        if (self.bundler is not None and self._replies is not None and not meta.close and not meta.prompts
                and shape[0] * shape[1] <= MAX_BUNDLED_TOKENS and self.bundler.worth_it(self)):
            try:
                reply, protos = await self.bundler.step(self, meta, protocol.serialize_tensors(*tensors), timeout)
                return check_reply(self.peer_id, reply, protos, shape)
            except BundleUnavailable:
                pass  # this peer takes no bundles: the session's own stream carries the step
        return read_reply(self.peer_id, await self.send(meta, *tensors, timeout=timeout), shape)

    async def close(self) -> None:
        if self.bundler is not None:
            self.bundler.forget(self)
        self._outbox.put_nowait(None)
        if self._replies is not None:
            await self._replies.aclose()
            self._replies = None


RELAY_DOWN_SECONDS = 15.0  # a relay that failed to reach a peer is tried last for that peer for this long

RelaysOf = Callable[[PeerID], Sequence[PeerID]]  # the relays a peer announced (empty: dial it directly)


class HivemindTransport:
    """`swarm.transport.Transport` over a hivemind P2P instance.

    A peer that announced relays (`relays_of`) is reached through them, in the order announced; a relay that
    failed goes to the back of that peer's queue for a while, so a retry takes another.
    """

    def __init__(self, p2p: P2P, relays_of: RelaysOf = lambda peer_id: (), bundle_steps: bool = True):
        self.p2p = p2p
        self.relays_of = relays_of
        self.bundle_steps = bundle_steps  # concurrent sessions' steps to a peer go in one message (`swarm.bundles`)
        self._bundlers: dict[PeerID, StepBundler] = {}
        self._failed: dict[tuple[PeerID, PeerID], float] = {}  # (peer, relay) -> time.monotonic() of the failure

    @property
    def peer_id(self) -> PeerID:
        return self.p2p.peer_id

    @property
    def bundled_steps(self) -> int:
        """Steps this client sent in bundles of several sessions' steps (`swarm.bundles`)."""
        return sum(bundler.bundled_steps for bundler in self._bundlers.values())

    def relays(self, peer_id: PeerID) -> list[PeerID]:
        """The relays to try for `peer_id`, in order: those that did not fail lately first."""
        now = time.monotonic()
        relays = list(self.relays_of(peer_id))
        return sorted(relays, key=lambda r: now - self._failed.get((peer_id, r), -1e9) < RELAY_DOWN_SECONDS)

    def relay_failed(self, peer_id: PeerID, relay: PeerID) -> None:
        self._failed[(peer_id, relay)] = time.monotonic()

    async def _through_relays(self, peer_id: PeerID, call: Callable[[PeerID | None], Awaitable[T]]) -> T:
        relays = self.relays(peer_id)
        if not relays:
            return await call(None)
        failure: PeerUnreachableError | None = None
        for relay in relays:
            try:
                return await call(relay)
            except PeerUnreachableError as e:  # this relay could not reach it: the next one may
                self.relay_failed(peer_id, relay)
                failure = e
        raise PeerUnreachableError(str(peer_id), f"peer {peer_id} is unreachable through each of its relays ({failure})")

    async def info(self, peer_id: PeerID, timeout: float = 5.0) -> tuple[PeerInfo, float]:
        return await self._through_relays(peer_id, lambda relay: call_info(self.p2p, peer_id, timeout, relay))

    async def forward(self, peer_id: PeerID, start: int, end: int, hidden: torch.Tensor, timeout: float = 60.0,
                      *, mask: torch.Tensor | None = None, prompts: torch.Tensor | None = None) -> Reply:
        return await self._through_relays(
            peer_id, lambda relay: call_forward(self.p2p, peer_id, start, end, hidden, timeout, mask, relay, prompts))

    async def train(self, peer_id: PeerID, meta: TrainRequest, tensors: Sequence[torch.Tensor],
                    expected_shapes: Sequence[torch.Size], timeout: float = 60.0) -> TrainResult:
        if self.relays(peer_id):
            raise PeerUnreachableError(str(peer_id), f"peer {peer_id} is reached through relays, which do not carry "
                                                     f"training passes yet")
        return await call_train(self.p2p, peer_id, meta, tensors, expected_shapes, timeout)

    def open_stream(self, peer_id: PeerID) -> InferenceStream:
        relays = self.relays(peer_id)
        if not relays:
            bundler = None
            if self.bundle_steps:
                bundler = self._bundlers.get(peer_id)
                if bundler is None:
                    bundler = self._bundlers[peer_id] = StepBundler(self.p2p, peer_id, BlockService)
            return InferenceStream(self.p2p, peer_id, bundler=bundler)
        return InferenceStream(self.p2p, peer_id, relays[0], lambda relay: self.relay_failed(peer_id, relay))
