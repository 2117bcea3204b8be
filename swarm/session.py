"""An inference session over a chain of peers: hidden states stream hop by hop, token by token.

Each hop keeps one open `rpc_inference` stream and its part of the KV cache; the client only tracks
how many tokens the session holds (`position`).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import torch

from swarm.protocol import StepRequest
from swarm.remote import InferenceStream
from swarm.routing import RouteHop
from swarm.sequence import RemoteSequence

logger = logging.getLogger(__name__)


@dataclass
class _Hop:
    route: RouteHop
    stream: InferenceStream


class InferenceSession:
    def __init__(self, sequence: RemoteSequence, max_length: int):
        self.sequence = sequence
        self.max_length = max_length
        self.session_id = uuid.uuid4().hex
        self.position = 0  # tokens every hop holds
        self._hops: list[_Hop] | None = None
        self._padding: torch.Tensor | None = None  # (batch, position) 0/1 mask, only if some row is padded

    @property
    def route(self) -> list[RouteHop]:
        return [hop.route for hop in self._hops or []]

    async def _open(self) -> None:
        route = await self.sequence.make_route()
        self._hops = [_Hop(hop, InferenceStream(self.sequence.p2p, hop.peer_id)) for hop in route]
        logger.debug("Route: " + " -> ".join(f"{h.peer_id}[{h.start}:{h.end}]" for h in route))

    async def step(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, position: int | None = None
    ) -> torch.Tensor:
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
            await self._open()
        mask = self._session_mask(attention_mask, position, hidden)
        extra = () if mask is None else (mask,)
        for hop in self._hops:
            meta = StepRequest(
                session_id=self.session_id,
                start=hop.route.start,
                end=hop.route.end,
                position=position,
                max_length=self.max_length,
            )
            _, (hidden,) = await hop.stream.step(meta, hidden, *extra, timeout=self.sequence.cfg.request_timeout)
        self.position = position + hidden.shape[1]
        self._padding = mask
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

    def rollback(self, position: int) -> None:
        """Forget tokens from `position` on; the peers crop their caches at the next step."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot roll back to {position}: the session holds {self.position} tokens")
        self.position = position

    async def close(self) -> None:
        for hop in self._hops or []:
            try:
                await hop.stream.close()
            except Exception:  # closing is best effort: the peer frees the cache when the stream drops
                logger.debug(f"Closing the stream to {hop.route.peer_id} failed", exc_info=True)
        self._hops = None
