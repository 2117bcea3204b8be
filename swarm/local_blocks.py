"""Blocks the client loads itself, on demand and within a memory budget, to verify hops nobody else can.

Where no other peer serves a hop's blocks, a spot check has no route to re-run them on. A client with memory
to spare can run them itself: `LocalBlocks` loads the blocks a check needs from the model's block cache
(one `BlockSpan` per block), keeps the most recently used ones while they fit in `budget_bytes`, and drops
the least recently used ones to make room. A hop whose blocks are together larger than the budget is not
verified here. The client's own execution is the reference it trusts most, so the checker compares the
peer's output to it under the calibrated tolerance for the pair of configurations (`reputation.checks`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Callable

import torch
from transformers import PretrainedConfig

from swarm.blocks import BlockSpan, SpanInput

logger = logging.getLogger(__name__)


class LocalBlocks:
    """Run blocks [start, end) of the model in this process; loads at most `budget_bytes` of block weights."""

    def __init__(
        self,
        config: PretrainedConfig,
        load_state: Callable[[int], dict[str, torch.Tensor]],
        block_nbytes: Callable[[int], int],
        budget_bytes: int,
        dtype: torch.dtype = torch.float32,
        stored_dtype: torch.dtype = torch.float32,  # what the block cache holds (`Manifest.torch_dtype`)
    ):
        self.config, self.load_state, self.block_nbytes = config, load_state, block_nbytes
        self.budget_bytes, self.dtype = budget_bytes, dtype
        self._scale = torch.finfo(dtype).bits / torch.finfo(stored_dtype).bits
        self._loaded: OrderedDict[int, BlockSpan] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()  # checks run in worker threads

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def nbytes(self, start: int, end: int) -> int:
        """Bytes of blocks [start, end) once loaded in this client's dtype."""
        return int(sum(self.block_nbytes(index) for index in range(start, end)) * self._scale)

    def fits(self, start: int, end: int) -> bool:
        return 0 < self.nbytes(start, end) <= self.budget_bytes

    @property
    def loaded_blocks(self) -> list[int]:
        return list(self._loaded)

    @property
    def loaded_bytes(self) -> int:
        return sum(self.nbytes(index, index + 1) for index in self._loaded)

    def run(self, start: int, end: int, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
            prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Blocks [start, end) over a whole history `hidden` (batch, tokens, hidden) from position 0, with its
        padding mask (batch, tokens) when the batch is padded and the deep prompts of those blocks (end - start,
        prompt_length, hidden) when the session has some; returns the output for every token."""
        if not self.fits(start, end):
            raise ValueError(f"blocks {start}:{end} ({self.nbytes(start, end) / 2**20:.0f} MiB) do not fit in "
                             f"this client's budget for local blocks ({self.budget_bytes / 2**20:.0f} MiB)")
        with self._lock:
            spans = [self._block(index) for index in range(start, end)]
            x = hidden.to(self.dtype)
            for offset, span in enumerate(spans):
                own = None if prompts is None else prompts[offset : offset + 1].to(self.dtype)
                x = span(x, None, SpanInput(attention_mask, 0), prompts=own)
        return x.to(hidden.dtype)

    def _block(self, index: int) -> BlockSpan:
        if index in self._loaded:
            self._loaded.move_to_end(index)
            return self._loaded[index]
        needed = self.nbytes(index, index + 1)
        while self._loaded and self.loaded_bytes + needed > self.budget_bytes:
            dropped, span = self._loaded.popitem(last=False)
            span.release()
            logger.debug(f"Local blocks: dropped block {dropped} to make room")
        began = time.perf_counter()
        span = BlockSpan(self.config, index, index + 1)
        span.load_blocks(lambda i: {k: v.to(self.dtype) for k, v in self.load_state(i).items()})
        self._loaded[index] = span.eval()
        logger.info(f"Loaded block {index} locally to verify the peers serving it "
                    f"({needed / 2**20:.0f} MiB, {time.perf_counter() - began:.1f} s)")
        return span
