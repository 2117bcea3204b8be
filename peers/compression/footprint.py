"""What a block costs the compute tier (GPU or RAM) under a peer's options, before anything is loaded.

A peer that picks its own block count budgets with this: a quantised or low-rank block is smaller than a
dense one, and an offloaded peer keeps only the block running and the one prefetched resident. SVD by
energy cannot be sized before the singular values are known, so it is budgeted as dense (never too many).
"""

from __future__ import annotations

from dataclasses import dataclass

from peers.compression.options import svd_spec
from peers.compression.svd import rank_for_params, saves_memory
from peers.config import PeerConfig

RESIDENT_OFFLOADED_BLOCKS = 2  # the block running and the next one, prefetched
NF4_BYTES_PER_WEIGHT = 0.5 + 4 / 64  # 4-bit codes and one float32 absmax per 64 weights
INT8_BYTES_PER_WEIGHT = 1.0  # plus one float32 scale per output row


@dataclass(frozen=True)
class Footprint:
    """Compute-tier bytes: `per_block` for each block served, plus `fixed` whatever the count."""

    per_block: int
    fixed: int = 0


def linear_shapes(model_config) -> list[tuple[int, int]]:
    """(out_features, in_features) of a Llama block's seven linear layers."""
    hidden, inter = model_config.hidden_size, model_config.intermediate_size
    head_dim = getattr(model_config, "head_dim", None) or hidden // model_config.num_attention_heads
    q_out = model_config.num_attention_heads * head_dim
    kv_out = model_config.num_key_value_heads * head_dim
    return [(q_out, hidden), (kv_out, hidden), (kv_out, hidden), (hidden, q_out),
            (inter, hidden), (inter, hidden), (hidden, inter)]


def _kept_rank(cfg: PeerConfig, out_features: int, in_features: int) -> int | None:
    """The rank SVD keeps for this layer, None where it stays dense or cannot be told before factorising."""
    spec = svd_spec(cfg)
    if spec is None or spec.energy is not None:
        return None
    rank = spec.rank if spec.rank is not None else rank_for_params(out_features, in_features, spec.params)
    rank = min(rank, out_features, in_features)
    return rank if saves_memory(out_features, in_features, rank) else None


def _matrix_bytes(out_features: int, in_features: int, cfg: PeerConfig, dtype_size: int) -> float:
    count = out_features * in_features
    if cfg.quant == "int8":
        return count * INT8_BYTES_PER_WEIGHT + 4 * out_features
    if cfg.quant == "nf4":
        return count * NF4_BYTES_PER_WEIGHT
    return count * dtype_size


def block_footprint(model_config, dense_block_bytes: int, dtype_size: int, cfg: PeerConfig) -> Footprint:
    """Bytes one served block takes in the compute tier; `dense_block_bytes` is its size at `dtype_size`."""
    if cfg.offload != "none":
        return Footprint(per_block=0, fixed=RESIDENT_OFFLOADED_BLOCKS * dense_block_bytes)
    linear_bytes, dense_linear_bytes = 0.0, 0
    for out_features, in_features in linear_shapes(model_config):
        dense_linear_bytes += out_features * in_features * dtype_size
        rank = _kept_rank(cfg, out_features, in_features)
        if rank is None:
            linear_bytes += _matrix_bytes(out_features, in_features, cfg, dtype_size)
        else:  # two factors, (out x rank) and (rank x in)
            linear_bytes += _matrix_bytes(out_features, rank, cfg, dtype_size)
            linear_bytes += _matrix_bytes(rank, in_features, cfg, dtype_size)
    other_bytes = max(dense_block_bytes - dense_linear_bytes, 0)  # norms
    return Footprint(per_block=int(other_bytes + linear_bytes))
