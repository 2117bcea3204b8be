"""The push chain on a peer (issue 15): hidden states pushed from one hop of a client's route to the next.

A client that pushes sends every hop its step request at once. The first hop gets the hidden states in its
request; a later hop's request says `pushed` and names the previous hop (`push_from`), and the hidden states come
from that peer over `rpc_push`. Each hop still replies to the client, so the client holds every hop's input and
output as on the client-driven path (history, replay, spot checks, receipts), and only the last hop's reply is on
the critical path: client -> p1 -> p2 -> p3 -> client, one link crossing per hop plus one.

`PushInbox` holds pushes until the step that needs them (either may come first); `PushLinks` keeps one open
`rpc_push` stream to each next hop. A push that never comes makes the step fail with `push_timeout` (at once when
the pusher's link closes, as when it dies), and the client sends that hop its input itself: a lost push costs
time, never a wrong token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from swarm import protocol
from swarm.protocol import MAX_PUSHES_PER_MESSAGE, BlocksReply, PushBatch, PushRequest
from swarm.remote import BlockService
from swarm.streams import open_reply_stream

logger = logging.getLogger(__name__)

PushKey = tuple[str, int, int]  # (session id, first block, position) of the step a push is the input of
MAX_PUSH_MESSAGE_BYTES = 4 << 20  # pushes queued together go in one message up to this size (one at least)
QueuedPush = tuple[PushRequest, torch.Tensor]


class PushTimeout(Exception):
    """The step's pushed input did not arrive in time."""


@dataclass
class _Held:
    hidden: torch.Tensor
    arrived: float

    @property
    def nbytes(self) -> int:
        return _nbytes(self.hidden)


@dataclass
class PushInbox:
    """Pushed inputs by the step they are for and their sender, and the steps waiting for theirs.

    Pushes nobody asked for yet wait `ttl` seconds at most. Each sender holds at most `max_sender_bytes` of them
    (its oldest go first), and all senders `max_bytes`: past that, the sender holding the most loses its oldest.
    So a stranger that floods the inbox evicts its own pushes, not those of the hops a client named, and cannot
    replace another sender's push for the same step."""

    ttl: float = 10.0
    max_bytes: int = 256 << 20
    max_sender_bytes: int = 64 << 20
    received: int = 0  # pushes taken by a step
    _held: dict[tuple[PushKey, str], _Held] = field(default_factory=dict)  # in arrival order
    _sender_bytes: dict[str, int] = field(default_factory=dict)
    _waiting: dict[PushKey, tuple[str, asyncio.Future]] = field(default_factory=dict)

    @property
    def held_bytes(self) -> int:
        return sum(self._sender_bytes.values())

    def deliver(self, key: PushKey, sender: str, hidden: torch.Tensor) -> None:
        waiter = self._waiting.get(key)
        if waiter is not None and waiter[0] == sender and not waiter[1].done():
            waiter[1].set_result(hidden)
            return
        self._expire(time.monotonic())
        self._drop(key, sender)  # a sender's second push for a step replaces its first
        held = _Held(hidden, time.monotonic())
        self._held[(key, sender)] = held
        self._sender_bytes[sender] = self._sender_bytes.get(sender, 0) + held.nbytes
        while self._sender_bytes.get(sender, 0) > self.max_sender_bytes:
            self._drop_oldest(sender)
        while self.held_bytes > self.max_bytes:
            self._drop_oldest(max(self._sender_bytes, key=self._sender_bytes.__getitem__))

    async def take(self, key: PushKey, sender: str, timeout: float) -> torch.Tensor:
        """The input `sender` pushed for the step `key`, waiting `timeout` seconds at most (else `PushTimeout`)."""
        held = self._drop(key, sender)
        if held is not None:
            self.received += 1
            return held.hidden
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiting[key] = (sender, future)
        try:
            hidden = await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise PushTimeout(f"no input pushed by {sender} within {timeout:g} s") from None
        finally:
            if self._waiting.get(key, (None, None))[1] is future:
                del self._waiting[key]
        self.received += 1
        return hidden

    def abandon(self, sender: str) -> int:
        """`sender`'s push link closed (the peer died, or its link broke): the steps waiting for its pushes fail
        now with `PushTimeout` rather than after their timeout, and their clients go on client-driven at once.
        Returns how many failed."""
        failed = 0
        for waiting_sender, future in self._waiting.values():
            if waiting_sender == sender and not future.done():
                future.set_exception(PushTimeout(f"{sender} closed its push link"))
                failed += 1
        return failed

    def _drop(self, key: PushKey, sender: str) -> _Held | None:
        held = self._held.pop((key, sender), None)
        if held is not None:
            self._sender_bytes[sender] -= held.nbytes
            if self._sender_bytes[sender] <= 0:
                del self._sender_bytes[sender]
        return held

    def _drop_oldest(self, sender: str) -> None:
        oldest = next(key for key, who in self._held if who == sender)
        self._drop(oldest, sender)

    def _expire(self, now: float) -> None:
        for key, sender in [k for k, held in self._held.items() if now - held.arrived > self.ttl]:
            self._drop(key, sender)


