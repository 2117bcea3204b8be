"""A converted model in the cache: reading one block, the client's part, the config and the tokenizer."""

from __future__ import annotations

import json
import pathlib
import struct

import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from swarm.errors import ModelError
from swarm.models.layout import CLIENT_FILE, block_file
from swarm.models.manifest import Manifest, read_manifest
from swarm.models.names import safe_name

DIGEST_CHARS_IN_PREFIX = 12  # 48 bits of the model digest: enough to tell apart the models a swarm serves


class BlockCheckpoint:
    """A model converted into the per-block cache: one safetensors file per transformer block plus the client's part.

    A peer serving blocks [start, end) reads only those blocks' files, so it holds only their parameters.
    """

    def __init__(self, path: pathlib.Path, manifest: Manifest | None = None):
        self.path = path
        self.manifest = manifest if manifest is not None else read_manifest(path)

    def __repr__(self) -> str:
        return f"BlockCheckpoint({self.manifest.name!r}, {self.num_blocks} blocks, {self.path})"

    @property
    def num_blocks(self) -> int:
        return self.manifest.num_blocks

    @property
    def dht_prefix(self) -> str:
        """'<safe name>@<first 12 hex of model digest>': peers share blocks only if the weights are identical."""
        return f"{safe_name(self.manifest.name)}@{self.manifest.model_digest[:DIGEST_CHARS_IN_PREFIX]}"

    def load_config(self) -> PretrainedConfig:
        return AutoConfig.from_pretrained(self.path)

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        return AutoTokenizer.from_pretrained(self.path)

    def load_block_state(self, index: int, device: str = "cpu") -> dict[str, torch.Tensor]:
        """Tensors of block `index`, keyed relative to the decoder layer ("self_attn.q_proj.weight", ...)."""
        return self._load(self._block_file(index), device)

    def load_client_state(self, device: str = "cpu") -> dict[str, torch.Tensor]:
        """"embed_tokens.weight", "norm.weight", and "lm_head.weight" when the embeddings are not tied."""
        return self._load(self.path / CLIENT_FILE, device)

    def load_causal_lm(self, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
        """The whole model in this process, as a transformers model (the single-machine baseline)."""
        config = self.load_config()
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        state = {f"model.{key}": value for key, value in self.load_client_state().items()}
        if "model.lm_head.weight" in state:
            state["lm_head.weight"] = state.pop("model.lm_head.weight")
        for index in range(self.num_blocks):
            state.update({f"model.layers.{index}.{key}": value for key, value in self.load_block_state(index).items()})
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its buffers were on meta
        return model.eval()

    def block_nbytes(self, index: int) -> int:
        """Bytes of block `index`'s stored tensors, read from the file header without loading them."""
        return _stored_nbytes(self._block_file(index))

    def _block_file(self, index: int) -> pathlib.Path:
        if not 0 <= index < self.num_blocks:
            raise ModelError(f"block {index} is out of range: {self.manifest.name} has blocks 0-{self.num_blocks - 1}")
        return block_file(self.path, index)

    def _load(self, file: pathlib.Path, device: str) -> dict[str, torch.Tensor]:
        if not file.is_file():
            raise ModelError(f"{file} is missing from the cache; delete {self.path} to convert the model again")
        return load_file(file, device=device)


def _stored_nbytes(file: pathlib.Path) -> int:
    """Sum of the tensor byte ranges in a safetensors header (8-byte little-endian length, then JSON)."""
    try:
        with open(file, "rb") as reader:
            (header_length,) = struct.unpack("<Q", reader.read(8))
            header = json.loads(reader.read(header_length))
    except FileNotFoundError:
        raise ModelError(f"{file} is missing from the cache; delete its model directory to convert again") from None
    except (struct.error, ValueError) as error:
        raise ModelError(f"damaged {file} ({error}); delete its model directory to convert again") from None
    return sum(
        info["data_offsets"][1] - info["data_offsets"][0] for key, info in header.items() if key != "__metadata__"
    )
