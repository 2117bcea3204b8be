"""Activation statistics for activation-aware SVD: the Gram matrix of every linear layer's inputs.

A short calibration text shipped with the package (peers/data/calibration.txt, a public-domain passage) is
run through the dense model block by block, one block in memory at a time; each linear layer of the blocks
wanted records X^T X of its inputs.
"""

from __future__ import annotations

import hashlib
import logging
from importlib import resources

import torch
from torch import nn
from tqdm.auto import tqdm

from swarm.blocks import BlockSpan, SpanInput
from swarm.models import BlockCheckpoint

logger = logging.getLogger(__name__)

CALIBRATION_TOKENS = 512  # enough for a well-conditioned Gram matrix at hidden size ~1k; seconds on a CPU


def calibration_text() -> str:
    return resources.files("peers").joinpath("data/calibration.txt").read_text(encoding="utf-8")


def calibration_digest() -> str:
    """Names the cache of activation-aware factors, so a changed text never reuses stale ones."""
    return hashlib.sha256(calibration_text().encode()).hexdigest()[:8]


def collect_grams(
    checkpoint: BlockCheckpoint, model_config, blocks: list[int], max_tokens: int = CALIBRATION_TOKENS
) -> dict[int, dict[str, torch.Tensor]]:
    """{block: {linear name: X^T X (in, in) float64}} for the given blocks, from the dense float32 model."""
    wanted = set(blocks)
    ids = checkpoint.load_tokenizer()(calibration_text(), return_tensors="pt")["input_ids"][:, :max_tokens]
    embeddings = checkpoint.load_client_state()["embed_tokens.weight"].float()
    hidden = embeddings[ids]  # (1, T, hidden)
    del embeddings
    grams: dict[int, dict[str, torch.Tensor]] = {}
    for index in tqdm(range(max(wanted) + 1), desc="Calibrating", unit="block", leave=False):
        span = BlockSpan(model_config, index, index + 1)
        span.load_blocks(lambda i: {k: v.float() for k, v in checkpoint.load_block_state(i).items()})
        hooks = _record_inputs(span.layers[0], grams.setdefault(index, {})) if index in wanted else []
        hidden = span(hidden, None, SpanInput(None, 0))
        for hook in hooks:
            hook.remove()
    logger.info(f"Calibrated {len(wanted)} blocks on {ids.shape[1]} tokens")
    return {index: grams[index] for index in blocks}


def _record_inputs(layer: nn.Module, into: dict[str, torch.Tensor]) -> list:
    hooks = []
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear):
            def record(_module, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()  # (tokens, in)
                into[name] = into.get(name, 0) + x.T @ x

            hooks.append(module.register_forward_pre_hook(record))
    return hooks
