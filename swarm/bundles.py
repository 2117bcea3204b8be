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


@dataclass(eq=False)
class _Item:
    member: object
    step: StepRequest
    tensors: list[runtime_pb2.Tensor]
    reply: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass
class _Link:
    """One open bundle stream: where bundles go, and the steps sent on it that await their replies."""

    outbox: asyncio.Queue
    sent: dict[tuple[int, int], _Item] = field(default_factory=dict)  # (bundle, item) -> the step
    reader: asyncio.Task | None = None
    closed: bool = False


class StepBundler:
    """Bundles the steps of one client's sessions to `peer_id` (`step`); `member` is whatever stands for a session's
    stream to that peer (it stays the same between its steps)."""

    def __init__(self, p2p: P2P, peer_id: PeerID, service: type[ServicerBase], max_wait: float = MAX_WAIT):
        self.peer_id, self.max_wait = peer_id, max_wait
        self._p2p, self._service = p2p, service
        self._last_step: dict[object, float] = {}  # member -> time.monotonic() of its last step
        self._pending: list[_Item] = []  # waiting to be sent
        self._sending: set[_Item] = set()  # flushed, on their way into a bundle
        self._tasks: set[asyncio.Task] = set()  # sends under way
        self._timer: asyncio.TimerHandle | None = None
        self._link: _Link | None = None  # the open bundle stream
        self._opening: asyncio.Future | None = None  # while the stream opens: its `_Link`, or None if it cannot
        self._unavailable_until = 0.0
        self._next_bundle = 0
        self.bundled_steps = 0  # steps sent in bundles

    def worth_it(self, member: object) -> bool:
        """Whether `member`'s next step should go in a bundle: another session stepped through this peer lately."""
        now = time.monotonic()
        self._last_step[member] = now
        return now >= self._unavailable_until and any(
            other is not member and now - when <= ACTIVE_WINDOW for other, when in self._last_step.items())

    def forget(self, member: object) -> None:
        """`member`'s session closed: steps no longer wait for it; the stream closes with the last session."""
        self._last_step.pop(member, None)
        link = self._link
        if not self._last_step and link is not None and not link.sent and not self._pending and not self._sending:
            self._close(link)

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
        """Whether every session expected to step has: its step is pending, or already on its way."""
        now = time.monotonic()
        on_the_way = [*self._pending, *self._sending, *(self._link.sent.values() if self._link else ())]
        waiting = {item.member for item in on_the_way}
        return all(member in waiting for member, when in self._last_step.items() if now - when <= ACTIVE_WINDOW)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        items = [item for item in self._pending if not item.reply.done()]
        self._pending = []
        for first in range(0, len(items), protocol.MAX_STEPS_PER_BUNDLE):
            task = asyncio.ensure_future(self._send(items[first : first + protocol.MAX_STEPS_PER_BUNDLE]))
            self._tasks.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self._tasks.discard)

    async def _send(self, items: list[_Item]) -> None:
        try:
            self._sending.update(items)
            try:
                link = await self._open()
            finally:
                self._sending.difference_update(items)
            if link is None or link.closed:
                raise BundleUnavailable()
            bundle, self._next_bundle = self._next_bundle, self._next_bundle + 1
            message = runtime_pb2.ExpertRequest(
                metadata=protocol.pack(StepBundle(bundle=bundle, steps=[
                    BundledStep(step=item.step, tensors=len(item.tensors)) for item in items])),
                tensors=[t for item in items for t in item.tensors])
        except Exception as e:  # no stream, or a bug here: the steps go on their own streams, none waits in vain
            if not isinstance(e, BundleUnavailable):
                logger.warning(f"Cannot bundle steps to {self.peer_id}", exc_info=True)
            for item in items:
                _settle(item.reply, exception=BundleUnavailable())
            return
        for index, item in enumerate(items):
            link.sent[(bundle, index)] = item
        self.bundled_steps += len(items)
        link.outbox.put_nowait(message)

    async def _open(self) -> _Link | None:
        """The open bundle stream (opening it if needed); None if the peer takes no bundles now."""
        if self._link is not None:
            return self._link
        if self._opening is not None:
            return await asyncio.shield(self._opening)
        opening = self._opening = asyncio.get_running_loop().create_future()
        link: _Link | None = _Link(asyncio.Queue())
        try:
            replies = await open_reply_stream(self._p2p, self.peer_id, self._service, "rpc_bundle",
                                              _drain(link.outbox))
        except Exception as e:  # a peer without bundles, or one that went away: its sessions' own streams tell
            logger.debug(f"No bundle stream to {self.peer_id}: {e}")
            self._unavailable_until = time.monotonic() + RETRY_SECONDS
            link = None
        else:
            link.reader = asyncio.ensure_future(self._read(link, replies))
            self._link = link
        finally:
            self._opening = None
            opening.set_result(link)
        return link

    async def _read(self, link: _Link, replies) -> None:
        failure: Exception = PeerUnreachableError(str(self.peer_id), f"lost the bundle stream to peer {self.peer_id}")
        try:
            async for message in replies:
                self._deliver(link, message)
        except ProtocolError as e:
            failure = BadReplyError(str(self.peer_id), str(e))
        except Exception as e:  # the stream broke: the peer died, or the connection dropped
            failure = PeerUnreachableError(str(self.peer_id), f"lost the bundle stream to peer {self.peer_id}: {e}")
        finally:
            self._close(link)
            sent, link.sent = link.sent, {}
            for item in sent.values():
                _settle(item.reply, exception=failure)

    def _deliver(self, link: _Link, message: runtime_pb2.ExpertResponse) -> None:
        """Hand each reply of a `BundleReply` to its step; a message that cannot be read ends the stream (every
        step still waiting on it is failed, blaming the peer)."""
        try:
            reply = protocol.unpack(message.metadata, BundleReply)
        except ProtocolError as e:
            raise ProtocolError(f"unreadable bundle reply: {e}") from None
        if reply.error is not None:
            refused = [key for key in link.sent if reply.bundle is None or key[0] == reply.bundle]
            for key in refused:
                _settle(link.sent.pop(key).reply,
                        exception=RemoteError(str(self.peer_id), reply.error.kind, reply.error.message))
            return
        if sum(r.tensors for r in reply.replies) != len(message.tensors):
            raise ProtocolError("a bundle reply whose tensors do not match its replies")
        offset = 0
        for item_reply in reply.replies:
            tensors = list(message.tensors[offset : offset + item_reply.tensors])
            offset += item_reply.tensors
            item = link.sent.pop((reply.bundle, item_reply.item), None)
            if item is None:  # a step we gave up on (timed out), or a reply the peer made up
                continue
            _settle(item.reply, result=(item_reply.reply, tensors))

    def _close(self, link: _Link) -> None:
        """End `link` (its reader fails the steps still waiting on it)."""
        if link.closed:
            return
        link.closed = True
        if self._link is link:
            self._link = None
        link.outbox.put_nowait(None)
        if link.reader is not None and link.reader is not asyncio.current_task():
            link.reader.cancel()

    async def close(self) -> None:
        self._last_step.clear()
        if self._link is not None:
            self._close(link=self._link)


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

