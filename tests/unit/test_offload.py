"""Offloaded blocks compute exactly what resident blocks compute; the prefetcher keeps one block ahead."""

from __future__ import annotations

import torch

from peers.config import PeerConfig
from peers.loading import build_span
from peers.offload import OffloadedLayer, Prefetcher
from swarm.blocks import SpanInput
from swarm.models import DEFAULT_MODEL


def test_disk_offloaded_span_matches_resident_span_with_a_kv_cache(checkpoint):
    config = checkpoint.load_config()
    resident = build_span(checkpoint, config, 4, 8, PeerConfig(DEFAULT_MODEL, ()))
    offloaded = build_span(checkpoint, config, 4, 8, PeerConfig(DEFAULT_MODEL, (), offload="disk"))
    assert all(isinstance(layer, OffloadedLayer) for layer in offloaded.layers)
    assert all(p.device.type == "meta" for p in offloaded.parameters())  # no weights held between calls
    torch.manual_seed(0)
    prompt, step = torch.randn(1, 6, config.hidden_size), torch.randn(1, 1, config.hidden_size)
    caches = resident.new_cache(), offloaded.new_cache()
    first = [span(prompt, cache, SpanInput(None, 0)) for span, cache in zip((resident, offloaded), caches)]
    second = [span(step, cache, SpanInput(None, 6)) for span, cache in zip((resident, offloaded), caches)]
    assert torch.equal(first[0], first[1]) and torch.equal(second[0], second[1])


class CountingTier:
    def __init__(self):
        self.fetched: list[int] = []

    def fetch(self, index: int) -> dict[str, torch.Tensor]:
        self.fetched.append(index)
        return {"w": torch.full((1,), float(index))}


def test_prefetcher_serves_the_prefetched_block_and_fetches_others_directly():
    tier = CountingTier()
    prefetcher = Prefetcher(tier)
    prefetcher.prefetch(3)
    assert prefetcher.take(3)["w"].item() == 3.0
    assert prefetcher.take(5)["w"].item() == 5.0  # nothing prefetched: fetched on the spot
    prefetcher.prefetch(7)
    assert prefetcher.take(6)["w"].item() == 6.0  # the wrong block was ahead: still correct
    prefetcher.shutdown()
    assert tier.fetched[:2] == [3, 5] and 6 in tier.fetched  # (7 may be cancelled by the shutdown)