class PushLinks:
    """One `rpc_push` stream from this peer to each next hop it pushes to, opened on the first push. `send` only
    queues (the step's reply to its client never waits for the push); the pushes queued when the link gets to them
    (the outputs of one batched run, for one) leave in one message. A link that breaks is opened anew on the next
    push, and the pushes it lost time out at the receiver."""

    def __init__(self, p2p: P2P):
        self._p2p = p2p
        self._outboxes: dict[PeerID, asyncio.Queue] = {}
        self._tasks: dict[PeerID, asyncio.Task] = {}
        self.sent = 0  # pushes
        self.messages = 0  # messages they went in

    def send(self, peer_id: PeerID, meta: PushRequest, hidden: torch.Tensor) -> None:
        outbox = self._outboxes.setdefault(peer_id, asyncio.Queue())
        outbox.put_nowait((meta, hidden))
        self.sent += 1
        task = self._tasks.get(peer_id)
        if task is None or task.done():
            self._tasks[peer_id] = asyncio.create_task(self._run(peer_id, outbox), name=f"push link to {peer_id}")

    async def _run(self, peer_id: PeerID, outbox: asyncio.Queue) -> None:
        async def requests() -> AsyncIterator[runtime_pb2.ExpertRequest]:
            carried = None  # a push that did not fit the previous message
            while (first := carried if carried is not None else await outbox.get()) is not None:
                batch, carried, closing = take_batch(first, outbox)
                self.messages += 1
                yield push_message(batch)
                if closing:
                    return

        try:
            replies = await open_reply_stream(self._p2p, peer_id, BlockService, "rpc_push", requests())
            async for ack in replies:
                reply = protocol.unpack(ack.metadata, BlocksReply)
                if reply.error is not None:
                    logger.debug(f"Push to {peer_id} refused: {reply.error.kind}: {reply.error.message}")
        except Exception as e:  # link boundary: the receiver times out and its client sends the input itself
            logger.debug(f"Push link to {peer_id} broke: {type(e).__name__}: {e}")

    async def close(self) -> None:
        for outbox in self._outboxes.values():
            outbox.put_nowait(None)
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()


def take_batch(first: QueuedPush, outbox: asyncio.Queue) -> tuple[list[QueuedPush], QueuedPush | None, bool]:
    """`first` and the pushes queued behind it that fit one message (`MAX_PUSHES_PER_MESSAGE`,
    `MAX_PUSH_MESSAGE_BYTES`), taken from `outbox`; the push taken that did not fit (or None); and whether the link
    was asked to close (a None queued)."""
    batch, size = [first], _nbytes(first[1])
    while len(batch) < MAX_PUSHES_PER_MESSAGE and not outbox.empty():
        item = outbox.get_nowait()
        if item is None:
            return batch, None, True
        if size + _nbytes(item[1]) > MAX_PUSH_MESSAGE_BYTES:
            return batch, item, False
        batch.append(item)
        size += _nbytes(item[1])
    return batch, None, False


def push_message(batch: list[QueuedPush]) -> runtime_pb2.ExpertRequest:
    """One `rpc_push` message: a lone push as a `PushRequest` (what peers before `PushBatch` read), several as a
    `PushBatch`."""
    if len(batch) == 1:
        return protocol.make_request("", batch[0][0], batch[0][1])
    return protocol.make_request("", PushBatch(pushes=[meta for meta, _ in batch]), *[hidden for _, hidden in batch])


def _nbytes(hidden: torch.Tensor) -> int:
    return hidden.numel() * hidden.element_size()
