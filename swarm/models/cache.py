"""open_model(): find a converted model in the cache, converting it there first if needed."""

from __future__ import annotations

import hashlib
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
LOCAL_DIGEST_CHARS = 12  # hex characters of a local checkpoint's digest in its cache directory's name


def open_model(name: str, *, cache_dir: pathlib.Path | None = None, show_progress: bool = True) -> BlockCheckpoint:
    """Resolve `name`, fetch/convert it once into the cache if not there yet, return the checkpoint.

    Idempotent: once converted, a model opens from the cache alone (its source may even be gone).
    cache_dir replaces the cache root (default: cache_root()).
    """
    root = cache_dir if cache_dir is not None else cache_root()
    canonical, source = identify(name)
    local = _local_path(source)
    target = model_directory(root, canonical if local is None else f"{canonical}-{local_digest(local)}")
    if target.exists():
        checkpoint = BlockCheckpoint(target)  # a directory without a manifest raises ModelError here
        if checkpoint.manifest.source != source and local is None:  # a local one: the digest says it is the same
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
    """<root>/models/<safe name>: where the model called `canonical_name` is (or will be) converted (a local
    checkpoint's name carries its `local_digest`)."""
    directory_name = safe_name(canonical_name)
    if directory_name.strip(".") == "":
        raise ModelError(f"cannot cache a model named {canonical_name!r}; give its directory a proper name")
    return root / MODELS_DIR / directory_name


def _local_path(source: str) -> pathlib.Path | None:
    """The local checkpoint directory or .gguf file `source` names, or None for an alias, repo id or package."""
    path = pathlib.Path(source)
    return path if path.is_absolute() and path.exists() else None


def local_digest(path: pathlib.Path) -> str:
    """A short digest of a local checkpoint, cheap enough for every start (no weight is read): config.json's
    bytes, and the name, size and modification time of each file in the directory (or of the .gguf file).
    Two checkpoints in folders of the same name get different ones, and so different cache directories;
    changing a file in place gives a new one, so the checkpoint is converted again."""
    hasher = hashlib.sha256()
    files = [path] if path.is_file() else sorted(f for f in path.iterdir() if not f.name.startswith(".") and f.is_file())
    for file in files:
        stat = file.stat()  # follows symlinks (a Hugging Face snapshot links to its blobs)
        hasher.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    if path.is_dir() and (path / "config.json").is_file():
        hasher.update((path / "config.json").read_bytes())
    return hasher.hexdigest()[:LOCAL_DIGEST_CHARS]
