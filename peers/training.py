"""The peer's side of training through the swarm: `rpc_train`, stateless forward and backward passes.

A client trains prompts (or a head adapter) while peers' weights stay frozen. For a "forward" the peer runs
its blocks on whole sequences; for a "backward" it recomputes that forward under autograd from the inputs the
client sends back, with the gradient of the outputs, and returns the gradient of the inputs (and of the deep
prompts, when the client sent some). Nothing is kept between calls, so any peer serving the blocks can take
any call, and a client whose peer died between its forward and its backward just asks another.

A forward may ask the peer to keep its autograd graph (`keep`), so that the backward naming it (`forward_id`)
need not recompute it (`ForwardGraphs`, bounded; a backward that finds nothing kept recomputes as before).
Requests are validated like the other RPCs; large tensors travel in parts (`swarm.parts`); a peer refuses
requests over `max_train_tokens` (batch x tokens), and a peer started with training off refuses them all.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from swarm.blocks import BlockSpan, SpanInput
from swarm.errors import ProtocolError
from swarm.protocol import TrainRequest

MAX_PROMPT_LENGTH = 512  # tokens of deep prompts per block a request may carry


def request_byte_limit(max_train_tokens: int, hidden_size: int, blocks: int) -> int:
    """The most bytes of tensors a training request may send this peer (float32 on the wire at most)."""
    sequences = 2 * max_train_tokens * hidden_size * 4  # hidden states and their gradient
    prompts = blocks * MAX_PROMPT_LENGTH * hidden_size * 4
    return sequences + max_train_tokens * 8 + prompts + (1 << 20)  # + mask, + serialisation headers


def read_train_tensors(meta: TrainRequest, tensors: list[torch.Tensor], hidden_size: int, max_train_tokens: int
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(hidden, grad_outputs or None, mask or None, prompts or None), each checked; `ProtocolError` otherwise."""
    expected = 1 + (meta.kind == "backward") + meta.mask + meta.prompts
    if len(tensors) != expected or meta.tensors != expected:
        raise ProtocolError(f"a {meta.kind} request with mask={meta.mask}, prompts={meta.prompts} carries "
                            f"{expected} tensors, not {len(tensors)}")
    hidden, rest = tensors[0], list(tensors[1:])
    if hidden.ndim != 3 or hidden.shape[2] != hidden_size or not hidden.is_floating_point():
        raise ProtocolError(f"hidden states must be floating point (batch, tokens, {hidden_size}), "
                            f"got {hidden.dtype} {tuple(hidden.shape)}")
    batch, tokens = hidden.shape[:2]
    if batch < 1 or tokens < 1:
        raise ProtocolError("hidden states need at least one row and one token")
    if batch * tokens > max_train_tokens:
        raise TooManyTokens(f"{batch * tokens} tokens (batch x tokens) exceed this peer's --max-train-tokens "
                            f"{max_train_tokens}")
    grad = rest.pop(0) if meta.kind == "backward" else None
    if grad is not None and (grad.shape != hidden.shape or not grad.is_floating_point()):
        raise ProtocolError(f"the gradient must match the hidden states' shape {tuple(hidden.shape)}, "
                            f"got {tuple(grad.shape)}")
    mask = rest.pop(0) if meta.mask else None
    if mask is not None and (tuple(mask.shape) != (batch, tokens) or not ((mask == 0) | (mask == 1)).all()):
        raise ProtocolError(f"attention mask must be 0/1 of shape ({batch}, {tokens}), got {tuple(mask.shape)}")
    prompts = rest.pop(0) if meta.prompts else None
    if prompts is not None and (prompts.ndim != 3 or prompts.shape[0] != meta.end - meta.start
                                or not 1 <= prompts.shape[1] <= min(tokens, MAX_PROMPT_LENGTH)
                                or prompts.shape[2] != hidden_size or not prompts.is_floating_point()):
        raise ProtocolError(f"deep prompts must be ({meta.end - meta.start}, 1..{min(tokens, MAX_PROMPT_LENGTH)}, "
                            f"{hidden_size}), got {tuple(prompts.shape)}")
    for name, tensor in (("hidden states", hidden), ("gradient", grad), ("deep prompts", prompts)):
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            raise ProtocolError(f"{name} contain NaN or infinity")
    return hidden, grad, mask, prompts


