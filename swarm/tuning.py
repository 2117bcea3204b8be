"""What a client trains while the peers' weights stay frozen: soft prompts, and optionally deep prompts.

- "prompt" (prompt tuning): `prompt_length` trainable embeddings put before every input's tokens.
- "deep_prompt": the same, plus a trainable prompt per block, added to the first `prompt_length` positions of
  that block's input (the peers add them; the client sends each hop its blocks' prompts with every pass).

Saved as peft saves prompt tuning: `adapter_config.json` (a `peft.PromptTuningConfig`) and
`adapter_model.safetensors` with "prompt_embeddings", so `peft.PeftModel.from_pretrained` loads soft prompts onto
the whole model in one process too. Deep prompts have no peft counterpart; they go beside, in
`deep_prompts.safetensors`.
"""

from __future__ import annotations

import json
import pathlib

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from swarm.errors import ConfigError

TUNING_KINDS = ("prompt", "deep_prompt")
CONFIG_FILE, WEIGHTS_FILE, DEEP_FILE = "adapter_config.json", "adapter_model.safetensors", "deep_prompts.safetensors"


class PromptTuning(nn.Module):
    def __init__(self, kind: str, prompt_length: int, hidden_size: int, num_blocks: int,
                 init: torch.Tensor | None = None):
        super().__init__()
        if kind not in TUNING_KINDS:
            raise ConfigError(f"unknown tuning {kind!r}: choose one of {', '.join(TUNING_KINDS)}")
        if prompt_length < 1:
            raise ConfigError(f"prompt_length must be at least 1, not {prompt_length}")
        self.kind, self.prompt_length, self.num_blocks = kind, prompt_length, num_blocks
        if init is None:
            init = torch.randn(prompt_length, hidden_size) * 0.02
        self.prompt_embeddings = nn.Parameter(init.detach().clone().float())  # (length, hidden)
        self.deep_prompts = (nn.Parameter(torch.zeros(num_blocks, prompt_length, hidden_size))
                             if kind == "deep_prompt" else None)  # (blocks, length, hidden)

    @property
    def deep(self) -> bool:
        return self.deep_prompts is not None

    def save(self, directory: str | pathlib.Path, base_model: str = "") -> pathlib.Path:
        from peft import PromptTuningConfig

        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=self.prompt_length,
                                    token_dim=self.prompt_embeddings.shape[1], num_layers=self.num_blocks,
                                    num_transformer_submodules=1, base_model_name_or_path=base_model or None)
        config.save_pretrained(str(directory))
        save_file({"prompt_embeddings": self.prompt_embeddings.detach().contiguous()}, str(directory / WEIGHTS_FILE))
        if self.deep_prompts is not None:
            save_file({"deep_prompts": self.deep_prompts.detach().contiguous()}, str(directory / DEEP_FILE))
        return directory

    def check_fits(self, hidden_size: int, num_blocks: int, source: str = "the prompts") -> None:
        """`ConfigError` unless these prompts fit a model of `hidden_size` and `num_blocks` blocks (prompts saved
        for another model would otherwise reach the peers, which refuse them)."""
        width = self.prompt_embeddings.shape[1]
        if width != hidden_size:
            raise ConfigError(f"{source} are {width} wide, but the model's hidden size is {hidden_size}")
        if self.deep_prompts is not None and self.deep_prompts.shape[0] != num_blocks:
            raise ConfigError(f"{source} hold deep prompts for {self.deep_prompts.shape[0]} blocks, but the model "
                              f"has {num_blocks}")

    @classmethod
    def load(cls, directory: str | pathlib.Path) -> PromptTuning:
        directory = pathlib.Path(directory)
        try:
            config = json.loads((directory / CONFIG_FILE).read_text())
            prompts = load_file(str(directory / WEIGHTS_FILE))["prompt_embeddings"]
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"{directory} holds no prompts saved by this project or peft ({e})") from None
        if config.get("peft_type") != "PROMPT_TUNING":
            raise ConfigError(f"{directory} holds a {config.get('peft_type')} adapter, not prompt tuning")
        deep_file = directory / DEEP_FILE
        deep = load_file(str(deep_file))["deep_prompts"] if deep_file.is_file() else None
        num_blocks = deep.shape[0] if deep is not None else int(config.get("num_layers") or 0)
        tuning = cls("deep_prompt" if deep is not None else "prompt", prompts.shape[0], prompts.shape[1],
                     num_blocks, init=prompts)
        if deep is not None:
            tuning.deep_prompts.data.copy_(deep)
        return tuning
