"""Reading single tensors of a safetensors file into private memory, one at a time, without a memory map.

safe_open maps the whole file: every page read stays resident (and counted in the process's RSS) until the
file is closed. A peer that quantises a block wants each dense matrix in memory only until it is quantised,
so it reads them with plain file reads instead (format: 8-byte little-endian header length, JSON header of
name -> dtype, shape, data_offsets, then the data).
"""

from __future__ import annotations

import json
import math
import pathlib
import struct
from types import TracebackType
from typing import BinaryIO

import torch

from swarm.errors import ModelError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class TensorFile:
    """A safetensors file open for reading tensors by name; use as a context manager."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self._file: BinaryIO = open(path, "rb")
        try:
            (length,) = struct.unpack("<Q", self._file.read(8))
            header = json.loads(self._file.read(length))
        except (struct.error, ValueError) as error:
            self._file.close()
            raise ModelError(f"damaged {path} ({error}); delete its model directory to convert again") from None
        header.pop("__metadata__", None)
        self._header: dict[str, dict] = header
        self._data_start = 8 + length

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def meta_state(self) -> dict[str, torch.Tensor]:
        """Every tensor as an empty one on the meta device: names and shapes, nothing read."""
        return {name: torch.empty(self.shape(name), device="meta") for name in self._header}

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name` in its stored dtype, in memory of its own (nothing else of the file is kept)."""
        info = self._header[name]
        dtype, shape = SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"])
        begin, end = info["data_offsets"]
        if math.prod(shape) == 0:
            return torch.empty(shape, dtype=dtype)
        buffer = bytearray(end - begin)
        self._file.seek(self._data_start + begin)
        if self._file.readinto(buffer) != len(buffer):
            raise ModelError(f"{self.path} is truncated at {name}; delete its model directory to convert again")
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()
