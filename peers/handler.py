"""The peer's RPC servicer: info/ping, stateless forward, streaming inference with a KV cache, and training
passes (`peers.training`).

Every request is validated before it touches a session, so a malformed one is answered with a typed
error (`swarm.protocol.ErrorInfo`) and changes nothing; the stream and the peer's other clients go on.
Torch work runs on one worker thread so the event loop keeps answering pings meanwhile; sessions' steps reach it
through a scheduler (`peers.batching`) that batches decode steps of different sessions and chunks long prefills.
A step of a push chain (`peers.push`) takes its input from the previous hop's push and pushes its output on.
A step (or forward) may carry a client's deep prompts for its blocks (`swarm.protocol.StepRequest`): they are added
at each block's input to the positions below their length, and the receipt commits to them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Callable, Coroutine, Protocol, Sequence

import torch
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2

from peers.batching import StepJob, StepScheduler, chunk_input
from peers.memory import release_free_memory
from peers.push import PushInbox, PushLinks, PushTimeout
from peers.receipts import ReceiptSigner
from swarm import protocol
from swarm.blocks import BlockSpan, SpanCache, SpanInput
from peers.training import (MAX_PROMPT_LENGTH, ForwardGraphs, TooManyTokens, read_train_tensors, request_byte_limit,
                            train_step)
from swarm.parts import PartsReader, to_messages
from swarm.protocol import (BlocksReply, BundledReply, BundleReply, PeerInfo, ProtocolError, PushBatch, PushRequest,
                            SpanRequest, StepBundle, StepRequest, TrainReply, TrainRequest, tensor_digest)
from swarm.remote import BlockService

if TYPE_CHECKING:
    from peers.reputation_service import PeerReputation

logger = logging.getLogger(__name__)


MAX_DRAINED_MESSAGES = 1024  # messages of a refused training request read (and dropped) before the refusal


class RequestRejected(Exception):
    """A request the peer refuses; becomes an error reply of this kind."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class HandlerConfig:
    dht_prefix: str  # which model this peer serves (model name @ weights digest)
    dtype: torch.dtype  # compute dtype of the blocks
    device: torch.device
    hidden_size: int
    max_length: int  # longest session accepted, in tokens
    max_batch: int = 64  # most sequences in one request
    max_tokens_per_request: int = 8192  # batch x new tokens in one request
    max_sessions: int = 64  # open sessions across all clients
    session_idle_timeout: float = 600.0  # seconds without a step before a session's cache is freed
    max_train_tokens: int = 8192  # largest training request, batch x tokens (0: training off)
    batch_sessions: bool = True  # decode steps of sessions that wait together run as one batched forward
    prefill_chunk_tokens: int = 512  # a longer prefill runs in chunks of this many batch x tokens
    push_timeout: float = 5.0  # seconds a pushed step waits for its input from the previous hop (`peers.push`)
    inline_step_seconds: float = 0.05  # a lone session's decode steps this short run on the event loop (0: never)
    batch_wait_fraction: float = 0.25  # a decode step waits this share of the last decode run for others' steps


@dataclass
class Session:
    """One client's inference session on this peer: its KV cache and padding mask."""

    session_id: str
    start: int
    end: int
    max_length: int
    cache: SpanCache
    batch: int | None = None
    padding: torch.Tensor | None = None  # (batch, length) 0/1, only when some row is padded
    last_used: float = field(default_factory=time.monotonic)
    steps: int = 0  # steps served so far
    stepping: bool = False  # a step of it is being computed (a client's bundle may not start another meanwhile)
    work: int = 0  # batch x tokens computed so far (receipts carry it, cumulative)

    @property
    def length(self) -> int:
        return self.cache.length

    @property
    def reserved_tokens(self) -> int:
        """KV-cache room this session may grow into: batch x max_length tokens."""
        return (self.batch or 1) * self.max_length


@dataclass
class PeerStats:
    tokens_served: int = 0  # batch x tokens computed, over all requests
    pushed_steps: int = 0  # steps whose input came by push from the previous hop
    bundled_steps: int = 0  # steps that came in a client's bundle of several sessions' steps


class PushSender(Protocol):
    """Where a hop's output goes to the next hop (`peers.push.PushLinks`; tests pass an in-process one)."""

    def send(self, peer_id: PeerID, meta: PushRequest, hidden: torch.Tensor) -> None: ...


