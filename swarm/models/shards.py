"""Reading a Hugging Face checkpoint directory one shard and one tensor at a time.

safetensors shards are read through safe_open (one tensor in memory at a time); pytorch_model*.bin shards
through torch.load(mmap=True), which maps the file instead of reading it whole.
"""

from __future__ import annotations

import json
import logging
import pathlib
import pickle
from collections.abc import Iterator

import torch
from safetensors import safe_open

from swarm.errors import ModelError

logger = logging.getLogger(__name__)

# Preferred first: safetensors is safe to read and needs no unpickling.
_WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def find_shards(directory: pathlib.Path) -> list[pathlib.Path]:
    """The weight files of a checkpoint directory, in shard order."""
    for index_name, single_name in _WEIGHT_LAYOUTS:
        index_path = directory / index_name
        if index_path.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
            except (ValueError, KeyError) as error:
                raise ModelError(f"damaged {index_path}: {error}") from None
            shards = [directory / name for name in sorted(set(weight_map.values()))]
            missing = [shard.name for shard in shards if not shard.is_file()]
            if missing:
                raise ModelError(f"{directory} lacks weight file(s) {', '.join(missing)}; download them again")
            return shards
        if (directory / single_name).is_file():
            return [directory / single_name]
    raise ModelError(f"{directory} has no model.safetensors or pytorch_model.bin weights")


def shard_keys(shard: pathlib.Path) -> list[str]:
    """Tensor names in one shard, without reading the tensors (header only for safetensors)."""
    if shard.suffix == ".safetensors":
        with safe_open(shard, framework="pt") as reader:
            return list(reader.keys())
    return list(_load_bin(shard))


def iter_shard(shard: pathlib.Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for each tensor of one shard, reading one tensor at a time."""
    if shard.suffix == ".safetensors":
        with safe_open(shard, framework="pt") as reader:
            for key in reader.keys():
                yield key, reader.get_tensor(key)
        return
    state = _load_bin(shard)
    for key in list(state):
        # clone: copies one tensor out of the mapped file, and breaks storage shared between tensors,
        # which safetensors refuses to save
        yield key, state.pop(key).clone()


def _load_bin(shard: pathlib.Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(shard, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as error:
        raise ModelError(f"cannot read {shard}: {str(error).splitlines()[0]}") from None
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise ModelError(f"cannot read {shard}: {str(error).splitlines()[0]}") from None
        # files written before torch 1.6 cannot be mapped; read this one shard whole
        logger.warning("%s cannot be memory-mapped (old format); reading it whole", shard)
        return torch.load(shard, map_location="cpu", weights_only=True)
