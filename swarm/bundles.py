"""Several sessions' steps to one peer in one message (`rpc_bundle`), and their replies back the same way.

A client that runs several sessions at once sends each peer one step per session per token. Each message costs
Python and p2p-daemon work on both sides, and on a shared CPU that work delays the batched run the steps wait for.
While two or more of this client's sessions step through the same peer, their steps that are ready together go to
it as one `StepBundle`; the peer computes them as it would on their own streams (one batched run), and replies as
steps finish, those that finish together in one message.

A session's step waits for the others' only while they are expected: each session that stepped through this peer
within `ACTIVE_WINDOW` and has not closed, for `MAX_WAIT` at most. A lone session's steps keep to its own stream.
A peer that cannot open the bundle stream (a version without it) gets the steps on the sessions' own streams, and
is asked again after `RETRY_SECONDS`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

from hivemind.p2p import P2P, PeerID, ServicerBase
from hivemind.proto import runtime_pb2

from swarm import protocol
from swarm.errors import BadReplyError, PeerUnreachableError, ProtocolError, RemoteError
from swarm.protocol import BlocksReply, BundledStep, BundleReply, StepBundle, StepRequest
from swarm.streams import open_reply_stream

logger = logging.getLogger(__name__)

ACTIVE_WINDOW = 1.0  # seconds: a session that stepped within this long is expected to step again
MAX_WAIT = 0.004  # seconds a step waits at most for the other sessions' steps
MAX_BUNDLED_TOKENS = 64  # batch x new tokens of a step that may go in a bundle (decode steps, speculative drafts)
RETRY_SECONDS = 60.0  # after the bundle stream could not open, steps go on their own streams this long


class BundleUnavailable(Exception):
    """The peer takes no bundles now: send the step on the session's own stream."""


