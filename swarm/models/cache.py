"""open_model(): find a converted model in the cache, converting it there first if needed."""

from __future__ import annotations

import logging
import pathlib
import time

from swarm.errors import ModelError
from swarm.models.checkpoint import BlockCheckpoint
from swarm.models.convert import convert
from swarm.models.names import cache_root, safe_name
from swarm.models.resolve import identify, resolve_model

logger = logging.getLogger(__name__)

MODELS_DIR = "models"  # <cache root>/models/<safe name>/: converted models
SOURCES_DIR = "sources"  # <cache root>/sources/: downloaded source files (the default model's GGUF)


def open_model(name: str, *, cache_dir: pathlib.Path | None = None, show_progress: bool = True) -> BlockCheckpoint:
    """Resolve `name`, fetch/convert it once into the cache if not there yet, return the checkpoint.

    Idempotent: once converted, a model opens from the cache alone (its source may even be gone).
    cache_dir replaces the cache root (default: cache_root()).
    """
    root = cache_dir if cache_dir is not None else cache_root()
    canonical, source = identify(name)
    target = model_directory(root, canonical)
    if target.exists():
        checkpoint = BlockCheckpoint(target)  # a directory without a manifest raises ModelError here
        if checkpoint.manifest.source != source:
            raise ModelError(
                f"{target} holds {canonical} converted from {checkpoint.manifest.source}, not from {source}; "
                f"delete that directory or rename the model's directory"
            )
        logger.debug("using converted %s from %s", canonical, target)
        return checkpoint
    resolved = resolve_model(name)
    started = time.monotonic()
    manifest = convert(resolved, target, sources_dir=root / SOURCES_DIR, show_progress=show_progress)
    logger.info(
        "converted %s in %.1f s (%d blocks, %s)",
        canonical, time.monotonic() - started, manifest.num_blocks, manifest.torch_dtype,
    )
    return BlockCheckpoint(target, manifest)


def model_directory(root: pathlib.Path, canonical_name: str) -> pathlib.Path:
    """<root>/models/<safe name>: where the model called `canonical_name` is (or will be) converted."""
    directory_name = safe_name(canonical_name)
    if directory_name.strip(".") == "":
        raise ModelError(f"cannot cache a model named {canonical_name!r}; give its directory a proper name")
    return root / MODELS_DIR / directory_name
