"""The typed hooks through which a trust layer plugs into the client from outside.

The core never imports a trust layer. An entry point (or `swarm.plugins` for the Python API's default)
passes a `TrustLayerFactory`; the client calls it with a `ClientContext` and gets back a `TrustLayer`,
whose `trust` view keeps blacklisted peers out of routes and whose `observer` sees every step a session
sends to a peer. The reputation package's `ClientTrust` is one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from hivemind import DHT
from hivemind.p2p import P2P, PeerID

from swarm.config import ClientConfig
from swarm.network import Identity
from swarm.records import PeerSpan
from swarm.transport import Transport


class TrustView(Protocol):
    """What routing needs from the trust layer."""

    def is_blacklisted(self, peer_id: str) -> bool: ...


@dataclass(frozen=True)
class StepRecord:
    """One step as a hop served it: what an observer (the trust layer's spot checker) gets to see."""

    session_id: str
    peer_id: PeerID
    start: int
    end: int
    position: int  # tokens the hop held before this step
    inputs: torch.Tensor  # this step's hidden states into the hop (batch, new, hidden)
    output: torch.Tensor  # what the hop returned
    history: tuple[torch.Tensor, ...]  # every input the hop received so far, this step's last
    padded: bool  # some row of the batch is padded (the step depends on the attention mask)
    receipt: str  # the peer's signed receipt, base64, or ""


class StepObserver(Protocol):
    def on_step(self, record: StepRecord) -> None:
        """Called on the client's loop after each hop's reply; must not block."""

    def on_close(self, session_id: str) -> None: ...

    async def settle(self, session_id: str) -> None:
        """Wait until what the observer does about this session's steps so far is done."""


class SwarmView(Protocol):
    """Who serves what, as the client sees it (`swarm.sequence.RemoteSequence` is one)."""

    @property
    def spans(self) -> list[PeerSpan]: ...

    async def refresh_spans(self, force: bool = False) -> list[PeerSpan]: ...

    def banned(self) -> frozenset[PeerID]: ...


@dataclass(frozen=True)
class ClientContext:
    """What a trust layer gets from the client it plugs into."""

    transport: Transport
    swarm: SwarmView
    identity: Identity
    p2p: P2P  # for the trust layer's own RPCs (gossip)
    dht: DHT
    config: ClientConfig


class TrustLayer(Protocol):
    trust: TrustView
    observer: StepObserver

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def describe(self) -> str:
        """A few lines for `/trust`: checks run, and each peer's standing."""


TrustLayerFactory = Callable[[ClientContext], TrustLayer]
