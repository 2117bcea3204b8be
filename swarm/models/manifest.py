"""The manifest of a converted model and the digests that identify its weights.

A block digest covers each tensor's name, dtype, shape and bytes, in sorted name order, so two peers that
converted the same weights (from any source format) agree on it, and any changed weight changes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from collections.abc import Mapping

import torch

from swarm.errors import ModelError

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a converted model directory holds; saved as manifest.json next to the tensors."""

    name: str  # the name the user gave, canonicalised (alias name, repo id, or file/directory basename)
    source: str  # where it was converted from: repo id, absolute path, or "pypi:<package>==<version>"
    model_type: str  # "llama" | "mistral" | "qwen2"
    num_blocks: int  # number of transformer blocks (decoder layers)
    torch_dtype: str  # dtype the block tensors are stored in, e.g. "float32", "bfloat16"
    block_digests: tuple[str, ...]  # sha256 hex of each block's tensors (see tensors_digest)
    client_digest: str  # sha256 hex of the client's tensors (embeddings, final norm, lm_head if untied)
    model_digest: str  # sha256 hex over client_digest and all block digests (see model_digest)
    format_version: int = FORMAT_VERSION  # layout version of the converted directory


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 hex over names, dtypes, shapes and bytes of `tensors`, in sorted name order."""
    hasher = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        header = f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{tuple(tensor.shape)}\0"
        hasher.update(header.encode())
        # view as bytes so dtypes numpy lacks (bfloat16) hash the same way as the others
        raw = tensor.reshape(-1).view(torch.uint8).numpy()
        hasher.update(len(raw).to_bytes(8, "little"))
        hasher.update(raw)
    return hasher.hexdigest()


def model_digest(client_digest: str, block_digests: tuple[str, ...]) -> str:
    """sha256 hex over the client digest and the block digests in block order."""
    return hashlib.sha256("\n".join((client_digest, *block_digests)).encode()).hexdigest()


def write_manifest(directory: pathlib.Path, manifest: Manifest) -> None:
    record = dataclasses.asdict(manifest)
    record["block_digests"] = list(manifest.block_digests)
    (directory / MANIFEST_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_manifest(directory: pathlib.Path) -> Manifest:
    """Read and check manifest.json; a damaged or foreign one is a ModelError that says how to recover."""
    path = directory / MANIFEST_FILE
    try:
        record = json.loads(path.read_text())
        record["block_digests"] = tuple(record["block_digests"])
        manifest = Manifest(**record)
    except FileNotFoundError:
        raise ModelError(
            f"{directory} is not a converted model (no {MANIFEST_FILE}); delete it to convert the model again"
        ) from None
    except (ValueError, TypeError, KeyError) as error:
        raise ModelError(f"damaged {path} ({error}); delete {directory} to convert the model again") from None
    if manifest.format_version != FORMAT_VERSION:
        raise ModelError(
            f"{directory} has cache format {manifest.format_version}, this version reads {FORMAT_VERSION}; "
            f"delete it to convert the model again"
        )
    if len(manifest.block_digests) != manifest.num_blocks:
        raise ModelError(f"damaged {path} (digest count != num_blocks); delete {directory} to convert again")
    return manifest
