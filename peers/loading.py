"""Building the span a peer serves from its options: dense, SVD-factorised, quantised, offloaded."""

from __future__ import annotations

import gc
import logging
import pathlib

import torch
from safetensors import safe_open
from safetensors.torch import load, load_file
from tqdm.auto import tqdm

from peers.compression.calibration import calibration_digest, collect_grams
from peers.compression.options import SvdSpec, check_options, compression_tag, svd_spec
from peers.compression.quant import quantise_layer
from peers.compression.store import FactorStore
from peers.compression.svd import factorise_block, shape_for_state
from peers.config import PeerConfig
from peers.memory import release_free_memory
from peers.offload import DiskTier, HostTier, offload_layers
from swarm.blocks import BlockSpan
from swarm.models import BlockCheckpoint
from swarm.models.layout import block_file

logger = logging.getLogger(__name__)


def factor_store(checkpoint: BlockCheckpoint, spec: SvdSpec) -> FactorStore:
    name = spec.key + (f"-{calibration_digest()}" if spec.method == "activation-aware" else "")
    return FactorStore(checkpoint.path / "compressed" / name)


def factorised_files(
    checkpoint: BlockCheckpoint, model_config, spec: SvdSpec, indices: range, grams: dict | None = None
) -> dict[int, pathlib.Path]:
    """Paths of the factorised blocks, factorising (and caching) those not done before. `grams`: activation
    statistics already collected (benchmarks reuse them across ranks); collected here when needed."""
    store = factor_store(checkpoint, spec)
    missing = [index for index in indices if not store.has(index)]
    if missing:
        if grams is None and spec.method == "activation-aware":
            grams = collect_grams(checkpoint, model_config, missing)
        grams = grams or {}
        for index in tqdm(missing, desc=f"Factorising ({spec.key})", unit="block", leave=False):
            store.save(index, factorise_block(checkpoint.load_block_state(index), spec, grams.get(index)))
        logger.info(f"Factorised {len(missing)} blocks into {store.folder}")
    return {index: store.path(index) for index in indices}


def _meta_state(file: pathlib.Path) -> dict[str, torch.Tensor]:
    """Names and shapes of a safetensors file's tensors, without reading them."""
    with safe_open(file, framework="pt") as reader:
        return {key: torch.empty(reader.get_slice(key).get_shape(), device="meta") for key in reader.keys()}


def _read_state(file: pathlib.Path, copy: bool) -> dict[str, torch.Tensor]:
    """A block's tensors: memory-mapped (dense blocks use the file's pages), or read into private memory
    when they are about to be quantised (a mapping would keep every dense page resident)."""
    if not copy:
        return load_file(file)
    return load(file.read_bytes())


def build_span(checkpoint: BlockCheckpoint, model_config, start: int, end: int, cfg: PeerConfig) -> BlockSpan:
    check_options(cfg)
    cfg = cfg.for_checkpoint(checkpoint.manifest.torch_dtype)
    dtype, device = cfg.torch_dtype(), cfg.torch_device()
    indices = range(start, end)
    spec = svd_spec(cfg)
    if spec is not None:
        files = factorised_files(checkpoint, model_config, spec, indices)
    else:
        files = {index: block_file(checkpoint.path, index) for index in indices}
    span = BlockSpan(model_config, start, end)
    span.rotary_emb.to(device)
    if cfg.offload == "disk":
        for local, index in enumerate(indices):
            shape_for_state(span.layers[local], _meta_state(files[index]))
        offload_layers(span.layers, start, DiskTier(files, dtype, device))
    elif cfg.offload == "cpu":
        states = {index: load_file(files[index]) for index in indices}
        for local, index in enumerate(indices):
            shape_for_state(span.layers[local], states[index])
        offload_layers(span.layers, start, HostTier(states, dtype, device))
    else:
        for local, index in enumerate(tqdm(indices, desc=f"Loading blocks {start}:{end}", unit="block", leave=False)):
            state = {k: v.to(device, dtype) for k, v in _read_state(files[index], cfg.quant != "none").items()}
            layer = span.layers[local]
            shape_for_state(layer, state)
            layer.load_state_dict(state, strict=True, assign=True)
            if cfg.quant != "none":
                quantise_layer(layer, cfg.quant, dtype, device)
                del state
                gc.collect()  # the dense copy and bitsandbytes' temporaries go now, not after the last block
                release_free_memory()
    logger.info(f"Blocks {start}:{end} loaded: {dtype}, compression {compression_tag(cfg)}, offload {cfg.offload}")
    return span.eval()
