"""Tests of peers.loading: the compute dtype a span is built in, and quantisation one linear layer at a time."""

from __future__ import annotations

import pathlib
import weakref

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from peers import loading
from peers.compression.quant import quantise_layer
from peers.config import PeerConfig
from swarm.blocks import BlockSpan, SpanInput
from swarm.models import open_model
from swarm.models.layout import block_file
from swarm.models.tensorfile import TensorFile

SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=64)


def checkpoint_of(directory: pathlib.Path, dtype: torch.dtype):
    torch.manual_seed(0)
    source = directory / f"tiny-{str(dtype).removeprefix('torch.')}"
    AutoModelForCausalLM.from_config(LlamaConfig(**SMALL)).to(dtype).save_pretrained(source)
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(source)
    checkpoint = open_model(str(source), cache_dir=directory / "cache", show_progress=False)
    return checkpoint, checkpoint.load_config()


def test_tensor_file_reads_each_tensor_as_stored(tmp_path):
    checkpoint, _ = checkpoint_of(tmp_path, torch.bfloat16)
    expected = checkpoint.load_block_state(1)
    with TensorFile(block_file(checkpoint.path, 1)) as tensors:
        assert sorted(tensors.keys()) == sorted(expected)
        for name, tensor in expected.items():
            read = tensors.read(name)
            assert read.dtype == torch.bfloat16 and torch.equal(read, tensor)
            assert tensors.meta_state()[name].shape == tensor.shape


@pytest.mark.parametrize("stored, dtype, expected", [
    (torch.bfloat16, "auto", torch.bfloat16),  # a bf16 checkpoint is not widened to float32 on CPU
    (torch.float32, "auto", torch.float32),
    (torch.bfloat16, "float32", torch.float32),  # an explicit --dtype wins
])
def test_a_span_is_built_in_the_checkpoints_dtype_unless_told_otherwise(tmp_path, stored, dtype, expected):
    checkpoint, config = checkpoint_of(tmp_path, stored)
    span = loading.build_span(checkpoint, config, 0, 2, PeerConfig(model="m", initial_peers=(), dtype=dtype))
    assert {p.dtype for p in span.parameters()} == {expected}


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_a_block_is_quantised_one_linear_layer_at_a_time(tmp_path, monkeypatch, kind):
    checkpoint, config = checkpoint_of(tmp_path, torch.bfloat16)
    alive: set[int] = set()  # ids of the dense matrices read from the file and not yet freed
    most_alive: list[int] = []
    read = TensorFile.read

    def tracked_read(self, name):
        tensor = read(self, name)
        if tensor.dim() == 2:
            alive.add(id(tensor))
            weakref.finalize(tensor, alive.discard, id(tensor))
        return tensor

    def tracked_quantise(*args):
        most_alive.append(len(alive))
        return quantise_weight(*args)

    quantise_weight = loading.quantise_weight
    monkeypatch.setattr(TensorFile, "read", tracked_read)
    monkeypatch.setattr(loading, "quantise_weight", tracked_quantise)
    span = loading.build_span(checkpoint, config, 0, 2, PeerConfig(model="m", initial_peers=(), quant=kind))
    assert len(most_alive) == 2 * 7 and max(most_alive) == 1  # every linear layer; one dense matrix at a time
    assert not alive  # none is left behind

    dense = BlockSpan(config, 0, 2)  # the old way: the whole block dense, then quantised
    dense.load_blocks(checkpoint.load_block_state)
    for layer in dense.layers:
        quantise_layer(layer, kind, torch.bfloat16, torch.device("cpu"))
    hidden = torch.randn(1, 5, SMALL["hidden_size"], dtype=torch.bfloat16)
    with torch.inference_mode():
        produced = span(hidden, None, SpanInput(None, 0))
        assert torch.equal(produced, dense.eval()(hidden, None, SpanInput(None, 0)))
