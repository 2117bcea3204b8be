"""Where each checkpoint tensor goes in the per-block cache, and the buffer that completes blocks one by one.

Hugging Face Llama-family names:  model.layers.{i}.<rest> -> block i, key <rest>
                                  model.embed_tokens.weight, model.norm.weight, lm_head.weight -> client
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import re
from collections.abc import Iterable

import torch

from swarm.errors import ModelError

logger = logging.getLogger(__name__)

CLIENT_FILE = "client.safetensors"  # <model dir>/client.safetensors: the client's tensors
BLOCKS_DIR = "blocks"  # <model dir>/blocks/block_0000.safetensors ...: one file per block

CLIENT_KEYS = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_BLOCK_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Older checkpoints (e.g. huggyllama/llama-7b) store the rotary table; transformers recomputes it.
_DROPPED_SUFFIXES = ("rotary_emb.inv_freq",)


def block_file(model_dir: pathlib.Path, index: int) -> pathlib.Path:
    """The file holding block `index` of the converted model in `model_dir`."""
    return model_dir / BLOCKS_DIR / f"block_{index:04d}.safetensors"


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one checkpoint tensor is stored: a block (index >= 0) or the client (index None)."""

    block: int | None  # block index, or None for the client's part
    key: str  # key inside that part, e.g. "self_attn.q_proj.weight" or "embed_tokens.weight"


def place(checkpoint_key: str, *, tied_embeddings: bool) -> Placement | None:
    """Where `checkpoint_key` goes; None for tensors the cache does not keep."""
    if checkpoint_key.endswith(_DROPPED_SUFFIXES):
        return None
    match = _BLOCK_KEY.match(checkpoint_key)
    if match:
        return Placement(int(match.group(1)), match.group(2))
    if checkpoint_key in CLIENT_KEYS:
        if checkpoint_key == "lm_head.weight" and tied_embeddings:
            return None  # the client reuses embed_tokens.weight
        return Placement(None, CLIENT_KEYS[checkpoint_key])
    return None


def _is_known(checkpoint_key: str) -> bool:
    return bool(
        checkpoint_key in CLIENT_KEYS
        or checkpoint_key.endswith(_DROPPED_SUFFIXES)
        or _BLOCK_KEY.match(checkpoint_key)
    )


class BlockAssembler:
    """Collects tensors per block and hands each block out as soon as all its tensors have arrived.

    Only incomplete blocks are buffered, so converting a checkpoint whose blocks lie in order across shards
    holds about one block in memory, not the model.
    """

    def __init__(self, checkpoint_keys: Iterable[str], *, tied_embeddings: bool, label: str = "checkpoint"):
        self._tied = tied_embeddings
        self._label = label  # names the checkpoint in error messages
        self._expected: dict[int, set[str]] = {}
        self._client_expected: set[str] = set()
        for checkpoint_key in checkpoint_keys:
            placement = place(checkpoint_key, tied_embeddings=tied_embeddings)
            if placement is None:
                if not _is_known(checkpoint_key):
                    logger.warning("ignoring tensor %s: not part of a Llama-family model", checkpoint_key)
                continue
            if placement.block is None:
                self._client_expected.add(placement.key)
            else:
                self._expected.setdefault(placement.block, set()).add(placement.key)
        required = {"embed_tokens.weight", "norm.weight"} | (set() if tied_embeddings else {"lm_head.weight"})
        if required - self._client_expected:
            raise ModelError(f"{label} lacks {', '.join(sorted(required - self._client_expected))}")
        self.num_blocks = len(self._expected)
        if sorted(self._expected) != list(range(self.num_blocks)):
            raise ModelError(f"{label} has gaps in its block numbering: {sorted(self._expected)}")
        self._pending: dict[int, dict[str, torch.Tensor]] = {}
        self.client: dict[str, torch.Tensor] = {}

    @property
    def pending_blocks(self) -> int:
        """How many blocks are buffered, waiting for more tensors."""
        return len(self._pending)

    def add(self, checkpoint_key: str, tensor: torch.Tensor) -> tuple[int, dict[str, torch.Tensor]] | None:
        """Take one tensor; return (index, tensors) of the block it completes, if any."""
        placement = place(checkpoint_key, tied_embeddings=self._tied)
        if placement is None:
            return None
        if placement.block is None:
            self.client[placement.key] = tensor
            return None
        block = self._pending.setdefault(placement.block, {})
        block[placement.key] = tensor
        if set(block) == self._expected[placement.block]:
            return placement.block, self._pending.pop(placement.block)
        return None

    def check_done(self) -> None:
        """Raise if some tensor that was announced never arrived."""
        if self._pending:
            raise ModelError(f"{self._label} is missing tensors of block(s) {sorted(self._pending)}")
        missing = self._client_expected - set(self.client)
        if missing:
            raise ModelError(f"{self._label} is missing tensor(s) {sorted(missing)}")

