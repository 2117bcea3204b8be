"""The seam between the client and its peers: the calls a client makes to a peer, as a `Protocol`.

Sessions, routing and the trust layer's checks receive a `Transport`; they never build RPC stubs
themselves, so each can be driven by an in-process fake in unit tests. `swarm.remote.HivemindTransport`
is the real one. A transport checks every reply where it arrives: whatever comes back is either a valid
`Reply` (one finite floating-point tensor of the input's shape) or a typed `PeerError` naming the peer
that sent it, so the right peer is blamed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from hivemind.p2p import PeerID

from swarm.errors import BadReplyError
from swarm.protocol import PeerInfo, StepRequest, TrainRequest, all_finite


@dataclass(frozen=True)
class Reply:
    """A peer's valid answer to a forward or a step."""

    output: torch.Tensor  # hidden states, the same shape as the input
    receipt: str = ""  # base64 of the peer's signed receipt, or ""
    length: int = 0  # tokens the session holds after a step
    input_digest: str = ""  # of a pushed step: the digest of the input the peer used (`swarm.protocol.tensor_digest`)


@dataclass(frozen=True)
class TrainResult:
    """A peer's valid answer to a training pass (`swarm.protocol.TrainRequest`)."""

    tensors: list[torch.Tensor]  # the blocks' output, or the gradients of the inputs (and of the deep prompts)
    receipt: str = ""


class PeerStream(Protocol):
    """One open inference stream to a peer: steps go in order, one reply each."""

    peer_id: PeerID

    async def step(self, meta: StepRequest, hidden: torch.Tensor, mask: torch.Tensor | None = None,
                   timeout: float | None = None, prompts: torch.Tensor | None = None) -> Reply:
        """One step; `prompts`: the deep prompts of the step's blocks, sent when `meta.prompts`."""

    async def step_pushed(self, meta: StepRequest, shape: torch.Size, mask: torch.Tensor | None = None,
                          timeout: float | None = None) -> Reply:
        """A step whose input the previous hop pushes to the peer (`meta.pushed`); the reply is checked against
        `shape`, the input's."""

    async def close(self) -> None: ...


class Transport(Protocol):
    """What a client asks of peers (`peers.handler.BlockHandler` answers)."""

    @property
    def peer_id(self) -> PeerID:
        """This client's own id."""

    async def info(self, peer_id: PeerID, timeout: float = 5.0) -> tuple[PeerInfo, float]:
        """The peer's info and the round trip in seconds (the ping)."""

    async def forward(self, peer_id: PeerID, start: int, end: int, hidden: torch.Tensor,
                      timeout: float = 60.0, *, mask: torch.Tensor | None = None,
                      prompts: torch.Tensor | None = None) -> Reply:
        """Hidden states through the peer's blocks [start, end), no state kept; `mask` (batch, tokens) of 0/1
        when some row is left-padded; `prompts` (end - start, prompt_length, hidden): deep prompts, added to the
        first positions at each block's input. One message each way: for inputs of any length use
        `swarm.stateless.run_blocks_chunked`."""

    def open_stream(self, peer_id: PeerID) -> PeerStream:
        """A stream to the peer; it connects on its first step."""

    async def train(self, peer_id: PeerID, meta: TrainRequest, tensors: Sequence[torch.Tensor],
                    expected_shapes: Sequence[torch.Size], timeout: float = 60.0) -> TrainResult:
        """A stateless training pass on the peer's blocks: tensors of any size travel in parts; the reply's
        tensors are checked against `expected_shapes`."""


def check_output(peer_id: PeerID | str, tensors: list[torch.Tensor], expected_shape: torch.Size) -> torch.Tensor:
    """The one output tensor of a reply, or `BadReplyError` blaming `peer_id`."""
    if len(tensors) != 1:
        raise BadReplyError(str(peer_id), f"expected one tensor, got {len(tensors)}")
    output = tensors[0]
    if output.shape != expected_shape:
        raise BadReplyError(str(peer_id), f"output shape {tuple(output.shape)} does not match the input's {tuple(expected_shape)}")
    if not output.is_floating_point():
        raise BadReplyError(str(peer_id), f"output is {output.dtype}, not floating point")
    if not all_finite(output):
        raise BadReplyError(str(peer_id), "output contains NaN or infinity")
    return output
