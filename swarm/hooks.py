"""The typed hooks through which a trust layer plugs into the client from outside.

The core never imports a trust layer. An entry point (or `swarm.plugins` for the Python API's default)
passes a `TrustLayerFactory`; the client calls it with a `ClientContext` and gets back a `TrustLayer`,
whose `trust` view keeps blacklisted peers out of routes, whose `verifier` vets every hop's reply (its
signed receipt) before a session uses it, and whose `observer` sees every step a session sends to a peer
and says how much of an answer its checks verified (`Coverage`). The reputation package's `ClientTrust`
is one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from hivemind import DHT
from hivemind.p2p import P2P, PeerID

from swarm.config import ClientConfig
from swarm.local_blocks import LocalBlocks
from swarm.network import Identity
from swarm.protocol import StepRequest
from swarm.records import PeerSpan
from swarm.transport import Reply, Transport


class TrustView(Protocol):
    """What routing needs from the trust layer."""

    def is_blacklisted(self, peer_id: str) -> bool: ...

    def avoids(self, peer_id: str) -> bool:
        """Whether routes leave the peer out and sessions move off it: blacklisted, or otherwise not to be used."""

    def score(self, peer_id: str) -> float:
        """Relative trust (1.0 = average; newcomers start near 0)."""


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
    mask: torch.Tensor | None = None  # the session's 0/1 attention mask (batch, position + new) when padded
    sent: int = 0  # batch x tokens this hop's stream carried so far, replays included (what its receipts may claim)
    prompts: torch.Tensor | None = None  # the hop's blocks' deep prompts (end - start, prompt_length, hidden) when the
    # session has some: a re-run of `history` must add them; this step carried them only if `position` is below
    # prompt_length (`carried_prompts`)

    @property
    def carried_prompts(self) -> torch.Tensor | None:
        """The deep prompts this step carried (its receipt commits to them), or None."""
        return self.prompts if self.prompts is not None and self.position < self.prompts.shape[1] else None


@dataclass(frozen=True)
class Coverage:
    """How much of some hop-steps (one hop's reply to one step) spot checks verified.

    Every hop-step is in exactly one of: verified (a check ran and the step passed), failed, unverifiable
    (a check was chosen but could not run: nobody else to run it, an error, no verdict), pending (its check
    is still running) or unchecked (not chosen). Only verified ones count towards `coverage`.
    """

    steps: int = 0
    verified: int = 0
    failed: int = 0
    unverifiable: int = 0
    pending: int = 0

    @property
    def unchecked(self) -> int:
        return self.steps - self.verified - self.failed - self.unverifiable - self.pending

    @property
    def coverage(self) -> float:
        """The share of the steps verified (1.0 when there were none)."""
        return self.verified / self.steps if self.steps else 1.0

    @property
    def complete(self) -> bool:
        return self.verified == self.steps


class StepObserver(Protocol):
    def on_step(self, record: StepRecord) -> None:
        """Called on the client's loop after each hop's reply; must not block."""

    def on_close(self, session_id: str) -> None: ...

    async def settle(self, session_id: str) -> None:
        """Wait until what the observer does about this session's steps so far is done."""

    def coverage(self, session_id: str, since: int = 0) -> Coverage:
        """The verification of this session's hop-steps at positions `since` and later (steps sent again
        after a rollback replace the ones they redo)."""


@dataclass(frozen=True)
class HopStep:
    """One step as the client sent it to one hop's stream: what the reply's receipt must match."""

    peer_id: PeerID
    request: StepRequest  # the session, blocks and position asked for
    step: int  # steps this stream answered before this one (the peer's count of them)
    tokens: int  # batch x tokens sent on this stream so far, this step's included (the most a receipt may claim)
    prompts: torch.Tensor | None = None  # the deep prompts the step carried (the receipt commits to them)


class ReplyVerifier(Protocol):
    def verify(self, sent: HopStep, inputs: torch.Tensor, reply: Reply) -> None:
        """Raise `swarm.errors.BadReceiptError` naming `sent.peer_id` unless `reply` carries a valid receipt
        for exactly this step; called on the client's loop for every hop's reply, before it is used."""


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
    logits: Callable[[torch.Tensor], torch.Tensor] | None = None  # the client's final norm + LM head: hidden states
    # after the last block (batch, tokens, hidden) -> logits (batch, tokens, vocab), to see what a hop does to the answer
    num_blocks: int | None = None  # the model's block count (a hop ending there feeds the LM head)
    local_blocks: LocalBlocks | None = None  # blocks the client may load to check hops nobody else serves


@dataclass(frozen=True)
class TrainRecord:
    """One hop's reply to a training pass (`swarm.training`), as the client received it."""

    kind: str  # "forward" or "backward"
    peer_id: PeerID
    start: int
    end: int
    request_id: str
    inputs: torch.Tensor  # the hop's input hidden states (batch, tokens, hidden)
    grad_output: torch.Tensor | None  # for a backward: the gradient of the hop's output
    mask: torch.Tensor | None
    prompts: torch.Tensor | None  # the hop's blocks' deep prompts, if any
    outputs: list[torch.Tensor]  # the reply: the output, or the input's (and the prompts') gradients
    receipt: str  # base64 of the peer's signed receipt, or ""


class TrainingObserver(Protocol):
    def on_train_reply(self, record: TrainRecord) -> None:
        """Called on the client's loop for every training reply, before it is used; raises
        `swarm.errors.BadReceiptError` naming the peer to refuse it (the pass then routes around the peer)."""


class TrustLayer(Protocol):
    trust: TrustView
    observer: StepObserver
    verifier: ReplyVerifier
    training: TrainingObserver  # receipts, credit and spot checks of training passes

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def describe(self) -> str:
        """A few lines for `/trust`: checks run, and each peer's standing."""


TrustLayerFactory = Callable[[ClientContext], TrustLayer]