class TooManyTokens(Exception):
    """A training request over the peer's `max_train_tokens`."""


@dataclass
class KeptForward:
    received: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]  # hidden, mask, prompts as received
    inputs: torch.Tensor  # the autograd leaves...
    prompts: torch.Tensor | None
    output: torch.Tensor  # ...and the output whose graph reaches them
    tokens: int
    kept_at: float


class ForwardGraphs:
    """Training forwards kept with their autograd graph, so that their backward need not recompute them. Keyed
    by (client, request id); bounded in tokens and age, least recent dropped first. A backward whose inputs
    differ from what its forward received, or whose forward was dropped, is recomputed (the protocol stays
    stateless: nothing a client sends depends on what is kept). Used from the compute thread only."""

    def __init__(self, max_tokens: int, ttl: float = 120.0, clock: Callable[[], float] = time.monotonic):
        self.max_tokens, self.ttl, self.clock = max_tokens, ttl, clock
        self._kept: OrderedDict[tuple[str, str], KeptForward] = OrderedDict()
        self.hits = self.misses = 0

    def keep(self, key: tuple[str, str], kept: KeptForward) -> None:
        self._kept[key] = kept
        self._trim()

    def take(self, key: tuple[str, str], hidden: torch.Tensor, mask: torch.Tensor | None,
             prompts: torch.Tensor | None) -> KeptForward | None:
        self._trim()
        kept = self._kept.pop(key, None)
        if kept is None or not all(_same(a, b) for a, b in zip(kept.received, (hidden, mask, prompts))):
            self.misses += 1
            return None
        self.hits += 1
        return kept

    @property
    def tokens(self) -> int:
        return sum(k.tokens for k in self._kept.values())

    def _trim(self) -> None:
        now = self.clock()
        while self._kept and (self.tokens > self.max_tokens or now - next(iter(self._kept.values())).kept_at > self.ttl):
            self._kept.popitem(last=False)


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and a.shape == b.shape and torch.equal(a, b))


def train_step(span: BlockSpan, meta: TrainRequest, hidden: torch.Tensor, grad: torch.Tensor | None,
               mask: torch.Tensor | None, prompts: torch.Tensor | None, device: torch.device,
               dtype: torch.dtype, graphs: ForwardGraphs | None = None, client: str = "") -> list[torch.Tensor]:
    """The reply's tensors, on the CPU in the wire dtype of the request: [output] for a forward, [grad of the
    hidden states] (+ [grad of the prompts]) for a backward. A forward asked to `keep` leaves its graph in
    `graphs` for its backward. Runs on the peer's compute thread."""
    wire = hidden.dtype
    span_input = SpanInput(attention_mask=mask, start_position=0)
    if meta.kind == "forward" and not (meta.keep and graphs is not None):
        with torch.no_grad():
            deep = None if prompts is None else prompts.to(device, dtype)
            return [span.forward_train(hidden.to(device, dtype), span_input, meta.start, meta.end, deep).to("cpu", wire)]
    kept = None
    if meta.kind == "backward" and meta.forward_id and graphs is not None:
        kept = graphs.take((client, meta.forward_id), hidden, mask, prompts)
    if kept is None:
        with torch.enable_grad():
            inputs = hidden.to(device, dtype).detach().requires_grad_(True)
            deep = None if prompts is None else prompts.to(device, dtype).detach().requires_grad_(True)
            output = span.forward_train(inputs, span_input, meta.start, meta.end, deep)
        kept = KeptForward((hidden, mask, prompts), inputs, deep, output, hidden.shape[0] * hidden.shape[1],
                           graphs.clock() if graphs is not None else 0.0)
    if meta.kind == "forward":
        graphs.keep((client, meta.request_id), kept)
        return [kept.output.detach().to("cpu", wire)]
    wrt = [kept.inputs] if kept.prompts is None else [kept.inputs, kept.prompts]
    grads = torch.autograd.grad(kept.output, wrt, grad_outputs=grad.to(device, kept.output.dtype))
    return [g.to("cpu", wire) for g in grads]