@dataclass
class _Item:
    member: object
    step: StepRequest
    tensors: list[runtime_pb2.Tensor]
    reply: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class StepBundler:
    """Bundles the steps of one client's sessions to `peer_id` (`step`); `member` is whatever stands for a session's
    stream to that peer (it stays the same between its steps)."""

    def __init__(self, p2p: P2P, peer_id: PeerID, service: type[ServicerBase], max_wait: float = MAX_WAIT):
        self.peer_id, self.max_wait = peer_id, max_wait
        self._p2p, self._service = p2p, service
        self._last_step: dict[object, float] = {}  # member -> time.monotonic() of its last step
        self._pending: list[_Item] = []  # waiting to be sent
        self._sent: dict[tuple[int, int], _Item] = {}  # (bundle, item) -> the item awaiting its reply
        self._timer: asyncio.TimerHandle | None = None
        self._outbox: asyncio.Queue[runtime_pb2.ExpertRequest | None] | None = None
        self._opening: asyncio.Future | None = None  # done once the stream is open (or could not open)
        self._reader: asyncio.Task | None = None
        self._unavailable_until = 0.0
        self._next_bundle = 0
        self.bundled_steps = 0  # steps that went in a bundle of several

    def worth_it(self, member: object) -> bool:
        """Whether `member`'s next step should go in a bundle: another session stepped through this peer lately."""
        now = time.monotonic()
        self._last_step[member] = now
        return now >= self._unavailable_until and any(
            other is not member and now - when <= ACTIVE_WINDOW for other, when in self._last_step.items())

    def forget(self, member: object) -> None:
        """`member`'s session closed: steps no longer wait for it; the stream closes with the last session."""
        self._last_step.pop(member, None)
        if not self._last_step and self._outbox is not None and not self._sent and not self._pending:
            self._close_stream()

    async def step(self, member: object, step: StepRequest, tensors: Sequence[runtime_pb2.Tensor],
                   timeout: float | None) -> tuple[BlocksReply, list[runtime_pb2.Tensor]]:
        """Send `step` in a bundle; its reply and tensors (not yet checked). `BundleUnavailable`: send it alone."""
        item = _Item(member, step, list(tensors))
        self._pending.append(item)
        if self._everyone_waits():
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.max_wait, self._flush)
        try:
            return await asyncio.wait_for(asyncio.shield(item.reply), timeout)
        except asyncio.TimeoutError:
            raise PeerUnreachableError(str(self.peer_id), f"peer {self.peer_id} did not answer within {timeout:.0f} s"
                                       ) from None
        finally:
            if not item.reply.done():
                item.reply.cancel()
                if item in self._pending:
                    self._pending.remove(item)

    def _everyone_waits(self) -> bool:
        """Whether every session expected to step has: its step is pending, or still on its way (sent before)."""
        now = time.monotonic()
        waiting = {item.member for item in self._pending} | {item.member for item in self._sent.values()}
        return all(member in waiting for member, when in self._last_step.items() if now - when <= ACTIVE_WINDOW)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        items = [item for item in self._pending if not item.reply.done()]
        self._pending = []
        for first in range(0, len(items), protocol.MAX_STEPS_PER_BUNDLE):
            asyncio.ensure_future(self._send(items[first : first + protocol.MAX_STEPS_PER_BUNDLE]))

    async def _send(self, items: list[_Item]) -> None:
        if not await self._open() or self._outbox is None:
            for item in items:
                _settle(item.reply, exception=BundleUnavailable())
            return
        bundle, self._next_bundle = self._next_bundle, self._next_bundle + 1
        message = StepBundle(bundle=bundle, steps=[BundledStep(step=item.step, tensors=len(item.tensors))
                                                    for item in items])
        for index, item in enumerate(items):
            self._sent[(bundle, index)] = item
        self.bundled_steps += len(items)
        self._outbox.put_nowait(runtime_pb2.ExpertRequest(
            metadata=protocol.pack(message), tensors=[t for item in items for t in item.tensors]))

    async def _open(self) -> bool:
        """Whether the bundle stream is open (opening it if needed)."""
        if self._opening is None:
            self._opening = asyncio.get_running_loop().create_future()
            outbox: asyncio.Queue[runtime_pb2.ExpertRequest | None] = asyncio.Queue()
            try:
                replies = await open_reply_stream(self._p2p, self.peer_id, self._service, "rpc_bundle",
                                                  _drain(outbox))
            except Exception as e:  # a peer without bundles, or one that went away: its sessions' own streams tell
                logger.debug(f"No bundle stream to {self.peer_id}: {e}")
                self._unavailable_until = time.monotonic() + RETRY_SECONDS
                self._opening.set_result(False)
                self._opening = None
                return False
            self._outbox = outbox
            self._reader = asyncio.ensure_future(self._read(replies))
            self._opening.set_result(True)
        return await asyncio.shield(self._opening)

    async def _read(self, replies) -> None:
        failure: Exception = PeerUnreachableError(str(self.peer_id), f"lost the bundle stream to peer {self.peer_id}")
        try:
            async for message in replies:
                self._deliver(message)
        except ProtocolError as e:
            failure = BadReplyError(str(self.peer_id), str(e))
        except Exception as e:  # the stream broke: the peer died, or the connection dropped
            failure = PeerUnreachableError(str(self.peer_id), f"lost the bundle stream to peer {self.peer_id}: {e}")
        finally:
            self._close_stream()
            sent, self._sent = self._sent, {}
            for item in sent.values():
                _settle(item.reply, exception=failure)

    def _deliver(self, message: runtime_pb2.ExpertResponse) -> None:
        """Hand each reply of a `BundleReply` to its step; a message that cannot be read ends the stream (every
        step still waiting on it is failed, blaming the peer)."""
        try:
            reply = protocol.unpack(message.metadata, BundleReply)
        except ProtocolError as e:
            raise ProtocolError(f"unreadable bundle reply: {e}") from None
        if reply.error is not None:
            stuck = [key for key in self._sent if reply.bundle is None or key[0] == reply.bundle]
            for key in stuck:
                _settle(self._sent.pop(key).reply,
                        exception=RemoteError(str(self.peer_id), reply.error.kind, reply.error.message))
            return
        if sum(r.tensors for r in reply.replies) != len(message.tensors):
            raise ProtocolError("a bundle reply whose tensors do not match its replies")
        offset = 0
        for item_reply in reply.replies:
            tensors = list(message.tensors[offset : offset + item_reply.tensors])
            offset += item_reply.tensors
            item = self._sent.pop((reply.bundle, item_reply.item), None)
            if item is None:  # a step we gave up on (timed out), or a reply the peer made up
                continue
            _settle(item.reply, result=(item_reply.reply, tensors))

    def _close_stream(self) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(None)
        self._outbox, self._opening = None, None
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
        self._reader = None

    async def close(self) -> None:
        self._last_step.clear()
        self._close_stream()


def _settle(future: asyncio.Future, result=None, exception: BaseException | None = None) -> None:
    if future.done():
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)


async def _drain(outbox: asyncio.Queue):
    while (request := await outbox.get()) is not None:
        yield request

