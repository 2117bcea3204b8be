"""Memory tiers: block weights live in a lower tier and come into the compute tier one block at a time.

- cpu:  pinned host RAM, for a GPU peer whose GPU memory holds the KV cache and two blocks, not the span.
- disk: the safetensors files (memory-mapped when read), for a peer short of RAM.

Each served layer is wrapped in an `OffloadedLayer`: its module keeps only the shapes (meta tensors); when it
runs it takes its weights from a `Prefetcher`, which has already started fetching them while the layer before
ran, and starts fetching the next layer's (the first layer's after the last one, ready for the next token).
So at most two blocks' weights are in the compute tier at once. The KV cache is not touched: it stays in the
compute tier, within the peer's cache budget.
"""

from __future__ import annotations

import logging
import pathlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import torch
from safetensors.torch import load_file
from torch import nn
from torch.func import functional_call

logger = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


class WeightTier(Protocol):
    def fetch(self, index: int) -> State:
        """Block `index`'s weights, on the compute device, in the compute dtype."""


class DiskTier:
    """Weights stay in safetensors files; each fetch reads one block (converted to the compute dtype)."""

    def __init__(self, files: dict[int, pathlib.Path], dtype: torch.dtype, device: torch.device):
        self.files, self.dtype, self.device = files, dtype, device

    def fetch(self, index: int) -> State:
        state = load_file(self.files[index])
        return {k: v.to(self.device, self.dtype) for k, v in state.items()}


class HostTier:
    """Weights stay in pinned host RAM; each fetch copies one block to the GPU on a side stream."""

    def __init__(self, states: dict[int, State], dtype: torch.dtype, device: torch.device):
        self.device = device
        self.states = {i: {k: v.to(dtype).pin_memory() for k, v in s.items()} for i, s in states.items()}
        self.stream = torch.cuda.Stream(device)

    def fetch(self, index: int) -> State:
        with torch.cuda.stream(self.stream):
            state = {k: v.to(self.device, non_blocking=True) for k, v in self.states[index].items()}
        self.stream.synchronize()  # in the prefetch thread: the compute stream never waits on it
        return state


class Prefetcher:
    """Fetches blocks on one background thread; keeps at most one fetch ahead."""

    def __init__(self, tier: WeightTier):
        self.tier = tier
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._ahead: tuple[int, Future] | None = None
        self._lock = threading.Lock()

    def take(self, index: int) -> State:
        with self._lock:
            ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == index:
            return ahead[1].result()
        return self.tier.fetch(index)  # not prefetched (first call, or a call that skipped blocks)

    def prefetch(self, index: int) -> None:
        with self._lock:
            if self._ahead is None or self._ahead[0] != index:
                self._ahead = (index, self._executor.submit(self.tier.fetch, index))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class OffloadedLayer(nn.Module):
    """A decoder layer whose weights are fetched for each call and dropped after it."""

    def __init__(self, layer: nn.Module, index: int, next_index: int, prefetcher: Prefetcher):
        super().__init__()
        self.layer = layer  # on the meta device: structure only
        self.index, self.next_index = index, next_index
        self.prefetcher = prefetcher

    def forward(self, *args, **kwargs):
        state = self.prefetcher.take(self.index)
        self.prefetcher.prefetch(self.next_index)  # overlaps with this layer's compute
        return functional_call(self.layer, state, args, kwargs, strict=True)


def offload_layers(layers: nn.ModuleList, first_index: int, tier: WeightTier) -> Prefetcher:
    """Wrap every layer of a span (built on meta, not loaded) in place; returns the shared prefetcher."""
    prefetcher = Prefetcher(tier)
    count = len(layers)
    for local in range(count):
        layers[local] = OffloadedLayer(layers[local], first_index + local, first_index + (local + 1) % count, prefetcher)
    return prefetcher
