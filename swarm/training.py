"""Training through the swarm: a fault-tolerant remote autograd function over the model's blocks.

The forward runs the hidden states through a route of peers (`rpc_train` "forward"), keeping each hop's input
on the client; each peer keeps its forward's autograd graph a while, so the backward does not recompute it. The backward sends each hop, in reverse, its input and the gradient of its output;
the peer uses its kept graph, or recomputes its forward under autograd (having dropped it, or being another
peer), and returns the gradient of the input (and of the deep prompts of its blocks). A hop that fails in the forward is routed around from its first block on; one that fails in the
backward is replaced by another route over its blocks, whose forward is re-run from the saved input first when
that route has more than one hop (so that each new hop has its own input). Peers keep nothing between calls.

Only hidden states, their gradients, the attention mask and the deep prompts leave the client: token ids,
labels and the loss never do.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import Callable

import torch

from swarm.errors import PeerError
from swarm.hooks import TrainingObserver, TrainRecord
from swarm.protocol import TrainRequest
from swarm.routing import RouteHop
from swarm.sequence import RemoteSequence
from swarm.transport import TrainResult, Transport

logger = logging.getLogger(__name__)

MAX_FAILOVERS = 5  # replacements of failed hops in one pass, before it gives up


@dataclass
class HopInput:
    """A hop of the forward route and the hidden states it received (what its backward needs)."""

    hop: RouteHop
    inputs: torch.Tensor
    forward_id: str = ""  # the forward request the peer may have kept the graph of


class RemoteBlocks:
    """Training passes over blocks [0, num_blocks) of the swarm, with fail-over."""

    def __init__(self, sequence: RemoteSequence, transport: Transport, timeout: float = 60.0,
                 observer: TrainingObserver | None = None):
        self.sequence, self.transport, self.timeout, self.observer = sequence, transport, timeout, observer
        self.failovers = 0  # hops replaced, in forward or backward passes
        self.last_records: list[HopInput] = []  # the hops of the latest `RemoteBlocksFunction` forward, all micro-batches

    async def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None, prompts: torch.Tensor | None,
                      start: int = 0, end: int | None = None) -> tuple[torch.Tensor, list[HopInput]]:
        """`hidden` through blocks [start, end); the output and each hop's input."""
        end = self.sequence.num_blocks if end is None else end
        records: list[HopInput] = []
        position, failures = start, 0
        while position < end:
            route = await self.sequence.make_route(position, end, training=True)
            for hop in route:
                request_id = uuid.uuid4().hex
                try:
                    result = await self._call("forward", hop, [hidden], mask, prompts, [hidden.shape],
                                              request_id=request_id, keep=True)
                except PeerError as e:
                    failures = self._failed(hop, e, failures)
                    break
                records.append(HopInput(hop, hidden, request_id))
                hidden, position = result.tensors[0], hop.end
        return hidden, records

    async def backward(self, records: list[HopInput], grad: torch.Tensor, mask: torch.Tensor | None,
                       prompts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The gradient of the first hop's input, and of `prompts` (num_blocks, length, hidden) if given, from
        the gradient `grad` of the last hop's output."""
        grad_prompts = None if prompts is None else torch.zeros_like(prompts)
        failures = 0
        pending = list(records)
        while pending:
            record = pending.pop()
            hop = record.hop
            shapes = [record.inputs.shape] + ([] if prompts is None else [prompts[hop.start:hop.end].shape])
            try:
                result = await self._call("backward", hop, [record.inputs, grad], mask, prompts, shapes,
                                          forward_id=record.forward_id)
            except PeerError as e:
                failures = self._failed(hop, e, failures)
                # another route over the hop's blocks, its hops' inputs re-computed from the saved input
                _, replacement = await self.forward(record.inputs, mask, prompts, hop.start, hop.end)
                pending.extend(replacement)
                continue
            grad = result.tensors[0]
            if grad_prompts is not None:
                grad_prompts[hop.start:hop.end] += result.tensors[1]
        return grad, grad_prompts

    def _failed(self, hop: RouteHop, error: PeerError, failures: int) -> int:
        failures += 1
        self.failovers += 1
        logger.warning(f"Training pass: peer {hop.peer_id} failed on blocks {hop.start}:{hop.end} ({error}); "
                       f"routing around it")
        self.sequence.ban(hop.peer_id)
        if failures > MAX_FAILOVERS:
            raise error
        return failures

    async def _call(self, kind: str, hop: RouteHop, tensors: list[torch.Tensor], mask: torch.Tensor | None,
                    prompts: torch.Tensor | None, shapes: list[torch.Size], request_id: str = "", keep: bool = False,
                    forward_id: str = "") -> TrainResult:
        meta, result = await call_hop(self.transport, kind, hop, tensors, mask, prompts, shapes, self.timeout,
                                      request_id, keep, forward_id)
        if self.observer is not None:
            self.observer.on_train_reply(TrainRecord(
                kind, hop.peer_id, hop.start, hop.end, meta.request_id, tensors[0],
                tensors[1] if kind == "backward" else None, mask,
                None if prompts is None else prompts[hop.start:hop.end], result.tensors, result.receipt))
        return result


async def call_hop(transport: Transport, kind: str, hop: RouteHop, tensors: list[torch.Tensor],
                   mask: torch.Tensor | None, prompts: torch.Tensor | None, shapes: list[torch.Size],
                   timeout: float = 60.0, request_id: str = "", keep: bool = False,
                   forward_id: str = "", offset: int = 0) -> tuple[TrainRequest, TrainResult]:
    """One training call to a hop; `prompts` are deep prompts of blocks from `offset` on (the hop gets its own)."""
    extra = ([] if mask is None else [mask]) + (
        [] if prompts is None else [prompts[hop.start - offset:hop.end - offset]])
    meta = TrainRequest(kind=kind, request_id=request_id or uuid.uuid4().hex, start=hop.start, end=hop.end,
                        tensors=len(tensors) + len(extra), mask=mask is not None, prompts=prompts is not None,
                        keep=keep, forward_id=forward_id)
    return meta, await transport.train(hop.peer_id, meta, [*tensors, *extra], shapes, timeout=timeout)


async def forward_on_route(transport: Transport, route: list[RouteHop], inputs: torch.Tensor,
                           mask: torch.Tensor | None, prompts: torch.Tensor | None, timeout: float = 60.0
                           ) -> torch.Tensor:
    """A training forward over `route`'s blocks from `inputs`, no fail-over, nothing kept: the last hop's output.
    For spot checks. Raises the transport's `PeerError`s. `prompts`: those of the route's blocks."""
    hidden = inputs
    for hop in route:
        _, result = await call_hop(transport, "forward", hop, [hidden], mask, prompts, [hidden.shape], timeout,
                                   offset=route[0].start)
        hidden = result.tensors[0]
    return hidden


async def backward_on_route(transport: Transport, route: list[RouteHop], inputs: torch.Tensor, grad: torch.Tensor,
                            mask: torch.Tensor | None, prompts: torch.Tensor | None,
                            timeout: float = 60.0) -> tuple[list[TrainResult], torch.Tensor]:
    """A backward over `route`'s blocks from `inputs` (the first hop's input) and `grad` (the gradient of the
    last hop's output), no fail-over: each hop's backward result, and the gradient of `inputs`. For spot checks.
    Raises the transport's `PeerError`s. `prompts`: those of the route's blocks."""
    offset = route[0].start
    hop_inputs, ids, hidden = [], [], inputs
    for hop in route[:-1]:  # each later hop's input
        request_id = uuid.uuid4().hex
        _, result = await call_hop(transport, "forward", hop, [hidden], mask, prompts, [hidden.shape], timeout,
                                   request_id, keep=True, offset=offset)
        hop_inputs.append(hidden)
        ids.append(request_id)
        hidden = result.tensors[0]
    hop_inputs.append(hidden)
    ids.append("")
    results: list[TrainResult] = []
    for hop, hop_input, forward_id in reversed(list(zip(route, hop_inputs, ids))):
        shapes = [hop_input.shape] + ([] if prompts is None else [prompts[hop.start - offset:hop.end - offset].shape])
        _, result = await call_hop(transport, "backward", hop, [hop_input, grad], mask, prompts, shapes, timeout,
                                   forward_id=forward_id, offset=offset)
        results.insert(0, result)
        grad = result.tensors[0]
    return results, grad


def micro_batch_rows(batch: int, micro_batches: int) -> list[slice]:
    """Rows of each micro-batch: `micro_batches` near-equal parts of `batch` rows (fewer if there are fewer rows)."""
    parts = max(1, min(micro_batches, batch))
    bounds = [round(i * batch / parts) for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


async def pipelined_forward(blocks: RemoteBlocks, hidden: torch.Tensor, mask: torch.Tensor | None,
                            prompts: torch.Tensor | None, micro_batches: int
                            ) -> tuple[torch.Tensor, list[tuple[slice, list[HopInput]]]]:
    """The forward in micro-batches sent together: while a peer computes one micro-batch, the peer before it
    computes the next. The output, and each micro-batch's rows and hop inputs."""
    rows = micro_batch_rows(hidden.shape[0], micro_batches)
    runs = await asyncio.gather(*(blocks.forward(hidden[r], None if mask is None else mask[r], prompts)
                                  for r in rows))
    return torch.cat([output for output, _ in runs]), [(r, records) for r, (_, records) in zip(rows, runs)]


async def pipelined_backward(blocks: RemoteBlocks, parts: list[tuple[slice, list[HopInput]]], grad: torch.Tensor,
                             mask: torch.Tensor | None, prompts: torch.Tensor | None
                             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The backward of `pipelined_forward`'s micro-batches, sent together: the gradient of the input (rows in
    order) and of the deep prompts (summed over micro-batches)."""
    runs = await asyncio.gather(*(blocks.backward(records, grad[r].contiguous(), None if mask is None else mask[r],
                                                  prompts) for r, records in parts))
    grad_prompts = None if prompts is None else torch.stack([g for _, g in runs]).sum(0)
    return torch.cat([g for g, _ in runs]), grad_prompts


class RemoteBlocksFunction(torch.autograd.Function):
    """autograd over the swarm: `apply(hidden, prompts, blocks, run, mask, micro_batches)` with `run(coroutine)`
    running on the client's event loop; `prompts` is an empty tensor when there are no deep prompts."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, prompts: torch.Tensor, blocks: RemoteBlocks,
                run: Callable, mask: torch.Tensor | None, micro_batches: int = 1) -> torch.Tensor:
        deep = prompts.detach() if prompts.numel() else None
        output, parts = run(pipelined_forward(blocks, hidden.detach(), mask, deep, micro_batches))
        blocks.last_records = [record for _, records in parts for record in records]
        ctx.blocks, ctx.run, ctx.mask, ctx.parts, ctx.deep = blocks, run, mask, parts, deep
        ctx.prompts_shape = prompts.shape
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad, grad_prompts = ctx.run(pipelined_backward(ctx.blocks, ctx.parts, grad_output, ctx.mask, ctx.deep))
        if grad_prompts is None:
            grad_prompts = torch.zeros(ctx.prompts_shape)
        return grad, grad_prompts, None, None, None, None
