"""Building the span a peer serves from its options: dense, SVD-factorised, quantised, offloaded."""

from __future__ import annotations

import contextlib
import gc
import logging
import pathlib
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from peers.compression.calibration import calibration_digest, collect_grams
from peers.compression.options import SvdSpec, check_options, compression_tag, svd_spec
from peers.compression.quant import quantise_weight
from peers.compression.store import FactorStore
from peers.compression.svd import factorise_block, shape_for_state
from peers.config import PeerConfig
from peers.memory import peak_rss, release_free_memory
from peers.offload import DiskTier, HostTier, offload_layers
from swarm.blocks import BlockSpan
from swarm.models import BlockCheckpoint
from swarm.models.layout import block_file
from swarm.models.tensorfile import TensorFile

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


def load_quantised(layer: nn.Module, file: pathlib.Path, kind: str, dtype: torch.dtype, device: torch.device) -> None:
    """Fill the meta `layer` from `file`, quantising each linear layer as soon as its weight is read (in its
    stored dtype, into private memory): at most one dense matrix is in memory at a time, never the whole block."""
    with TensorFile(file) as tensors:
        shape_for_state(layer, tensors.meta_state())
        expected, stored = set(layer.state_dict()), set(tensors.keys())
        if expected != stored:
            raise ValueError(f"{file}: missing {sorted(expected - stored)}, unexpected {sorted(stored - expected)}")
        linears = {name: module for name, module in layer.named_modules() if type(module) is nn.Linear}
        rest = {key: tensors.read(key).to(device, dtype) for key in stored if key.rpartition(".")[0] not in linears}
        layer.load_state_dict(rest, strict=False, assign=True)  # norms: small, kept dense
        for name, module in linears.items():
            weight = tensors.read(f"{name}.weight")
            bias = tensors.read(f"{name}.bias") if module.bias is not None else None
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            setattr(parent, child, quantise_weight(weight, bias, kind, dtype, device))
            del weight, bias  # before the next one is read
            release_free_memory()  # and its temporaries' heap pages


def _peak_note() -> str:
    """', peak RSS so far N MB' where the OS tells it (what loading took at most, for benchmarks/host_memory.py)."""
    try:
        return f", peak RSS so far {peak_rss() / 1e6:.0f} MB"
    except (OSError, RuntimeError):
        return ""


@contextlib.contextmanager
def _young_collections() -> Iterator[None]:
    """Meanwhile, a full garbage collection skips every object that existed before (torch, transformers, hivemind):
    one per quantised block then takes milliseconds instead of ~0.4 s."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


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
        with _young_collections() if cfg.quant != "none" else contextlib.nullcontext():
            for local, index in enumerate(tqdm(indices, desc=f"Loading blocks {start}:{end}", unit="block", leave=False)):
                layer = span.layers[local]
                if cfg.quant != "none":
                    load_quantised(layer, files[index], cfg.quant, dtype, device)
                    gc.collect()  # bitsandbytes' temporaries go now, not after the last block
                    release_free_memory()
                    continue
                state = {k: v.to(device, dtype) for k, v in load_file(files[index]).items()}  # memory-mapped
                shape_for_state(layer, state)
                layer.load_state_dict(state, strict=True, assign=True)
    logger.info(f"Blocks {start}:{end} loaded: {dtype}, compression {compression_tag(cfg)}, offload {cfg.offload}"
                f"{_peak_note()}")
    return span.eval()
