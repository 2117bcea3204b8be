"""An inference session over a chain of peers: hidden states stream hop by hop, token by token.

Each hop keeps one open stream (from the `Transport` the session is given) and its part of the KV cache.
The client keeps the inputs it sent to every hop, so when a peer fails mid-session it is banned for a
while, its blocks are routed to other peers, and those peers rebuild the KV cache from the replayed inputs
before the step goes on. The caller sees at most a pause. A peer reachable only through relays whose stream
drops is first reached once more, through another of its relays (its relay may have gone, not the peer), and
rebuilds its cache the same way; only if that fails too is it banned.

With a trust layer, every hop's reply must carry the peer's valid signed receipt for exactly that step
(its `ReplyVerifier` decides); a reply without one is that peer's fault, handled like a bad reply at once.

A peer blacklisted by the trust layer is routed around the same way, and every later hop's cache is
rebuilt from the replacement's outputs. The outputs it gave since it joined the route cannot be trusted
either: each `step` and `settle` returns from which position on (`untrusted_from`), once, so the caller
can regenerate those tokens.

With deep prompts (num_blocks, prompt_length, hidden), every step that covers positions below prompt_length (the
prefill, and every replay to a replacement peer) carries each hop the prompts of its own blocks; such steps never
go as push chains.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

import torch

from swarm.errors import BadReceiptError, MissingBlocksError, PeerError, PeerUnreachableError, RemoteError, SwarmError
from swarm.hooks import HopStep, ReplyVerifier, StepObserver, StepRecord
from swarm.protocol import PushTarget, StepRequest, tensor_digest
from swarm.routing import RouteHop
from swarm.sequence import RemoteSequence
from swarm.transport import PeerStream, Reply, Transport

logger = logging.getLogger(__name__)

MAX_FAILOVERS_PER_STEP = 8
REOPEN_KINDS = frozenset({"unknown_session", "bad_position"})  # the peer lost our cache (idle timeout, restart)


@dataclass
class _Hop:
    route: RouteHop
    stream: PeerStream
    chunks: list[torch.Tensor] = field(default_factory=list)  # every input sent so far, (batch, new, hidden) each
    held: int = 0  # tokens those chunks hold
    since: int = 0  # the session's position when this hop began serving its steps
    steps: int = 0  # replies this hop's stream gave (the peer's receipts count them)
    sent: int = 0  # batch x tokens sent on this stream (the most its receipts may claim)

    def record(self, hidden: torch.Tensor, position: int) -> None:
        """Remember a step's input (appending is O(1); a rollback trims the history first)."""
        if position < self.held:
            kept = self.history(position)
            self.chunks = [] if kept is None else [kept]
        self.chunks.append(hidden)
        self.held = position + hidden.shape[1]

    def history(self, length: int) -> torch.Tensor | None:
        """The first `length` tokens of input this hop received, or None."""
        if length == 0 or not self.chunks:
            return None
        return torch.cat(self.chunks, dim=1)[:, :length]


@dataclass(frozen=True)
class StepOutput:
    """What a step gives back: the last hop's output, and where untrusted outputs begin (None: nowhere)."""

    hidden: torch.Tensor
    untrusted_from: int | None = None  # outputs from this session position on passed through a blacklisted peer


@dataclass
class FailoverEvent:
    """One recovery: who failed, why, and how long the step was held up."""

    peer_id: str
    blocks: tuple[int, int]
    reason: str
    replacement: list[str] = field(default_factory=list)
    seconds: float = 0.0