class BlockHandler(BlockService):
    """Serves a span of blocks. Subclasses may change what it serves through seven extension points:
    `prepare_span` (each span before it is served), `transform_output` (each computed output), `transform_step`
    (the same, knowing the request's attention mask and position), `transform_gradients` (a backward's
    gradients), `sign_reply` (what is sent, and its receipt), `advertised_throughput` (what the peer announces)
    and `background_work` (coroutines the peer runs while it serves)."""

    def __init__(self, span: BlockSpan, config: HandlerConfig, throughput: float, cache_tokens: int):
        self.config = config
        self.span = self.prepare_span(span)
        self.throughput = throughput  # measured block-steps per second
        self.cache_tokens = cache_tokens  # KV-cache budget in tokens (batch x max_length, summed over sessions)
        self.stats = PeerStats()
        self.draining = False  # while moving to other blocks: no new sessions
        self._live: dict[int, dict[str, Session]] = {}  # stream id -> its sessions
        self._owners: dict[int, PeerID] = {}  # stream id -> the client that opened it
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self.receipts: ReceiptSigner | None = None  # signs a receipt for every reply when set
        self.inbox = PushInbox()  # inputs pushed by other peers, until their steps take them
        self.pushes: PushSender | None = None  # set once the handler is on a P2P (`add_p2p_handlers`)
        self._signing: list[tuple[Callable[[], tuple[torch.Tensor, str]], asyncio.Future]] = []  # `_sign_together`
        self._background: set[asyncio.Task] = set()  # signing under way
        self.kept_forwards = ForwardGraphs(max_tokens=4 * max(config.max_train_tokens, 1))  # for their backward
        self.scheduler = StepScheduler(
            self._executor, self._run_steps, self._run_chunk, self._finish_step, max_rows=config.max_batch,
            prefill_chunk=config.prefill_chunk_tokens, max_steps=config.max_sessions if config.batch_sessions else 1,
            inline_seconds=config.inline_step_seconds, wait_fraction=config.batch_wait_fraction,
        )

    # Extension points: the defaults serve honestly.

    def prepare_span(self, span: BlockSpan) -> BlockSpan:
        """The span to serve, given one just loaded (at construction and on `replace_span`). Default: as is.
        Called from `__init__` before the rest of the handler's state exists: it may use `self.config` only."""
        return span

    def transform_output(self, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The output to send for the blocks' `output` on `inputs` (both on the compute device and dtype, or both
        on the CPU in the wire dtype for a training forward; called on the compute thread, before the receipt is
        signed). Default: as is."""
        return output

    def sign_reply(self, hidden: torch.Tensor, output: torch.Tensor, start: int, end: int,
                   work: tuple[str, int, int], prompts: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
        """The output to send for `output` computed from `hidden` on blocks [start, end) (both in the wire
        dtype, on the CPU; called on the compute thread), and its receipt: base64, or "" when not signing.
        `work` is (session id, step, cumulative batch x tokens); `prompts`: the deep prompts the request carried
        (the receipt commits to them). Default: the output as is, signed."""
        if self.receipts is None:
            return output, ""
        return output, self.receipts.sign(work[0], work[1], start, end, work[2], hidden, output, prompts)

    def transform_step(self, inputs: torch.Tensor, output: torch.Tensor, span_input: SpanInput) -> torch.Tensor:
        """Like `transform_output`, with the request's attention mask and start position (called in its place).
        Default: `transform_output(inputs, output)`."""
        return self.transform_output(inputs, output)

    def transform_gradients(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """The gradients to send for a backward (the input's, then the deep prompts' if any; on the CPU in the
        wire dtype, called on the compute thread before the receipt is signed). Default: as they are."""
        return grads

    def advertised_throughput(self) -> float:
        """Block-steps per second this peer announces and reports. Default: the measured throughput."""
        return self.throughput

    def background_work(
        self, p2p: P2P, reputation: PeerReputation, stop: asyncio.Event
    ) -> list[tuple[str, Coroutine]]:
        """(name, coroutine) pairs the peer runs while it serves; each must end when `stop` is set,
        and is cancelled and awaited on shutdown. Default: none."""
        return []

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def add_p2p_handlers(self, p2p: P2P, wrapper=None, *, namespace: str | None = None,
                               balanced: bool = False) -> None:
        """Register the RPCs, and push the outputs of push-chain steps through `p2p`."""
        self.pushes = PushLinks(p2p)
        await super().add_p2p_handlers(p2p, wrapper, namespace=namespace, balanced=balanced)

    async def remove_p2p_handlers(self, p2p: P2P, *, namespace: str | None = None) -> None:
        await super().remove_p2p_handlers(p2p, namespace=namespace)
        if isinstance(self.pushes, PushLinks):
            await self.pushes.close()
        self.pushes = None

    def sessions(self) -> list[Session]:
        return [session for sessions in self._live.values() for session in sessions.values()]

    def reserved_tokens(self) -> int:
        return sum(session.reserved_tokens for session in self.sessions())

    def expire_idle_sessions(self) -> int:
        """Free the caches of sessions idle longer than the timeout; their next step gets `unknown_session`."""
        deadline = time.monotonic() - self.config.session_idle_timeout
        expired = 0
        for sessions in self._live.values():
            for session_id in [sid for sid, s in sessions.items() if s.last_used < deadline]:
                del sessions[session_id]
                expired += 1
        if expired:
            release_free_memory()
            logger.info(f"Freed {expired} idle session(s)")
        return expired

    def replace_span(self, span: BlockSpan, throughput: float) -> None:
        """Serve other blocks: drop every session (their clients re-route and replay), then swap."""
        for sessions in self._live.values():
            sessions.clear()
        self.span, self.throughput = self.prepare_span(span), throughput
        release_free_memory()

    def info(self) -> PeerInfo:
        used = self.reserved_tokens()
        return PeerInfo(
            model=self.config.dht_prefix,
            start=self.span.start,
            end=self.span.end,
            dtype=str(self.config.dtype).removeprefix("torch."),
            throughput=self.advertised_throughput(),
            max_length=self.config.max_length,
            cache_tokens_left=max(self.cache_tokens - used, 0),
            sessions=len(self.sessions()),
        )

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        return runtime_pb2.ExpertInfo(serialized_info=protocol.pack(self.info()))

    async def rpc_forward(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        try:
            meta = protocol.unpack(request.metadata, SpanRequest)
            if self.draining:
                raise RequestRejected("busy", "this peer is moving to other blocks; try another peer")
            self._check_span(meta.start, meta.end)
            hidden, padding, prompts = self._read_tensors(request.tensors, None, meta.end - meta.start if meta.prompts else 0)
            span_input = SpanInput(attention_mask=padding, start_position=0)
            tokens = hidden.shape[0] * hidden.shape[1]
            output, receipt = await self._compute(hidden, span_input, meta.start, meta.end, ("forward", 0, tokens),
                                                  prompts)
            self.stats.tokens_served += tokens
            return protocol.make_reply(BlocksReply(length=hidden.shape[1], receipt=receipt), output)
        except ProtocolError as e:
            return protocol.error_reply("bad_request", str(e))
        except RequestRejected as e:
            return protocol.error_reply(e.kind, str(e))
        except Exception as e:  # loop boundary: one bad request must not take the peer down
            logger.warning(f"forward from {context.remote_id} failed", exc_info=True)
            return protocol.error_reply("internal", f"{type(e).__name__}: {e}")

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        stream_id = id(requests)
        sessions = self._live.setdefault(stream_id, {})
        self._owners[stream_id] = context.remote_id
        try:
            async for request in requests:
                yield await self._step(request, sessions, context)
        finally:
            # The stream is the session's lifetime: closing or losing it frees every cache it opened.
            del self._live[stream_id], self._owners[stream_id]
            for session_id in sessions:
                self.scheduler.forget(session_id)
            if sessions:
                sessions.clear()
                release_free_memory()
                logger.debug(f"Freed the sessions of {context.remote_id}")

    async def rpc_bundle(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Steps of several of the caller's sessions per message (`swarm.protocol.StepBundle`). The steps of every
        message run concurrently, so the scheduler batches them; their replies go back as they finish, those that
        finish together in one `BundleReply`. The sessions live on the caller's `rpc_inference` streams."""
        replies: asyncio.Queue[runtime_pb2.ExpertResponse | None] = asyncio.Queue()
        running: set[asyncio.Task] = set()

        async def read() -> None:
            try:
                async for request in requests:
                    task = asyncio.create_task(self._serve_bundle(request, context, replies.put_nowait))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.wait(list(running))
            except Exception:  # the caller's side broke: the bundles being computed are dropped
                logger.debug(f"The bundle stream of {context.remote_id} broke", exc_info=True)
            finally:
                replies.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    async def _serve_bundle(self, request: runtime_pb2.ExpertRequest, context: P2PContext,
                            send: Callable[[runtime_pb2.ExpertResponse], None]) -> None:
        """Serve one `StepBundle`: send a `BundleReply` each time some of its steps are done."""
        bundle: StepBundle | None = None
        try:
            bundle = protocol.unpack(request.metadata, StepBundle)
            if sum(item.tensors for item in bundle.steps) != len(request.tensors):
                raise ProtocolError(f"the bundle's steps name {sum(item.tensors for item in bundle.steps)} tensors, "
                                    f"the message holds {len(request.tensors)}")
            tokens = bundle_tokens(bundle, request.tensors)
            if tokens > self.config.max_tokens_per_request:
                raise ProtocolError(f"{tokens} tokens in one bundle exceed {self.config.max_tokens_per_request}")
        except ProtocolError as e:
            error = protocol.ErrorInfo(kind="bad_request", message=str(e))
            send(runtime_pb2.ExpertResponse(metadata=protocol.pack(
                BundleReply(bundle=None if bundle is None else bundle.bundle, error=error))))
            return
        items: dict[asyncio.Future, int] = {}
        offset = 0
        for index, item in enumerate(bundle.steps):
            protos = request.tensors[offset : offset + item.tensors]
            offset += item.tensors
            items[asyncio.ensure_future(self._bundled_step(item.step, protos, context))] = index
        pending = set(items)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                replies, outputs = [], []
                for task in sorted(done, key=items.__getitem__):
                    try:
                        reply, tensors = task.result()
                    except Exception as e:  # loop boundary: one step's failure is its own reply
                        logger.warning(f"bundled step from {context.remote_id} failed", exc_info=True)
                        reply, tensors = _error("internal", f"{type(e).__name__}: {e}"), ()
                    replies.append(BundledReply(item=items[task], reply=reply, tensors=len(tensors)))
                    outputs.extend(tensors)
                send(runtime_pb2.ExpertResponse(
                    metadata=protocol.pack(BundleReply(bundle=bundle.bundle, replies=replies)),
                    tensors=protocol.serialize_tensors(*outputs)))
        finally:
            for task in pending:
                task.cancel()

    async def _bundled_step(self, meta: StepRequest, tensors: Sequence[runtime_pb2.Tensor], context: P2PContext
                            ) -> tuple[BlocksReply, tuple[torch.Tensor, ...]]:
        """A bundle's step of a session the caller opened on one of its `rpc_inference` streams."""
        if meta.close or meta.prompts:
            return _error("bad_request", "a bundled step cannot close a session or carry deep prompts"), ()
        sessions = next((sessions for stream_id, sessions in self._live.items()
                         if meta.session_id in sessions and self._owners.get(stream_id) == context.remote_id), None)
        if sessions is None:
            return _error("unknown_session", f"no session {meta.session_id!r} of yours here: open it with a step at "
                                             f"position 0 on an inference stream"), ()
        self.stats.bundled_steps += 1
        return await self._serve_step(meta, tensors, sessions, context)

    async def rpc_train(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """One stateless training pass (`swarm.protocol.TrainRequest`): the request's tensors arrive in parts,
        and the reply's go back the same way. A refused request is read to its end first (so the client reads
        the refusal rather than a reset stream), up to `MAX_DRAINED_MESSAGES`."""
        error: runtime_pb2.ExpertResponse | None = None
        try:
            meta, tensors = await self._read_train_request(requests)
            hidden, grad, mask, prompts = read_train_tensors(meta, tensors, self.config.hidden_size,
                                                             self.config.max_train_tokens)
            tokens = hidden.shape[0] * hidden.shape[1]

            def run() -> tuple[list[torch.Tensor], str]:
                outputs = train_step(self.span, meta, hidden, grad, mask, prompts, self.config.device,
                                     self.config.dtype, self.kept_forwards, str(context.remote_id))
                if meta.kind == "backward":
                    outputs = self.transform_gradients(outputs)
                else:
                    outputs = [self.transform_output(hidden, outputs[0])]
                if self.receipts is None:
                    return outputs, ""
                received = hidden if grad is None else torch.cat([hidden, grad.to(hidden.dtype)], dim=-1)
                step = 0 if meta.kind == "forward" else 1
                receipt = self.receipts.sign(f"train:{meta.request_id}", step, meta.start, meta.end, tokens,
                                             received, outputs[0])
                return outputs, receipt

            outputs, receipt = await self.scheduler.call(run)
            self.stats.tokens_served += tokens
            messages = to_messages(outputs)
            yield runtime_pb2.ExpertResponse(metadata=protocol.pack(TrainReply(tensors=len(outputs), receipt=receipt)),
                                             tensors=messages[0])
            for parts in messages[1:]:
                yield runtime_pb2.ExpertResponse(tensors=parts)
        except ProtocolError as e:
            error = protocol.error_reply("bad_request", str(e))
        except TooManyTokens as e:
            error = protocol.error_reply("too_long", str(e))
        except RequestRejected as e:
            error = protocol.error_reply(e.kind, str(e))
        except Exception as e:  # loop boundary: one bad request must not take the peer down
            logger.warning(f"training pass from {context.remote_id} failed", exc_info=True)
            error = protocol.error_reply("internal", f"{type(e).__name__}: {e}")
        if error is not None:
            try:
                for _ in range(MAX_DRAINED_MESSAGES):
                    if await anext(requests, None) is None:
                        break
            except Exception:  # the client went away or sent junk: the refusal goes out all the same
                pass
            yield error

    async def rpc_push(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Inputs pushed by the previous hop of some client's route (`peers.push`), one ack per message."""
        try:
            async for reply in self._pushes(requests, context):
                yield reply
        finally:  # the pusher's link closed: steps still waiting for its pushes fail now, not after push_timeout
            self.inbox.abandon(str(context.remote_id))

    async def _pushes(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for request in requests:
            try:
                pushes = read_pushes(request)
                if len(request.tensors) != len(pushes):
                    raise ProtocolError(f"{len(pushes)} pushes need one tensor each, got {len(request.tensors)}")
                # every push is checked before any is delivered: a bad one refuses the whole message
                checked = [(meta, self._read_tensors([tensor], None)[0])
                           for meta, tensor in zip(pushes, request.tensors)]
                for meta, hidden in checked:
                    self.inbox.deliver((meta.session_id, meta.start, meta.position), str(context.remote_id), hidden)
                reply = protocol.make_reply(BlocksReply())
            except ProtocolError as e:
                reply = protocol.error_reply("bad_request", str(e))
            except RequestRejected as e:
                reply = protocol.error_reply(e.kind, str(e))
            except Exception as e:  # loop boundary: one bad push must not end the pusher's stream
                logger.warning(f"push from {context.remote_id} failed", exc_info=True)
                reply = protocol.error_reply("internal", f"{type(e).__name__}: {e}")
            yield reply

    async def _read_train_request(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest]
    ) -> tuple[TrainRequest, list[torch.Tensor]]:
        first = await anext(requests, None)
        if first is None:
            raise ProtocolError("an empty training request")
        meta = protocol.unpack(first.metadata, TrainRequest)
        if self.config.max_train_tokens <= 0:
            raise RequestRejected("no_training", "this peer serves inference only (--max-train-tokens 0)")
        if self.draining:
            raise RequestRejected("busy", "this peer is moving to other blocks; try another peer")
        self._check_span(meta.start, meta.end)
        reader = PartsReader(meta.tensors, request_byte_limit(self.config.max_train_tokens, self.config.hidden_size,
                                                              meta.end - meta.start))
        reader.feed(first.tensors)
        while not reader.done:
            request = await anext(requests, None)
            if request is None:
                break
            reader.feed(request.tensors)
        return meta, reader.tensors()

    async def _step(
        self, request: runtime_pb2.ExpertRequest, sessions: dict[str, Session], context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        try:
            meta = protocol.unpack(request.metadata, StepRequest)
        except ProtocolError as e:
            return protocol.error_reply("bad_request", str(e))
        if meta.close:
            sessions.pop(meta.session_id, None)
            self.scheduler.forget(meta.session_id)
            return protocol.make_reply(BlocksReply())
        reply, output = await self._serve_step(meta, request.tensors, sessions, context)
        return protocol.make_reply(reply, *output)

    async def _serve_step(
        self, meta: StepRequest, tensors: Sequence[runtime_pb2.Tensor], sessions: dict[str, Session],
        context: P2PContext,
    ) -> tuple[BlocksReply, tuple[torch.Tensor, ...]]:
        """One step of a session of `sessions` (opened by it when new); the reply and its tensors (none on error)."""
        opening: str | None = None  # the id of the session this step opens, until the step succeeds
        session: Session | None = None
        try:
            if meta.session_id not in sessions:
                opening = meta.session_id
            session = self._session_for(meta, sessions)
            if session.stepping:
                session = None  # not this step's to release
                raise RequestRejected("bad_request", f"session {meta.session_id!r} is still computing its previous step")
            session.stepping = True
            if meta.pushed and meta.prompts:
                raise ProtocolError("a pushed step cannot carry deep prompts (send the step itself)")
            if meta.pushed:
                hidden, padding = await self._pushed_input(meta, tensors)
                prompts = None
            else:
                hidden, padding, prompts = self._read_tensors(tensors, meta.position,
                                                              meta.end - meta.start if meta.prompts else 0)
            self._check_step(session, meta, hidden)
            self._reserve_cache(session, hidden.shape[0])
            session.last_used = time.monotonic()
            if meta.position < session.length:
                session.cache.crop(meta.position)  # the client rolled back
            padding = self._session_padding(session, meta.position, hidden, padding)
            span_input = SpanInput(attention_mask=padding, start_position=meta.position)
            tokens = hidden.shape[0] * hidden.shape[1]
            work = (meta.session_id, session.steps, session.work + tokens)
            future = asyncio.get_running_loop().create_future()
            job = StepJob(hidden, session.cache, span_input, session.start, session.end, work, future, prompts,
                          sign=meta.push_to is None)
            output, receipt = await self.scheduler.submit(job)
            session.batch, session.padding = hidden.shape[0], padding
            session.steps, session.work = session.steps + 1, session.work + tokens
            self.stats.tokens_served += tokens
            opening = None
            if meta.push_to is not None:  # the next hop starts while this one signs its receipt
                self._push(meta, output)
                output, receipt = await self._sign_together(
                    lambda pushed=output: self.sign_reply(hidden, pushed, session.start, session.end, work, prompts))
            digest = tensor_digest(hidden) if meta.pushed else ""
            return BlocksReply(length=session.length, receipt=receipt, input_digest=digest), (output,)
        except ProtocolError as e:
            return _error("bad_request", str(e)), ()
        except RequestRejected as e:
            return _error(e.kind, str(e)), ()
        except Exception as e:  # loop boundary: one bad step must not end the peer or the stream
            logger.warning(f"inference step from {context.remote_id} failed", exc_info=True)
            return _error("internal", f"{type(e).__name__}: {e}"), ()
        finally:
            if session is not None:
                session.stepping = False
            if opening is not None:  # a refused first step opens nothing (nor holds a slot or cache room)
                sessions.pop(opening, None)

    async def _sign_together(self, sign: Callable[[], tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, str]:
        """`sign()` on the compute thread, in one hand-off with the other signatures asked for in this turn of the
        event loop: the pushed steps of one batched run sign their receipts together, and are answered together."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._signing.append((sign, future))
        if len(self._signing) == 1:
            loop.call_soon(self._start_signing)
        return await future

    def _start_signing(self) -> None:
        task = asyncio.ensure_future(self._sign_waiting())
        self._background.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._background.discard)

    async def _sign_waiting(self) -> None:
        waiting, self._signing = self._signing, []

        def run() -> list[tuple[tuple[torch.Tensor, str] | None, Exception | None]]:
            results = []
            for sign, _ in waiting:
                try:
                    results.append((sign(), None))
                except Exception as e:  # that step's error; the others are signed
                    results.append((None, e))
            return results

        try:
            results = await self.scheduler.call(run)
        except Exception as e:  # the compute thread is gone (shutdown)
            results = [(None, e)] * len(waiting)
        for (_, future), (result, error) in zip(waiting, results):
            if future.done():  # its step was cancelled
                continue
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    async def _pushed_input(
        self, meta: StepRequest, tensors: Sequence[runtime_pb2.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A pushed step's hidden states (from `push_from`'s push) and its optional mask (from the request)."""
        if not meta.push_from:
            raise ProtocolError("a pushed step must name the peer that pushes its input (push_from)")
        if len(tensors) > 1:
            raise ProtocolError(f"a pushed step carries at most the attention mask, got {len(tensors)} tensors")
        try:
            hidden = await self.inbox.take((meta.session_id, meta.start, meta.position), meta.push_from,
                                           self.config.push_timeout)
        except PushTimeout as e:
            raise RequestRejected("push_timeout", str(e)) from None
        padding = protocol.deserialize_tensors(tensors)[0] if tensors else None
        past = meta.position
        if padding is not None and (tuple(padding.shape) != (hidden.shape[0], past + hidden.shape[1])
                                    or not ((padding == 0) | (padding == 1)).all()):
            raise ProtocolError(f"attention mask must be 0/1 of shape ({hidden.shape[0]}, {past + hidden.shape[1]}), "
                                f"got {tuple(padding.shape)}")
        self.stats.pushed_steps += 1
        return hidden, padding

    def _push(self, meta: StepRequest, output: torch.Tensor) -> None:
        """Send a step's output on to the next hop the client named (best effort: a lost push times out there)."""
        target = meta.push_to
        try:
            peer_id = PeerID.from_base58(target.peer_id)
        except Exception:  # not a peer id: the client's mistake; its next hop times out and it sends the input
            logger.debug(f"Cannot push to {target.peer_id[:64]!r}: not a peer id")
            return
        if self.pushes is None:
            logger.debug("Cannot push: this handler is not on a P2P")
            return
        push = PushRequest(session_id=meta.session_id, start=target.start, end=target.end,
                           position=meta.position)
        self.pushes.send(peer_id, push, output)

    def _session_for(self, meta: StepRequest, sessions: dict[str, Session]) -> Session:
        session = sessions.get(meta.session_id)
        if session is None:
            if meta.position != 0:
                raise RequestRejected(
                    "unknown_session",
                    f"no session {meta.session_id!r} on this stream: open it with a step at position 0 (prefill)",
                )
            self._check_span(meta.start, meta.end)
            if meta.max_length > self.config.max_length:
                raise RequestRejected(
                    "too_long", f"max_length {meta.max_length} exceeds this peer's limit of {self.config.max_length}"
                )
            if self.draining:
                raise RequestRejected("busy", "this peer is moving to other blocks; try another peer")
            if len(self.sessions()) >= self.config.max_sessions:
                raise RequestRejected("busy", f"this peer already serves its maximum of {self.config.max_sessions} sessions")
            session = Session(
                meta.session_id, meta.start, meta.end, meta.max_length, self.span.new_cache(meta.start, meta.end)
            )
            sessions[meta.session_id] = session
        elif (meta.start, meta.end) != (session.start, session.end):
            raise RequestRejected("bad_span", f"session covers blocks {session.start}:{session.end}, not {meta.start}:{meta.end}")
        return session

    def _reserve_cache(self, session: Session, batch: int) -> None:
        """Refuse a session's first step if its batch x max_length does not fit the cache budget."""
        if session.batch is not None:
            return
        others = self.reserved_tokens() - session.reserved_tokens
        if others + batch * session.max_length > self.cache_tokens:
            raise RequestRejected(
                "busy",
                f"no KV-cache room for {batch} x {session.max_length} tokens "
                f"({max(self.cache_tokens - others, 0)} of {self.cache_tokens} left)",
            )
        session.batch = batch

    def _check_span(self, start: int, end: int) -> None:
        if not self.span.start <= start < end <= self.span.end:
            raise RequestRejected(
                "bad_span", f"blocks {start}:{end} are not within this peer's {self.span.start}:{self.span.end}"
            )

    def _check_step(self, session: Session, meta: StepRequest, hidden: torch.Tensor) -> None:
        if meta.position > session.length:
            raise RequestRejected(
                "bad_position", f"step at position {meta.position} but the session holds {session.length} tokens"
            )
        if meta.position + hidden.shape[1] > session.max_length:
            raise RequestRejected(
                "too_long",
                f"{meta.position + hidden.shape[1]} tokens exceed the session's max_length {session.max_length}",
            )
        if session.batch is not None and meta.position > 0 and hidden.shape[0] != session.batch:
            raise RequestRejected("bad_request", f"batch size {hidden.shape[0]} differs from the session's {session.batch}")

    def _read_tensors(
        self, protos: Sequence[runtime_pb2.Tensor], expected_length: int | None, prompt_blocks: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Hidden states (batch, new, hidden), an optional 0/1 mask (batch, past + new) and, when `prompt_blocks`,
        the deep prompts of that many blocks (they follow the hidden states), checked."""
        least = 1 + (prompt_blocks > 0)
        if not least <= len(protos) <= least + 1:
            raise ProtocolError(f"expected {least} or {least + 1} tensors, got {len(protos)}")
        tensors = protocol.deserialize_tensors(protos)
        hidden = tensors.pop(0)
        prompts = None
        if prompt_blocks:
            prompts = check_prompts(tensors.pop(0), prompt_blocks, self.config.hidden_size, expected_length or 0)
        if hidden.ndim != 3 or hidden.shape[2] != self.config.hidden_size:
            raise ProtocolError(f"hidden states must be (batch, tokens, {self.config.hidden_size}), got {tuple(hidden.shape)}")
        if not hidden.is_floating_point():
            raise ProtocolError(f"hidden states must be floating point, got {hidden.dtype}")
        batch, new = hidden.shape[:2]
        if not (1 <= batch <= self.config.max_batch and new >= 1):
            raise ProtocolError(f"batch must be 1..{self.config.max_batch} and tokens >= 1, got {batch}x{new}")
        if batch * new > self.config.max_tokens_per_request:
            raise RequestRejected("too_long", f"{batch * new} tokens in one request exceed {self.config.max_tokens_per_request}")
        if new > self.config.max_length:
            raise RequestRejected("too_long", f"{new} tokens exceed this peer's limit of {self.config.max_length}")
        if not protocol.all_finite(hidden):
            raise ProtocolError("hidden states contain NaN or infinity")
        padding = tensors[0] if tensors else None
        if padding is not None:
            past = 0 if expected_length is None else expected_length
            if tuple(padding.shape) != (batch, past + new) or not ((padding == 0) | (padding == 1)).all():
                raise ProtocolError(f"attention mask must be 0/1 of shape ({batch}, {past + new}), got {tuple(padding.shape)}")
        return hidden, padding, prompts

    @staticmethod
    def _session_padding(
        session: Session, position: int, hidden: torch.Tensor, padding: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The session's full 0/1 mask after this step, or None while nothing is padded."""
        if padding is not None:
            return padding if (padding == 0).any() or session.padding is not None else None
        if session.padding is None or position == 0:
            return None
        ones = torch.ones(hidden.shape[0], hidden.shape[1], dtype=session.padding.dtype)
        return torch.cat([session.padding[:, :position], ones], dim=1)

    async def _compute(
        self,
        hidden: torch.Tensor,
        span_input: SpanInput,
        start: int,
        end: int,
        work: tuple[str, int, int],  # (session id, step, cumulative batch x tokens) for the receipt
        prompts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, str]:
        """A stateless run's output in the wire dtype, and the signed receipt for it ("" when not signing)."""
        wire_dtype = hidden.dtype

        def run() -> tuple[torch.Tensor, str]:
            inputs = hidden.to(self.config.device, self.config.dtype)
            output = self.span(inputs, None, span_input, start, end, self._compute_prompts(prompts))
            output = self.transform_step(inputs, output, span_input)
            return self.sign_reply(hidden, output.to("cpu", wire_dtype), start, end, work, prompts)

        return await self.scheduler.call(run)

    # The scheduler's work, on the compute thread.

    def _compute_prompts(self, prompts: torch.Tensor | None) -> torch.Tensor | None:
        return None if prompts is None else prompts.to(self.config.device, self.config.dtype)

    def _run_steps(self, jobs: list[StepJob]) -> list[torch.Tensor]:
        inputs = [job.hidden.to(self.config.device, self.config.dtype) for job in jobs]
        for job, cast in zip(jobs, inputs):
            job.inputs = cast  # `_finish_step` uses it again (on a GPU, one host-to-device copy instead of two)
        if len(jobs) == 1:
            job = jobs[0]
            return [self.span(inputs[0], job.cache, job.span_input, job.start, job.end, self._compute_prompts(job.prompts))]
        assert all(job.prompts is None for job in jobs), "steps with deep prompts run alone"
        return self.span.forward_batched(inputs, [job.cache for job in jobs], [job.span_input for job in jobs],
                                         jobs[0].start, jobs[0].end)

    def _run_chunk(self, job: StepJob, first: int, end: int) -> torch.Tensor:
        inputs = job.hidden[:, first:end].to(self.config.device, self.config.dtype)
        return self.span(inputs, job.cache, chunk_input(job.span_input, first, end), job.start, job.end,
                         self._compute_prompts(job.prompts))

    def _finish_step(self, job: StepJob, output: torch.Tensor) -> tuple[torch.Tensor, str]:
        inputs = job.inputs if job.inputs is not None else job.hidden.to(self.config.device, self.config.dtype)
        output = self.transform_step(inputs, output, job.span_input).to("cpu", job.hidden.dtype)
        if not job.sign:
            return output, ""
        return self.sign_reply(job.hidden, output, job.start, job.end, job.work, job.prompts)


def _error(kind: str, message: str) -> BlocksReply:
    return BlocksReply(error=protocol.ErrorInfo(kind=kind, message=message))


def bundle_tokens(bundle: StepBundle, protos: Sequence[runtime_pb2.Tensor]) -> int:
    """Batch x new tokens of a bundle's hidden states, read from their declared shapes (before any is decoded)."""
    tokens, offset = 0, 0
    for item in bundle.steps:
        if item.tensors and not item.step.pushed:
            size = protos[offset].size
            tokens += size[0] * size[1] if len(size) >= 2 else 0
        offset += item.tensors
    return tokens


def read_pushes(request: runtime_pb2.ExpertRequest) -> list[PushRequest]:
    """The pushes an `rpc_push` message carries: a `PushBatch`, or one `PushRequest` alone."""
    try:
        return list(protocol.unpack(request.metadata, PushBatch).pushes)
    except ProtocolError as batch_error:
        try:
            return [protocol.unpack(request.metadata, PushRequest)]
        except ProtocolError:
            raise batch_error from None


def check_prompts(prompts: torch.Tensor, blocks: int, hidden_size: int, position: int) -> torch.Tensor:
    """A step's deep prompts (blocks, prompt_length, hidden), checked; `ProtocolError` otherwise. Only a step that
    starts below prompt_length carries them (a later one has nothing to add them to)."""
    if (prompts.ndim != 3 or prompts.shape[0] != blocks or not 1 <= prompts.shape[1] <= MAX_PROMPT_LENGTH
            or prompts.shape[2] != hidden_size or not prompts.is_floating_point()):
        raise ProtocolError(f"deep prompts must be floating point ({blocks}, 1..{MAX_PROMPT_LENGTH}, {hidden_size}), "
                            f"got {prompts.dtype} {tuple(prompts.shape)}")
    if position >= prompts.shape[1]:
        raise ProtocolError(f"a step at position {position} has no positions below the deep prompts' length "
                            f"{prompts.shape[1]}: send no prompts")
    if not bool(torch.isfinite(prompts).all()):
        raise ProtocolError("deep prompts contain NaN or infinity")
    return prompts


# What the peer builds its handler with: BlockHandler itself, or a subclass (or a factory of one).
HandlerFactory = Callable[[BlockSpan, HandlerConfig, float, int], BlockHandler]
