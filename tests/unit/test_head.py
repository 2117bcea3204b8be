"""Tests of swarm.head: the client's embeddings, final norm and LM head, built from the checkpoint's tensors."""

from __future__ import annotations

import pathlib

import pytest
import torch
from tokenizers import Tokenizer, models
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from swarm.head import ClientHead
from swarm.models import open_model

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300)


class OldClientHead(nn.Module):
    """The construction ClientHead replaced (a randomly initialised nn.Linear whose weight is then swapped)."""

    def __init__(self, checkpoint, config, dtype: torch.dtype):
        super().__init__()
        state = checkpoint.load_client_state()
        self.embed_tokens = nn.Embedding.from_pretrained(state["embed_tokens.weight"].to(dtype), freeze=True)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm.load_state_dict({"weight": state["norm.weight"].to(dtype)})
        head = state.get("lm_head.weight", state["embed_tokens.weight"]).to(dtype)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        self.lm_head.weight = nn.Parameter(head, requires_grad=False)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))


def tiny_checkpoint(directory: pathlib.Path, tied: bool, dtype: torch.dtype = torch.float32):
    torch.manual_seed(3)
    source = directory / ("tied" if tied else "untied")
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SMALL, tie_word_embeddings=tied)).to(dtype)
    model.save_pretrained(source)
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(source)
    checkpoint = open_model(str(source), cache_dir=directory / "cache", show_progress=False)
    return checkpoint, checkpoint.load_config(), model


@pytest.mark.parametrize("tied", [True, False])
def test_outputs_are_bit_identical_to_the_old_construction_and_to_transformers(tmp_path, tied):
    checkpoint, config, model = tiny_checkpoint(tmp_path, tied)
    head = ClientHead(checkpoint, config, torch.float32)
    old = OldClientHead(checkpoint, config, torch.float32)
    ids = torch.tensor([[5, 17, 299, 0]])
    assert torch.equal(head.embed(ids), old.embed_tokens(ids))
    assert torch.equal(head.embed(ids), model.model.embed_tokens(ids))
    hidden = torch.randn(2, 3, SMALL["hidden_size"])
    with torch.inference_mode():
        assert torch.equal(head.logits(hidden), old.logits(hidden))
        assert torch.equal(head.logits(hidden), model.lm_head(model.model.norm(hidden)))
    assert head.logits(hidden).shape == (2, 3, SMALL["vocab_size"])


def test_the_head_uses_the_loaded_tensors(tmp_path):
    checkpoint, config, _ = tiny_checkpoint(tmp_path, tied=True)
    head = ClientHead(checkpoint, config, torch.float32)
    assert head.lm_head.weight.data_ptr() == head.embed_tokens.weight.data_ptr()  # tied: one tensor, no copy
    assert all(p.device.type == "cpu" and not p.requires_grad for p in head.parameters())


def test_a_float16_checkpoint_serves_a_float16_or_float32_client(tmp_path):
    checkpoint, config, _ = tiny_checkpoint(tmp_path, tied=False, dtype=torch.float16)
    old = OldClientHead(checkpoint, config, torch.float32)
    head = ClientHead(checkpoint, config, torch.float32)
    hidden = torch.randn(1, 2, SMALL["hidden_size"])
    with torch.inference_mode():
        assert torch.equal(head.logits(hidden), old.logits(hidden))
    half = ClientHead(checkpoint, config, torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    assert half.logits(hidden.half()).dtype == torch.float16
