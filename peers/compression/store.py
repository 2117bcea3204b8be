"""Factorised blocks on disk, next to the model's per-block cache, so a restart does not factorise again.

Layout: <model cache>/compressed/<spec key>[-<calibration digest>]/block<i>.safetensors, written atomically
(a temporary file in the same folder, then a rename), so a peer killed mid-write leaves no torn file.
"""

from __future__ import annotations

import os
import pathlib
import tempfile

import torch
from safetensors.torch import load_file, save_file


class FactorStore:
    def __init__(self, folder: pathlib.Path):
        self.folder = folder

    def path(self, index: int) -> pathlib.Path:
        return self.folder / f"block{index}.safetensors"

    def has(self, index: int) -> bool:
        return self.path(index).is_file()

    def load(self, index: int) -> dict[str, torch.Tensor]:
        return load_file(self.path(index))

    def save(self, index: int, state: dict[str, torch.Tensor]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        os.close(handle)
        try:
            save_file({k: v.contiguous() for k, v in state.items()}, temporary)
            os.replace(temporary, self.path(index))
        finally:
            pathlib.Path(temporary).unlink(missing_ok=True)
