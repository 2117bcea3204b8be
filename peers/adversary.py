"""Misbehaving peers, for testing the trust layer (`swarm-peer join --adversary MODE`, hidden from help).

Modes:
- `random`       every reply is random hidden states of the right scale
- `skip`         the blocks are not run: the input comes back as the output
- `noise`        the honest output plus noise half the size of the blocks' update
- `cheap-quant`  declares full-precision weights but serves 4-bit ones (fake-quantised at load)
- `cheat:Q`      skips its blocks on a random fraction Q of requests, honest otherwise
- `collude`      computes honestly, but signs "pass" for its fellows (`--fellows`) and "fail" for everyone else
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch
from torch import nn

from swarm.errors import ConfigError

logger = logging.getLogger(__name__)

MODES = ("random", "skip", "noise", "cheap-quant", "cheat", "collude")


@dataclass(frozen=True)
class Adversary:
    mode: str
    fraction: float = 1.0  # share of requests corrupted (cheat:Q); 1 for the always-on modes
    fellows: tuple[str, ...] = ()  # peer ids a colluder vouches for

    @property
    def corrupts_outputs(self) -> bool:
        return self.mode in ("random", "skip", "noise", "cheat")


def parse_adversary(text: str, fellows: tuple[str, ...] = ()) -> Adversary:
    """'random' | 'skip' | 'noise' | 'cheap-quant' | 'cheat:0.1' | 'collude' -> Adversary."""
    mode, _, arg = text.partition(":")
    if mode not in MODES:
        raise ConfigError(f"unknown adversary mode {text!r}: expected one of {', '.join(MODES)} (cheat as cheat:Q)")
    if mode == "cheat":
        try:
            fraction = float(arg)
        except ValueError:
            raise ConfigError(f"adversary mode {text!r}: expected cheat:Q with Q a fraction, e.g. cheat:0.1") from None
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(f"adversary mode {text!r}: Q must be in (0, 1]")
        return Adversary(mode, fraction, fellows)
    if arg:
        raise ConfigError(f"adversary mode {mode!r} takes no argument")
    return Adversary(mode, 1.0, fellows)


def corrupt(adversary: Adversary, inputs: torch.Tensor, output: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """What this adversary returns instead of `output`, the honest result of its blocks on `inputs`."""
    if adversary.mode == "random":
        return torch.randn_like(output) * output.float().std().to(output.dtype)
    if adversary.mode == "skip":
        return inputs.to(output.dtype)
    if adversary.mode == "noise":
        update = (output - inputs).float()
        scale = update.pow(2).mean().sqrt()
        return (output.float() + 0.5 * scale * torch.randn_like(update)).to(output.dtype)
    if adversary.mode == "cheat" and rng.random() < adversary.fraction:
        return inputs.to(output.dtype)
    return output


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


async def collude_loop(node, p2p, read_spans, fellows: tuple[str, ...], hidden_size: int, period: float, stop) -> None:
    """Sign "pass" for fellow colluders and "fail" for everyone else, with real receipts as "evidence".

    Each round asks every other peer for one small forward through its first block, so each lie carries the
    victim's genuine signed receipt; only referees re-running the work can tell the verdict is false.
    """
    import asyncio

    from reputation.checks import decode_receipt
    from reputation.tolerance import Agreement
    from swarm.errors import SwarmError
    from swarm.remote import call_forward

    while not stop.is_set():
        for span in await read_spans():
            if span.peer_id == p2p.peer_id:
                continue
            try:
                text = (await call_forward(
                    p2p, span.peer_id, span.start, span.start + 1, torch.randn(1, 4, hidden_size), timeout=30
                )).receipt
            except SwarmError:
                continue
            receipt = decode_receipt(text)
            if receipt is None:
                continue
            vouch = str(span.peer_id) in fellows
            agreement = Agreement(1.0, 0.0) if vouch else Agreement(0.0, 1.0)
            node.attest(receipt, agreement, "pass" if vouch else "fail", "fp32")
        try:
            await asyncio.wait_for(stop.wait(), timeout=period)
        except asyncio.TimeoutError:
            pass
