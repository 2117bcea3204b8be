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
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

import torch

from swarm.errors import BadReceiptError, MissingBlocksError, PeerError, PeerUnreachableError, RemoteError, SwarmError
from swarm.hooks import HopStep, ReplyVerifier, StepObserver, StepRecord
from swarm.protocol import StepRequest
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
                 observer: StepObserver | None = None, verifier: ReplyVerifier | None = None):
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
        index, failures = 0, 0
        while index < len(self._hops):
            hop = self._hops[index]
            try:
                reply = await self._send(hop, hidden, position, mask)
            except PeerError as error:
                failures += 1
                if failures > MAX_FAILOVERS_PER_STEP:
                    raise
                if isinstance(error, BadReceiptError) and hop.since < position:
                    self._untrust(hop.since)  # a peer caught faking receipts: its earlier outputs go too
                await self._recover(index, error, position, mask)
                continue  # retry this step on the replacement hop(s) at the same index
            hop.record(hidden, position)
            self.hop_steps += 1
            if self.observer is not None:
                self.observer.on_step(StepRecord(
                    self.session_id, hop.route.peer_id, hop.route.start, hop.route.end, position, hidden,
                    reply.output, tuple(hop.chunks), mask is not None, reply.receipt, mask, hop.sent,
                ))
            hidden = reply.output
            index += 1
        self.position = position + hidden.shape[1]
        self._padding = mask
        return StepOutput(hidden, self._take_untrusted())

    def _take_untrusted(self) -> int | None:
        untrusted, self._untrusted_from = self._untrusted_from, None
        return untrusted

    def _untrust(self, since: int) -> None:
        self._untrusted_from = since if self._untrusted_from is None else min(self._untrusted_from, since)

    async def _send(self, hop: _Hop, hidden: torch.Tensor, position: int, mask: torch.Tensor | None) -> Reply:
        """One step on one hop; with a verifier, only a reply whose receipt is valid for it comes back."""
        meta = StepRequest(
            session_id=self.session_id,
            start=hop.route.start,
            end=hop.route.end,
            position=position,
            max_length=self.max_length,
        )
        began = time.perf_counter()
        reply = await hop.stream.step(meta, hidden, mask, timeout=self.sequence.cfg.request_timeout)
        seconds = time.perf_counter() - began
        sent = hop.sent + hidden.shape[0] * hidden.shape[1]
        if self.verifier is not None:
            self.verifier.verify(HopStep(hop.route.peer_id, meta, hop.steps, sent), hidden, reply)
        hop.steps, hop.sent = hop.steps + 1, sent
        self.sequence.observe_step(hop.route.peer_id, hop.route.end - hop.route.start,
                                   hidden.shape[0] * hidden.shape[1], seconds)
        return reply

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
