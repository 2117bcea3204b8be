"""Writing a converted model: into a hidden sibling directory first, moved into place with one rename.

A crash mid-conversion leaves only the hidden staging directory, never a half-written model directory that
looks complete; a second process converting the same model at the same time loses the rename race and
uses the winner's result.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import tempfile
from collections import Counter
from types import TracebackType

import torch
from safetensors.torch import save_file

from swarm.errors import ModelError
from swarm.models.layout import CLIENT_FILE, block_file
from swarm.models.manifest import Manifest, model_digest, read_manifest, tensors_digest, write_manifest

logger = logging.getLogger(__name__)


class ConvertedModelWriter:
    """Use as a context manager; write config/tokenizer into `staging`, add tensors, then call finish()."""

    def __init__(self, target: pathlib.Path, *, name: str, source: str, model_type: str):
        self.target = target
        self._name = name
        self._source = source
        self._model_type = model_type
        self._block_digests: dict[int, str] = {}
        self._client_digest: str | None = None
        self._bytes_per_dtype: Counter[str] = Counter()
        self.staging = pathlib.Path()

    def __enter__(self) -> ConvertedModelWriter:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{self.target.name}.partial-", dir=self.target.parent))
        self.staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared by peers run as other users
        block_file(self.staging, 0).parent.mkdir()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)  # already gone when finish() succeeded

    def write_block(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        """Save one block's tensors (keys relative to the decoder layer) and remember its digest."""
        tensors = {key: tensor.contiguous() for key, tensor in tensors.items()}
        _save(tensors, block_file(self.staging, index))
        self._block_digests[index] = tensors_digest(tensors)
        for tensor in tensors.values():
            self._bytes_per_dtype[_dtype_name(tensor.dtype)] += tensor.numel() * tensor.element_size()

    def write_client(self, tensors: dict[str, torch.Tensor]) -> None:
        """Save the client's tensors: embed_tokens.weight, norm.weight and lm_head.weight when untied."""
        tensors = {key: tensor.contiguous() for key, tensor in tensors.items()}
        _save(tensors, self.staging / CLIENT_FILE)
        self._client_digest = tensors_digest(tensors)

    def finish(self, num_blocks: int) -> Manifest:
        """Write the manifest and move the staging directory to the target; return the manifest in place."""
        if sorted(self._block_digests) != list(range(num_blocks)) or self._client_digest is None:
            raise ModelError(f"conversion of {self._source} did not produce all {num_blocks} blocks")
        block_digests = tuple(self._block_digests[index] for index in range(num_blocks))
        manifest = Manifest(
            name=self._name,
            source=self._source,
            model_type=self._model_type,
            num_blocks=num_blocks,
            torch_dtype=self._bytes_per_dtype.most_common(1)[0][0],
            block_digests=block_digests,
            client_digest=self._client_digest,
            model_digest=model_digest(self._client_digest, block_digests),
        )
        write_manifest(self.staging, manifest)
        try:
            os.rename(self.staging, self.target)
        except OSError:
            if not self.target.is_dir():
                raise
            # another process converted the same model meanwhile; its result is as good as ours
            logger.info("%s was converted by another process meanwhile; using that copy", self.target)
            return read_manifest(self.target)
        return manifest


def _save(tensors: dict[str, torch.Tensor], file: pathlib.Path) -> None:
    save_file(tensors, file, metadata={"format": "pt"})
    file.chmod(0o644)  # safetensors creates files readable by their owner only


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
