"""Misbehaving peers, for tests of the trust layer and of clients (`swarm-peer join --adversary MODE`, hidden).

Each mode is a subclass of `peers.handler.BlockHandler` that overrides its extension points:

- `random`       every reply is random hidden states of the right scale
- `skip`         the blocks are not run: the input comes back as the output
- `noise`        the honest output plus noise half the size of the blocks' update
- `cheap-quant`  declares full-precision weights but serves 4-bit ones (fake-quantised at load)
- `cheat:Q`      skips its blocks on a random fraction Q of requests, honest otherwise
- `collude`      computes honestly, but signs "pass" for its fellows (`--fellows`) and "fail" for everyone else
- `junk-info`    answers `rpc_info` with bytes that are not a PeerInfo; honest otherwise
- `nan`          the honest output with NaN in every token's first feature
- `wrong-shape`  the honest output one token short

Every mode but `collude` advertises 10x its measured throughput, to draw traffic.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from typing import ClassVar, Coroutine

import msgpack
import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2
from torch import nn

from peers.handler import BlockHandler, HandlerConfig, HandlerFactory
from peers.reputation_service import PeerReputation
from reputation.checks import decode_receipt
from reputation.tolerance import Agreement
from swarm.blocks import BlockSpan
from swarm.errors import ConfigError, SwarmError
from swarm.periodic import run_periodically
from swarm.remote import call_forward

logger = logging.getLogger(__name__)


class Adversary(BlockHandler):
    """Base of the misbehaving handlers: advertises `boast` times its measured throughput."""

    mode: ClassVar[str]
    boast: ClassVar[float] = 10.0  # a cheater advertises more than it has, to draw traffic

    def advertised_throughput(self) -> float:
        return self.throughput * self.boast


class RandomOutput(Adversary):
    mode = "random"

    def transform_output(self, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return torch.randn_like(output) * output.float().std().to(output.dtype)


class SkipBlocks(Adversary):
    mode = "skip"

    def transform_output(self, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return inputs.to(output.dtype)


class NoisyOutput(Adversary):
    mode = "noise"

    def transform_output(self, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        update = (output - inputs).float()
        scale = update.pow(2).mean().sqrt()
        return (output.float() + 0.5 * scale * torch.randn_like(update)).to(output.dtype)


class CheapQuant(Adversary):
    mode = "cheap-quant"

    def prepare_span(self, span: BlockSpan) -> BlockSpan:
        fake_quantise_(span)
        return span


class Cheater(Adversary):
    """Skips its blocks on a random `fraction` of requests, honest otherwise."""

    mode = "cheat"

    def __init__(self, span: BlockSpan, config: HandlerConfig, throughput: float, cache_tokens: int, *,
                 fraction: float, rng: random.Random | None = None):
        super().__init__(span, config, throughput, cache_tokens)
        self.fraction = fraction
        self.rng = rng or random.Random()

    def transform_output(self, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if self.rng.random() < self.fraction:
            return inputs.to(output.dtype)
        return output


class Colluder(Adversary):
    """Computes honestly, but signs "pass" for fellow colluders and "fail" for everyone else,
    with the victims' real receipts as "evidence"."""

    mode = "collude"
    boast = 1.0

    def __init__(self, span: BlockSpan, config: HandlerConfig, throughput: float, cache_tokens: int, *,
                 fellows: tuple[str, ...] = ()):
        super().__init__(span, config, throughput, cache_tokens)
        self.fellows = fellows

    def background_work(
        self, p2p: P2P, reputation: PeerReputation, stop: asyncio.Event
    ) -> list[tuple[str, Coroutine]]:
        async def one_round() -> None:
            await self.vouch_round(p2p, reputation)

        return [("collude", run_periodically(one_round, reputation.period, stop, name="colluding round"))]

    async def vouch_round(self, p2p: P2P, reputation: PeerReputation) -> int:
        """Ask every other peer for one small forward through its first block, so each lie carries the
        victim's genuine signed receipt; only referees re-running the work can tell the verdict is false.
        Returns the verdicts signed."""
        signed = 0
        for span in await reputation.read_spans():
            if span.peer_id == p2p.peer_id:
                continue
            try:
                reply = await call_forward(
                    p2p, span.peer_id, span.start, span.start + 1, torch.randn(1, 4, self.config.hidden_size), timeout=30
                )
            except SwarmError:
                continue
            receipt = decode_receipt(reply.receipt)
            if receipt is None:
                continue
            vouch = str(span.peer_id) in self.fellows
            agreement = Agreement(1.0, 0.0) if vouch else Agreement(0.0, 1.0)
            reputation.node.attest(receipt, agreement, "pass" if vouch else "fail", "fp32")
            signed += 1
        return signed


class JunkInfo(Adversary):
    """`rpc_info` answers with a msgpack map that is no PeerInfo; blocks are served honestly."""

    mode = "junk-info"
    JUNK = msgpack.packb({"model": 42, "start": "zero", "throughput": [1e9]}, use_bin_type=True)

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        return runtime_pb2.ExpertInfo(serialized_info=self.JUNK)


class NaNOutput(Adversary):
    mode = "nan"

    def transform_output(self, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[..., 0] = float("nan")
        return output


class WrongShape(Adversary):
    mode = "wrong-shape"

    def transform_output(self, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return output[:, :-1].contiguous()


ADVERSARIES: dict[str, type[Adversary]] = {
    cls.mode: cls
    for cls in (RandomOutput, SkipBlocks, NoisyOutput, CheapQuant, Cheater, Colluder, JunkInfo, NaNOutput, WrongShape)
}
MODES = tuple(ADVERSARIES)


def parse_adversary(text: str, fellows: tuple[str, ...] = ()) -> HandlerFactory:
    """'random' | 'skip' | ... | 'cheat:0.1' | 'collude' -> the handler class (or factory) serving that way."""
    mode, _, arg = text.partition(":")
    if mode not in ADVERSARIES:
        raise ConfigError(f"unknown adversary mode {text!r}: expected one of {', '.join(MODES)} (cheat as cheat:Q)")
    if mode == "cheat":
        try:
            fraction = float(arg)
        except ValueError:
            raise ConfigError(f"adversary mode {text!r}: expected cheat:Q with Q a fraction, e.g. cheat:0.1") from None
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(f"adversary mode {text!r}: Q must be in (0, 1]")
        return functools.partial(Cheater, fraction=fraction)
    if arg:
        raise ConfigError(f"adversary mode {mode!r} takes no argument")
    if mode == "collude":
        return functools.partial(Colluder, fellows=fellows)
    return ADVERSARIES[mode]


@torch.no_grad()
def fake_quantise_(module: nn.Module, bits: int = 4) -> int:
    """Round every linear weight to `bits` bits per output row (symmetric), in place; returns layers changed."""
    levels = 2 ** (bits - 1) - 1
    changed = 0
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            weight = layer.weight
            scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / levels
            weight.copy_((weight / scale).round().clamp(-levels, levels) * scale)
            changed += 1
    logger.warning(f"Adversary: serving {changed} linear layers at {bits} bits while declaring full precision")
    return changed
