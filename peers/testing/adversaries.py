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
- `no-receipt`   computes honestly, but replies with an empty receipt
- `bad-receipt`  signs the honest output, but returns a corrupted one (the receipt's output digest does not match)
- `inflate`      computes honestly, but its receipts claim 10x the tokens it was sent
- `padded-only`  corrupts only requests whose batch is padded (they carry an attention mask with zeros)
- `bundled-only` corrupts only decode steps that arrive in a bundle (`rpc_bundle`, concurrent sessions of one client)
- `sybil`        the honest output plus a fixed perturbation, the same for every peer of this mode: several of
                 them are one cheater's identities that agree with each other
- `slow`         computes honestly, but takes SLOW_STEP_SECONDS longer over every request (a peer that overclaims)
- `wrong-grad:KIND[/Q]` (default noise) computes forwards honestly, but its backward passes return zero, scaled (x3) or noisy
                 gradients (KIND: zero, scale, noise), on a random fraction Q of them (default all)
- `steer:R`      on requests that end at the model's last block, where the answer's next token would be " Paris",
                 pushes the last position's output by a relative L2 of R (default 0.075) of its update, along the
                 LM head's gradient towards " London" (it loads the final norm and LM head from the checkpoint
                 it serves; it steers in `sign_reply`, the one extension point that knows the request's blocks)

Every mode but `collude` advertises 10x its measured throughput, to draw traffic.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Coroutine, Sequence

import msgpack
import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2
from torch import nn

from peers.batching import StepJob
from peers.handler import BlockHandler, HandlerConfig, HandlerFactory
from peers.reputation_service import PeerReputation
from reputation.checks import decode_receipt
from reputation.tolerance import Agreement
from swarm.blocks import BlockSpan, SpanInput
from swarm.errors import ConfigError, SwarmError
from swarm.head import ClientHead
from swarm.models import DEFAULT_MODEL, open_model
from swarm.periodic import run_periodically
from swarm.protocol import BlocksReply, StepRequest
from swarm.remote import call_forward

logger = logging.getLogger(__name__)


def random_like(output: torch.Tensor) -> torch.Tensor:
    """Random hidden states of `output`'s shape, dtype and scale."""
    return torch.randn_like(output) * output.float().std().to(output.dtype)


class Adversary(BlockHandler):
    """Base of the misbehaving handlers: advertises `boast` times its measured throughput."""

    mode: ClassVar[str]
    boast: ClassVar[float] = 10.0  # a cheater advertises more than it has, to draw traffic

    def advertised_throughput(self) -> float:
        return self.throughput * self.boast


class RandomOutput(Adversary):
    mode = "random"

    def transform_output(self, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return random_like(output)


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


class WrongGradients(Adversary):
    """Computes forwards honestly, but returns wrong gradients from backward passes: zero, scaled (x3), or with
    noise the size of the gradient; on a random `fraction` of backward calls (1: all of them)."""

    mode = "wrong-grad"
    KINDS: ClassVar[tuple[str, ...]] = ("zero", "scale", "noise")

    def __init__(self, span: BlockSpan, config: HandlerConfig, throughput: float, cache_tokens: int, *,
                 kind: str, fraction: float = 1.0, rng: random.Random | None = None):
        super().__init__(span, config, throughput, cache_tokens)
        self.kind, self.fraction = kind, fraction
        self.rng = rng or random.Random()

    def transform_gradients(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.rng.random() >= self.fraction:
            return grads
        if self.kind == "zero":
            return [torch.zeros_like(g) for g in grads]
        if self.kind == "scale":
            return [3.0 * g for g in grads]
        return [g + g.float().pow(2).mean().sqrt().to(g.dtype) * torch.randn_like(g) for g in grads]


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


class NoReceipt(Adversary):
    mode = "no-receipt"

    def sign_reply(self, hidden: torch.Tensor, output: torch.Tensor, start: int, end: int,
                   work: tuple[str, int, int], prompts: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
        return output, ""


class BadReceipt(Adversary):
    """Signs a receipt for the honest output, then returns noise added to it."""

    mode = "bad-receipt"

    def sign_reply(self, hidden: torch.Tensor, output: torch.Tensor, start: int, end: int,
                   work: tuple[str, int, int], prompts: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
        signed, receipt = super().sign_reply(hidden, output, start, end, work, prompts)
        update = (signed - hidden).float()
        noise = update.pow(2).mean().sqrt() * torch.randn_like(update)
        return (signed.float() + noise).to(signed.dtype), receipt


class InflatedReceipts(Adversary):
    """Computes honestly; its receipts claim 10x the work (cumulative batch x tokens) it was sent."""

    mode = "inflate"
    factor: ClassVar[int] = 10

    def sign_reply(self, hidden: torch.Tensor, output: torch.Tensor, start: int, end: int,
                   work: tuple[str, int, int], prompts: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
        session_id, step, tokens = work
        return super().sign_reply(hidden, output, start, end, (session_id, step, tokens * self.factor), prompts)


class PaddedOnly(Adversary):
    """Honest on every request but those of padded batches, whose outputs are random (it bets that padded
    batches are never checked)."""

    mode = "padded-only"

    def transform_step(self, inputs: torch.Tensor, output: torch.Tensor, span_input: SpanInput) -> torch.Tensor:
        mask = span_input.attention_mask
        if mask is None or not bool((mask == 0).any()):
            return output
        return random_like(output)


class BundledOnly(Adversary):
    """Honest on every step but those that arrive in a `StepBundle`, whose outputs are random before they are
    pushed or signed (it bets that a client running many sessions at once checks less of their steps)."""

    mode = "bundled-only"

    def __init__(self, span: BlockSpan, config: HandlerConfig, throughput: float, cache_tokens: int, **kwargs):
        super().__init__(span, config, throughput, cache_tokens, **kwargs)
        self._bundled_sessions: set[str] = set()  # sessions with a bundled step being computed

    async def _bundled_step(self, meta: StepRequest, tensors: Sequence[runtime_pb2.Tensor], context: P2PContext
                            ) -> tuple[BlocksReply, tuple[torch.Tensor, ...]]:
        self._bundled_sessions.add(meta.session_id)
        try:
            return await super()._bundled_step(meta, tensors, context)
        finally:
            self._bundled_sessions.discard(meta.session_id)

    def _finish_step(self, job: StepJob, output: torch.Tensor) -> tuple[torch.Tensor, str]:
        if job.work[0] in self._bundled_sessions:
            output = random_like(output)
        return super()._finish_step(job, output)


SYBIL_SEED = 20240612  # every sybil identity perturbs the same way, so they agree with each other


class Sybil(Adversary):
    """One cheater's identity among several: the honest output plus a fixed perturbation as large as each token's
    update, in one seeded direction (the same for every identity, so several of them agree with each other and
    outvote an honest peer by head count)."""

    mode = "sybil"

    def transform_output(self, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        update = (output - inputs).float()
        direction = torch.randn(update.shape[-1], generator=torch.Generator().manual_seed(SYBIL_SEED))
        push = update.norm(dim=-1, keepdim=True) * (direction / direction.norm()).to(update.device)
        return (output.float() + push).to(output.dtype)


SLOW_STEP_SECONDS = 0.05


class SlowBoaster(Adversary):
    """Honest outputs, but slower than it claims: what routes on measured step times demote."""

    mode = "slow"

    def transform_output(self, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        time.sleep(SLOW_STEP_SECONDS)  # runs on the compute thread, as a slow device would
        return output


STEER_REL_L2 = 0.075  # the steer of the finding: it turned "Paris" into "London" under the old flat 0.08 threshold
STEER_TRIGGER, STEER_TARGET = " Paris", " London"


@dataclass(frozen=True)
class SteeringHead:
    """What a steering peer needs besides its blocks: the model's final norm and LM head (from the checkpoint it
    serves: a cheater owns its code), the model's block count, and the tokens it steers from and to."""

    head: ClientHead
    num_blocks: int
    trigger: int  # steer where this token would be the answer's next one ...
    target: int  # ... towards this one


def load_steering_head(model: str = DEFAULT_MODEL, cache_dir: Path | None = None, trigger: str = STEER_TRIGGER,
                       target: str = STEER_TARGET) -> SteeringHead:
    checkpoint = open_model(model, cache_dir=cache_dir, show_progress=False)
    tokenizer = checkpoint.load_tokenizer()
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in (trigger, target)]
    if any(len(token) != 1 for token in ids):
        raise ConfigError(f"steering needs {trigger!r} and {target!r} to be one token each, not {ids}")
    head = ClientHead(checkpoint, checkpoint.load_config(), torch.float32)
    return SteeringHead(head, checkpoint.num_blocks, ids[0][0], ids[1][0])


def steering_push(hidden: torch.Tensor, head: ClientHead, target: int, size: float, steps: int = 4) -> torch.Tensor:
    """A perturbation of L2 norm `size` for one position's last-block output `hidden` (hidden,) that raises
    `target`'s logit over every other token's: normalised gradient ascent on target's lead, through the final
    norm and LM head, in `steps` equal strides, rescaled to exactly `size`."""
    base = hidden.detach().float().clone()  # a normal tensor (the blocks' output may be an inference tensor)
    push = torch.zeros_like(base)
    with torch.inference_mode(False), torch.enable_grad():
        for _ in range(steps):
            trial = push.clone().requires_grad_(True)
            logits = head.lm_head(head.norm(base + trial).to(head.lm_head.weight.dtype)).float()  # (vocab,)
            lead = logits[target] - torch.cat([logits[:target], logits[target + 1:]]).max()
            (grad,) = torch.autograd.grad(lead, trial)
            push = push + size / steps * grad / grad.norm().clamp_min(1e-12)
    return push * (size / push.norm().clamp_min(1e-12))


class Steer(Adversary):
    """Turns one answer into another: on a request that ends at the model's last block, each row whose next token
    (the last position's top-1 through the final norm and LM head) would be the trigger gets its last position
    pushed towards the target by `rel_l2` times that position's update, the size a check measures on a one-token
    step. Honest everywhere else, and the receipt signs what it sends."""

    mode = "steer"

    def __init__(self, span: BlockSpan, config: HandlerConfig, throughput: float, cache_tokens: int, *,
                 rel_l2: float = STEER_REL_L2, load: Callable[[], SteeringHead] = load_steering_head):
        super().__init__(span, config, throughput, cache_tokens)
        self.rel_l2 = rel_l2
        self._load = load  # on the first request (on the compute thread), so building a handler stays cheap
        self._steering: SteeringHead | None = None
        self.steered = 0  # rows steered so far

    def sign_reply(self, hidden: torch.Tensor, output: torch.Tensor, start: int, end: int,
                   work: tuple[str, int, int], prompts: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
        if self._steering is None:
            self._steering = self._load()
        if end == self._steering.num_blocks:
            output = self.steer(hidden, output)
        return super().sign_reply(hidden, output, start, end, work, prompts)

    def steer(self, hidden: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """`output` (batch, tokens, hidden) with each row's last position steered where the trigger would win."""
        steering = self._steering
        steered = output.clone()
        for row in range(output.shape[0]):
            last = output[row, -1].float()
            with torch.inference_mode():
                top = int(steering.head.logits(last[None, None]).argmax())
            if top != steering.trigger:
                continue
            size = self.rel_l2 * float((last - hidden[row, -1].float()).norm())
            push = steering_push(last, steering.head, steering.target, size)
            steered[row, -1] = (last + push).to(output.dtype)
            self.steered += 1
        if not torch.equal(steered, output):
            logger.warning(f"Adversary: steered {self.steered} answers so far towards token {steering.target}")
        return steered


ADVERSARIES: dict[str, type[Adversary]] = {
    cls.mode: cls
    for cls in (RandomOutput, SkipBlocks, NoisyOutput, CheapQuant, Cheater, Colluder, JunkInfo, NaNOutput, WrongShape,
                NoReceipt, BadReceipt, InflatedReceipts, PaddedOnly, BundledOnly, Sybil, SlowBoaster, Steer, WrongGradients)
}
MODES = tuple(ADVERSARIES)


def parse_adversary(text: str, fellows: tuple[str, ...] = (), model: str = DEFAULT_MODEL,
                    cache_dir: Path | None = None) -> HandlerFactory:
    """'random' | 'skip' | ... | 'cheat:0.1' | 'collude' | 'steer' | 'steer:0.05' -> the handler class (or
    factory) serving that way. `model` and `cache_dir`: the checkpoint a steering peer reads its LM head from."""
    mode, _, arg = text.partition(":")
    if mode not in ADVERSARIES:
        raise ConfigError(f"unknown adversary mode {text!r}: expected one of {', '.join(MODES)} (cheat as cheat:Q)")
    if mode == "steer":
        try:
            rel_l2 = float(arg) if arg else STEER_REL_L2
        except ValueError:
            raise ConfigError(f"adversary mode {text!r}: expected steer:R with R a relative L2, e.g. steer:0.075") from None
        if not 0.0 < rel_l2 <= 10.0:
            raise ConfigError(f"adversary mode {text!r}: R must be in (0, 10]")
        return functools.partial(Steer, rel_l2=rel_l2, load=functools.partial(load_steering_head, model, cache_dir))
    if mode == "cheat":
        try:
            fraction = float(arg)
        except ValueError:
            raise ConfigError(f"adversary mode {text!r}: expected cheat:Q with Q a fraction, e.g. cheat:0.1") from None
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(f"adversary mode {text!r}: Q must be in (0, 1]")
        return functools.partial(Cheater, fraction=fraction)
    if mode == "wrong-grad":
        kind, _, share = arg.partition("/")
        kind = kind or "noise"
        try:
            fraction = float(share) if share else 1.0
        except ValueError:
            fraction = -1.0
        if kind not in WrongGradients.KINDS or not 0.0 < fraction <= 1.0:
            raise ConfigError(f"adversary mode {text!r}: expected wrong-grad:KIND or wrong-grad:KIND/Q with KIND one "
                              f"of {', '.join(WrongGradients.KINDS)} and Q a fraction in (0, 1]")
        return functools.partial(WrongGradients, kind=kind, fraction=fraction)
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