class InferenceSession:
    def __init__(self, sequence: RemoteSequence, transport: Transport, max_length: int,
                 observer: StepObserver | None = None, verifier: ReplyVerifier | None = None, push: bool = False,
                 deep_prompts: torch.Tensor | None = None):
        self.sequence, self.transport, self.observer = sequence, transport, observer
        self.verifier = verifier  # None: replies are used without looking at their receipts
        self.max_length = max_length
        self.session_id = uuid.uuid4().hex
        self.position = 0  # tokens every hop holds
        self.hop_steps = 0  # hops' replies to steps used so far (each hop of each step once)
        self.failovers: list[FailoverEvent] = []
        self._hops: list[_Hop] | None = None
        self._padding: torch.Tensor | None = None  # (batch, position) 0/1 mask, only if some row is padded
        self._needed_tokens = max_length  # KV-cache room each peer must hold for this session
        self._untrusted_from: int | None = None  # not yet reported to the caller
        self.push = push  # decode steps go as push chains (`_push_step`); off after the first broken one
        self.pushed_steps = 0  # steps that went through a push chain end to end
        self.push_fallbacks = 0  # push chains that broke (the step went on client-driven)
        self.deep_prompts = deep_prompts  # (num_blocks, prompt_length, hidden): added at each block's input, or None

    @property
    def route(self) -> list[RouteHop]:
        return [hop.route for hop in self._hops or []]

    async def _open(self, batch: int) -> None:
        self._needed_tokens = batch * self.max_length
        route = await self.sequence.make_route(needed_tokens=self._needed_tokens)
        self._hops = [_Hop(hop, self.transport.open_stream(hop.peer_id)) for hop in route]
        logger.debug("Route: " + " -> ".join(f"{h.peer_id}[{h.start}:{h.end}]" for h in route))

    async def step(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, position: int | None = None
    ) -> StepOutput:
        """Send hidden states (batch, new, hidden) through every hop; returns the last hop's output.

        `attention_mask` (batch, position + new) is needed only when some row is left-padded.
        `position` below the current one rolls the session back to it first.
        """
        position = self.position if position is None else position
        if position > self.position:
            raise ValueError(f"cannot step at position {position}: the session holds {self.position} tokens")
        if position + hidden.shape[1] > self.max_length:
            raise ValueError(f"{position + hidden.shape[1]} tokens exceed the session's max_length {self.max_length}")
        if self._hops is None:
            await self._open(hidden.shape[0])
        mask = self._session_mask(attention_mask, position, hidden)
        for hop in self._hops:  # after a rollback, a hop serves the steps from `position` on again
            hop.since = min(hop.since, position)
        await self._evict_blacklisted(position, mask)
        index, failures, pending = 0, 0, None
        if self._can_push(position):
            index, hidden, pending = await self._push_step(hidden, position, mask)
        while index < len(self._hops):
            hop = self._hops[index]
            try:
                if pending is not None:  # the push chain's reply from this hop was bad: recover as from any other
                    error, pending = pending, None
                    raise error
                reply = await self._send(hop, hidden, position, mask)
            except PeerError as error:
                failures += 1
                if failures > MAX_FAILOVERS_PER_STEP:
                    raise
                if isinstance(error, BadReceiptError) and hop.since < position:
                    self._untrust(hop.since)  # a peer caught faking receipts: its earlier outputs go too
                await self._recover(index, error, position, mask)
                continue  # retry this step on the replacement hop(s) at the same index
            self._record(hop, hidden, reply, position, mask)
            hidden = reply.output
            index += 1
        self.position = position + hidden.shape[1]
        self._padding = mask
        return StepOutput(hidden, self._take_untrusted())

    def _record(self, hop: _Hop, hidden: torch.Tensor, reply: Reply, position: int, mask: torch.Tensor | None) -> None:
        """Keep a hop's input for replay, and show the step to the observer (the spot checks)."""
        hop.record(hidden, position)
        self.hop_steps += 1
        if self.observer is not None:
            self.observer.on_step(StepRecord(
                self.session_id, hop.route.peer_id, hop.route.start, hop.route.end, position, hidden,
                reply.output, tuple(hop.chunks), mask is not None, reply.receipt, mask, hop.sent,
                None if self.deep_prompts is None else self.deep_prompts[hop.route.start : hop.route.end],
            ))

    def _hop_prompts(self, hop: _Hop, position: int) -> torch.Tensor | None:
        """The deep prompts a step at `position` carries to `hop`: its blocks' (end - start, prompt_length, hidden)
        while the step starts below prompt_length, else None."""
        if self.deep_prompts is None or position >= self.deep_prompts.shape[1]:
            return None
        return self.deep_prompts[hop.route.start : hop.route.end]

    def _can_push(self, position: int) -> bool:
        """Push chains carry decode steps (prefills open the sessions client-driven) over direct links only, and
        never a step that carries deep prompts."""
        return (self.push and position > 0 and len(self._hops) >= 2
                and (self.deep_prompts is None or position >= self.deep_prompts.shape[1])
                and not any(self.sequence.relayed(hop.route.peer_id) for hop in self._hops))

    async def _push_step(self, hidden: torch.Tensor, position: int, mask: torch.Tensor | None
                         ) -> tuple[int, torch.Tensor, PeerError | None]:
        """One step as a push chain: every hop gets its request at once, each passes its output to the next, and
        each replies to the client. Returns how many hops' replies were used and the last one's output; on any
        trouble, from where the client-driven path goes on (and pushing stops for this session), and the error of
        a hop whose reply the verifier refused (recovered from like a failed client-driven step)."""
        hops, timeout = self._hops, self.sequence.cfg.request_timeout
        metas = [self._request(hop, position, pushed=i > 0,
                               push_from=str(hops[i - 1].route.peer_id) if i > 0 else "",
                               push_to=_target(hops[i + 1]) if i + 1 < len(hops) else None)
                 for i, hop in enumerate(hops)]
        began, first_reply = time.perf_counter(), 0.0

        async def first() -> Reply:  # only the first hop's timing is a plain round trip (the speed it shows)
            nonlocal first_reply
            reply = await hops[0].stream.step(metas[0], hidden, mask, timeout=timeout)
            first_reply = time.perf_counter() - began
            return reply

        calls = [first()]
        calls += [hop.stream.step_pushed(meta, hidden.shape, mask, timeout=timeout)
                  for hop, meta in zip(hops[1:], metas[1:])]
        tasks = [asyncio.ensure_future(call) for call in calls]
        try:
            # each reply is checked as it comes, while later hops still compute
            used, unexpected = 0, None
            for index, (hop, meta, task) in enumerate(zip(hops, metas, tasks)):
                reply = await _settled(task)
                if isinstance(reply, BaseException) and not isinstance(reply, PeerError):
                    unexpected = reply
                    break
                if isinstance(reply, PeerError) or (index > 0 and reply.input_digest != tensor_digest(hidden)):
                    break  # a broken link, a failed hop, or a hop that computed on another input than the one shown
                try:
                    self._accept(hop, meta, hidden, reply, first_reply if index == 0 else None)
                except PeerError as refused:
                    replies = [await _settled(task) for task in tasks]
                    self._fall_back(index, replies, hidden, refused)
                    return index, hidden, refused
                self._record(hop, hidden, reply, position, mask)
                hidden, used = reply.output, index + 1
            # every reply is awaited, failed or not: a stream's next step must not be answered by this one's reply
            replies = [await _settled(task) for task in tasks]
        finally:
            for task in tasks:
                task.cancel()  # only those still running: the caller was cancelled
        if unexpected is not None:
            raise unexpected
        if used == len(hops):
            self.pushed_steps += 1
            return used, hidden, None
        self._fall_back(used, replies, hidden)
        return used, hidden, None

    def _fall_back(self, used: int, replies: list, hidden: torch.Tensor, refused: PeerError | None = None) -> None:
        """Stop pushing for this session after a push step failed at hop `used`; the replies of later hops count
        as steps the peers served (their receipts number them) though the client-driven path redoes them."""
        self.push = False
        self.push_fallbacks += 1
        failure = refused or replies[used]
        reason = _reason(failure) if isinstance(failure, SwarmError) else "its input differs from the previous hop's output"
        logger.warning(f"Push chain broke at {self._hops[used].route.peer_id} ({reason}); "
                       f"this session goes on client-driven")
        first = used + 1 if refused is not None else used  # a refused hop is recovered from, not stepped again
        for hop, reply in zip(self._hops[first:], replies[first:]):
            if isinstance(reply, Reply):
                hop.steps, hop.sent = hop.steps + 1, hop.sent + hidden.shape[0] * hidden.shape[1]

    def _take_untrusted(self) -> int | None:
        untrusted, self._untrusted_from = self._untrusted_from, None
        return untrusted

    def _untrust(self, since: int) -> None:
        self._untrusted_from = since if self._untrusted_from is None else min(self._untrusted_from, since)

    def _request(self, hop: _Hop, position: int, **fields) -> StepRequest:
        return StepRequest(session_id=self.session_id, start=hop.route.start, end=hop.route.end, position=position,
                           max_length=self.max_length, **fields)

    async def _send(self, hop: _Hop, hidden: torch.Tensor, position: int, mask: torch.Tensor | None) -> Reply:
        """One step on one hop (with its deep prompts, when it starts below their length); with a verifier, only a
        reply whose receipt is valid for it comes back."""
        prompts = self._hop_prompts(hop, position)
        meta = self._request(hop, position, prompts=prompts is not None)
        began = time.perf_counter()
        reply = await hop.stream.step(meta, hidden, mask, timeout=self.sequence.cfg.request_timeout, prompts=prompts)
        self._accept(hop, meta, hidden, reply, time.perf_counter() - began, prompts)
        return reply

    def _accept(self, hop: _Hop, meta: StepRequest, hidden: torch.Tensor, reply: Reply, seconds: float | None,
                prompts: torch.Tensor | None = None) -> None:
        """Count a hop's reply to a step that took `hidden` (and `prompts`); with a verifier, only if its receipt is
        valid for it. `seconds`: the step's round trip, to learn the peer's speed from (None: not a plain round
        trip)."""
        sent = hop.sent + hidden.shape[0] * hidden.shape[1]
        if self.verifier is not None:
            self.verifier.verify(HopStep(hop.route.peer_id, meta, hop.steps, sent, prompts), hidden, reply)
        hop.steps, hop.sent = hop.steps + 1, sent
        if seconds is not None:
            self.sequence.observe_step(hop.route.peer_id, hop.route.end - hop.route.start,
                                       hidden.shape[0] * hidden.shape[1], seconds)

    async def _evict_blacklisted(self, position: int, mask: torch.Tensor | None) -> None:
        """Route around hops whose peer the trust layer avoids since the last step (blacklisted or disputed), then
        rebuild every later hop's cache from the replacement's outputs (what that peer sent them cannot be trusted)."""
        trust = self.sequence.trust
        if trust is None or position == 0:
            return
        for _ in range(MAX_FAILOVERS_PER_STEP):
            index = next((i for i, h in enumerate(self._hops) if trust.avoids(str(h.route.peer_id))), None)
            if index is None:
                return
            bad = self._hops[index].route.peer_id
            self._untrust(self._hops[index].since)
            count_before = len(self._hops)
            output = await self._recover(index, _avoided(trust, str(bad)), position, mask)
            past_mask = None if mask is None else mask[:, :position]
            for later in self._hops[index + 1 + len(self._hops) - count_before :]:
                if output is None:
                    break
                inputs = output
                output = (await self._send(later, inputs, 0, past_mask)).output
                later.chunks, later.held = [], 0
                later.record(inputs, 0)

    async def _recover(
        self, index: int, error: SwarmError, position: int, mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Replace hop `index` after `error` (reopen it, or route its blocks elsewhere) and replay its inputs;
        returns the replacement's output for the replayed inputs (None when there were none)."""
        failed = self._hops[index]
        began = time.perf_counter()
        event = FailoverEvent(str(failed.route.peer_id), (failed.route.start, failed.route.end), _reason(error))
        await _close_quietly(failed.stream)
        history = failed.history(position)
        reopen = (isinstance(error, RemoteError) and error.kind in REOPEN_KINDS) or (
            # a relayed peer's stream drops when its relay goes away: reach it again through another relay
            isinstance(error, PeerUnreachableError) and self.sequence.relayed(failed.route.peer_id)
        )
        if not reopen:
            self.sequence.ban(failed.route.peer_id)
        for _ in range(MAX_FAILOVERS_PER_STEP):
            since = position  # the replacement serves from this step on
            if reopen:
                # the peer is fine, it only lost our cache or its relay: try it once more
                route, reopen = [failed.route], False
                since = failed.since  # ...and its earlier outputs are still its own
            else:
                try:
                    route = await self.sequence.make_route(
                        failed.route.start, failed.route.end, needed_tokens=self._needed_tokens
                    )
                except MissingBlocksError as missing:
                    if isinstance(error, RemoteError) and error.kind in AVOIDED_KINDS:  # no peer refused anything
                        raise MissingBlocksError(missing.model, missing.missing, missing.undialable,
                                                 f"peer {failed.route.peer_id} is left out: {error.remote_message}"
                                                 ) from None
                    raise error from None
            replacement = [_Hop(hop, self.transport.open_stream(hop.peer_id), since=since) for hop in route]
            try:
                replayed = None
                if history is not None and history.shape[1] > 0:
                    replayed = await self._replay(replacement, history, mask)
                break
            except PeerError as replay_error:
                logger.debug(f"Replay failed: {replay_error}")
                for hop in replacement:
                    await _close_quietly(hop.stream)
                self.sequence.ban(_failed_peer(replay_error, replacement))
        else:
            raise error
        self._hops[index : index + 1] = replacement
        event.replacement = [str(h.route.peer_id) for h in replacement]
        event.seconds = time.perf_counter() - began
        self.failovers.append(event)
        logger.warning(
            f"Peer {event.peer_id} failed on blocks {event.blocks[0]}:{event.blocks[1]} ({event.reason}); "
            f"re-routed to {', '.join(event.replacement)} in {event.seconds:.2f} s"
        )
        return replayed

    async def _replay(self, hops: list[_Hop], history: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Rebuild the new hops' KV caches from the inputs the failed hop had received; returns their output."""
        past_mask = None if mask is None else mask[:, : history.shape[1]]
        hidden = history
        for hop in hops:
            output = (await self._send(hop, hidden, 0, past_mask)).output
            hop.record(hidden, 0)
            hidden = output
        return hidden

    def _session_mask(
        self, attention_mask: torch.Tensor | None, position: int, hidden: torch.Tensor
    ) -> torch.Tensor | None:
        if attention_mask is not None:
            if attention_mask.shape[1] == hidden.shape[1] and position > 0:
                past = self._padding[:, :position] if self._padding is not None else None
                if past is None:
                    past = torch.ones(hidden.shape[0], position, dtype=attention_mask.dtype)
                attention_mask = torch.cat([past, attention_mask], dim=1)
            return None if bool(attention_mask.all()) and self._padding is None else attention_mask.to(torch.int64)
        if self._padding is None:
            return None
        ones = torch.ones(hidden.shape[0], hidden.shape[1], dtype=torch.int64)
        return torch.cat([self._padding[:, :position], ones], dim=1)

    async def settle(self) -> int | None:
        """Wait for the observer's work on the steps so far (the spot checks), then route around any peer it
        blacklisted; returns from which position outputs are untrusted (None: every output can be trusted)."""
        if self._hops is None:
            return self._take_untrusted()
        if self.observer is not None:
            await self.observer.settle(self.session_id)
        await self._evict_blacklisted(self.position, self._padding)
        return self._take_untrusted()

    def rollback(self, position: int) -> None:
        """Forget tokens from `position` on; the peers crop their caches at the next step."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot roll back to {position}: the session holds {self.position} tokens")
        self.position = position

    async def close(self) -> None:
        for hop in self._hops or []:
            await _close_quietly(hop.stream)
        if self._hops is not None and self.observer is not None:
            self.observer.on_close(self.session_id)
        self._hops = None


AVOIDED_KINDS = ("blacklisted", "disputed")  # failover reasons the trust layer gives, not the peer


def _avoided(trust, peer: str) -> RemoteError:
    """Why a session moves off a peer the trust layer avoids (a failover event's reason)."""
    if trust.is_blacklisted(peer):
        return RemoteError(peer, "blacklisted", "blacklisted by spot checks")
    return RemoteError(peer, "disputed", "contradicted by every other execution of its blocks")


async def _settled(task: asyncio.Future) -> object:
    """A finished call's reply or the exception it raised."""
    await asyncio.wait([task])
    return task.exception() if task.exception() is not None else task.result()


def _target(hop: _Hop) -> PushTarget:
    return PushTarget(peer_id=str(hop.route.peer_id), start=hop.route.start, end=hop.route.end)


def _failed_peer(error: PeerError, hops: list[_Hop]):
    """Which of `hops` the error blames."""
    return next((hop.route.peer_id for hop in hops if str(hop.route.peer_id) == error.peer), hops[0].route.peer_id)


def _reason(error: SwarmError) -> str:
    return f"{error.kind}: {error.remote_message}" if isinstance(error, RemoteError) else str(error)


async def _close_quietly(stream: PeerStream) -> None:
    try:
        await stream.close()
    except Exception:  # closing is best effort: the peer frees the cache when the stream drops
        logger.debug(f"Closing the stream to {stream.peer_id} failed", exc_info=True)
