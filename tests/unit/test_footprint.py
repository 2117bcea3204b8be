"""Tests of peers.compression.footprint: what a block costs the compute tier under each option."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import LlamaConfig

from peers.compression.footprint import RESIDENT_OFFLOADED_BLOCKS, block_footprint, linear_shapes
from peers.config import PeerConfig

# SmolLM2-135M's block shapes
CONFIG = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
NORMS = 2 * 576
LINEAR = sum(out * inp for out, inp in linear_shapes(CONFIG))
DENSE_FP32 = 4 * (LINEAR + NORMS)


def footprint(**options):
    return block_footprint(CONFIG, DENSE_FP32, 4, dataclasses.replace(PeerConfig(model="m", initial_peers=[]), **options))


def test_linear_shapes_of_a_llama_block():
    assert LINEAR == 576 * 576 * 2 + 2 * 192 * 576 + 3 * 576 * 1536


def test_a_dense_block_costs_its_bytes():
    assert footprint().per_block == DENSE_FP32 and footprint().fixed == 0


@pytest.mark.parametrize("quant, most, least", [("int8", 0.27, 0.25), ("nf4", 0.15, 0.14)])
def test_quantised_blocks_cost_a_fraction(quant, most, least):
    ratio = footprint(quant=quant).per_block / DENSE_FP32
    assert least < ratio < most


def test_svd_by_params_costs_about_that_fraction_and_energy_is_budgeted_as_dense():
    assert 0.48 < footprint(svd_params=0.5).per_block / DENSE_FP32 < 0.52
    assert footprint(svd_energy=0.95).per_block == DENSE_FP32  # the rank is unknown until factorised


def test_a_rank_that_saves_nothing_stays_dense():
    assert footprint(svd_rank=10_000).per_block == DENSE_FP32
    assert footprint(svd_rank=32).per_block < DENSE_FP32 / 5


def test_an_offloaded_peer_keeps_two_blocks_resident_whatever_it_serves():
    offloaded = footprint(offload="disk")
    assert offloaded.per_block == 0 and offloaded.fixed == RESIDENT_OFFLOADED_BLOCKS * DENSE_FP32
