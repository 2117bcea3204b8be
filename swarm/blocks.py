"""A contiguous span of transformer blocks built from transformers' own layer classes.

Peers use it to serve blocks; spot checks use it to re-compute a peer's work. The span owns no
session state: the KV cache is a separate `SpanCache` passed into every call, so one span serves
many sessions at once.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import PretrainedConfig

from swarm.errors import UnsupportedModelError

logger = logging.getLogger(__name__)


def _layer_classes(model_type: str) -> tuple[type[nn.Module], type[nn.Module]]:
    """(decoder layer class, rotary embedding class) for a supported model type."""
    if model_type == "llama":
        from transformers.models.llama import modeling_llama as m

        return m.LlamaDecoderLayer, m.LlamaRotaryEmbedding
    if model_type == "mistral":
        from transformers.models.mistral import modeling_mistral as m

        return m.MistralDecoderLayer, m.MistralRotaryEmbedding
    if model_type == "qwen2":
        from transformers.models.qwen2 import modeling_qwen2 as m

        return m.Qwen2DecoderLayer, m.Qwen2RotaryEmbedding
    raise UnsupportedModelError(f"model type {model_type!r} is not supported (llama, mistral, qwen2 are)")


class SpanCache:
    """Keys and values of every layer of a span for one session, grown in place as tokens arrive.

    Duck-types the part of transformers' `Cache` that attention layers call (`update`), so the
    layer code is used unchanged. Buffers grow by doubling, so a step costs O(new tokens), not a
    copy of the whole cache.
    """

    def __init__(self, num_layers: int, first_layer: int = 0):
        self._first = first_layer  # layer_idx of the first layer this cache holds
        self._keys: list[torch.Tensor | None] = [None] * num_layers
        self._values: list[torch.Tensor | None] = [None] * num_layers
        self._length = [0] * num_layers

    @property
    def length(self) -> int:
        """Number of tokens held (the same for every layer between steps)."""
        return self._length[0]

    @property
    def nbytes(self) -> int:
        held = [t for t in self._keys + self._values if t is not None]
        return sum(t.numel() * t.element_size() for t in held)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key, value: (batch, kv_heads, new_tokens, head_dim)
        layer_idx -= self._first
        start, new = self._length[layer_idx], key.shape[2]
        buffer = self._keys[layer_idx]
        if buffer is None or buffer.shape[2] < start + new:
            self._grow(layer_idx, key, value, needed=start + new)
        self._keys[layer_idx][:, :, start : start + new] = key
        self._values[layer_idx][:, :, start : start + new] = value
        self._length[layer_idx] = start + new
        end = start + new
        return self._keys[layer_idx][:, :, :end], self._values[layer_idx][:, :, :end]

    def _grow(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, needed: int) -> None:
        capacity = max(needed, 2 * (self._keys[layer_idx].shape[2] if self._keys[layer_idx] is not None else 16))
        for store, sample in ((self._keys, key), (self._values, value)):
            batch, heads, _, dim = sample.shape
            grown = sample.new_empty(batch, heads, capacity, dim)
            old = store[layer_idx]
            if old is not None:
                grown[:, :, : self._length[layer_idx]] = old[:, :, : self._length[layer_idx]]
            store[layer_idx] = grown

    def crop(self, length: int) -> None:
        """Forget every token from position `length` on (used to roll a session back)."""
        self._length = [min(current, length) for current in self._length]


@dataclass(frozen=True)
class SpanInput:
    """What one call of a span needs besides the hidden states."""

    attention_mask: torch.Tensor | None  # (batch, past + new) of 0/1, or None when nothing is padded
    start_position: int  # tokens already in the cache


class BlockSpan(nn.Module):
    """Blocks [start, end) of a model. Layer indices inside the span are local (0..k-1)."""

    def __init__(self, config: PretrainedConfig, start: int, end: int):
        super().__init__()
        if not 0 <= start < end <= config.num_hidden_layers:
            raise ValueError(f"invalid block span {start}:{end} for a model of {config.num_hidden_layers} blocks")
        config = copy.deepcopy(config)  # the caller's config (maybe shared with a whole model) stays as it was
        config._attn_implementation = "sdpa"
        layer_cls, rotary_cls = _layer_classes(config.model_type)
        self.start, self.end = start, end
        self.layers = nn.ModuleList()
        for local_idx, global_idx in enumerate(range(start, end)):
            with torch.device("meta"):  # weights come from load_blocks; skip random initialisation
                layer = layer_cls(config, layer_idx=global_idx)  # global index picks per-layer settings
            layer.self_attn.layer_idx = local_idx  # local index addresses the span's cache
            self.layers.append(layer)
        self.rotary_emb = rotary_cls(config=config)

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    def load_blocks(self, load_state: Callable[[int], dict[str, torch.Tensor]]) -> None:
        """Load each block's weights from `load_state(global_index)`; strict about missing keys."""
        for local_idx, layer in enumerate(self.layers):
            state = load_state(self.start + local_idx)
            missing, unexpected = layer.load_state_dict(state, strict=False, assign=True)
            if missing or unexpected:
                raise ValueError(f"block {self.start + local_idx}: missing {missing}, unexpected {unexpected}")
            layer.requires_grad_(False)  # frozen: a backward pass computes gradients of inputs and prompts only

    def release(self) -> None:
        """Drop the weights (the span can no longer compute)."""
        self.layers = nn.ModuleList()

    def new_cache(self, start: int | None = None, end: int | None = None) -> SpanCache:
        """An empty cache for blocks [start, end) of this span (global indices; default: all)."""
        start, end = self._bounds(start, end)
        return SpanCache(end - start, first_layer=start - self.start)

    def _bounds(self, start: int | None, end: int | None) -> tuple[int, int]:
        start = self.start if start is None else start
        end = self.end if end is None else end
        if not self.start <= start < end <= self.end:
            raise ValueError(f"blocks {start}:{end} are outside this span {self.start}:{self.end}")
        return start, end

    @torch.inference_mode()
    def forward(
        self,
        hidden: torch.Tensor,
        cache: SpanCache | None,
        span_input: SpanInput,
        start: int | None = None,
        end: int | None = None,
    ) -> torch.Tensor:
        """Run blocks [start, end) (global indices; default: the whole span) on `hidden`."""
        return self._run(hidden, cache, span_input, start, end)

    def forward_train(
        self,
        hidden: torch.Tensor,
        span_input: SpanInput,
        start: int | None = None,
        end: int | None = None,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Blocks [start, end) on whole sequences, without a cache, under autograd (gradients flow to `hidden`
        and `prompts`, never to the frozen weights). `prompts` (end - start, prompt_length, hidden): deep prompts,
        block i's added to the first prompt_length positions of its input."""
        return self._run(hidden, None, span_input, start, end, prompts)

    def _run(self, hidden: torch.Tensor, cache: SpanCache | None, span_input: SpanInput, start: int | None,
             end: int | None, prompts: torch.Tensor | None = None) -> torch.Tensor:
        # hidden: (batch, new_tokens, hidden_size)
        start, end = self._bounds(start, end)
        batch, new_tokens, _ = hidden.shape
        position_ids, mask = _positions_and_mask(span_input, batch, new_tokens, hidden.dtype, hidden.device)
        position_embeddings = self.rotary_emb(hidden, position_ids)
        for index, layer in enumerate(self.layers[start - self.start : end - self.start]):
            if prompts is not None:
                length = prompts.shape[1]
                hidden = torch.cat([hidden[:, :length] + prompts[index], hidden[:, length:]], dim=1)
            # Positional arguments: the cache keyword is `past_key_values` or `cache` depending on the
            # transformers release, and the first four parameters have kept their order.
            out = layer(hidden, mask, position_ids, cache, position_embeddings=position_embeddings)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


def _positions_and_mask(
    span_input: SpanInput, batch: int, new_tokens: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Position ids (batch, new) and an additive attention mask (batch, 1, new, past + new) or None.

    Mirrors transformers' generation: with left padding, positions count only real tokens; without
    padding the mask is None where causal attention needs none (the same kernels as a local run).
    """
    start = span_input.start_position
    if span_input.attention_mask is None:
        positions = torch.arange(start, start + new_tokens, device=device).expand(batch, -1)
        if new_tokens == 1 or start == 0:
            return positions, None  # sdpa's is_causal (or no mask at all) is exact here
        # Several new tokens after a cached prefix: sdpa's is_causal would align the causal mask to the
        # top-left corner, so spell the mask out.
        padding = torch.ones(batch, start + new_tokens, dtype=torch.long, device=device)
    else:
        padding = span_input.attention_mask.to(device=device, dtype=torch.long)  # (batch, past + new)
    positions = (padding.cumsum(-1) - 1).masked_fill(padding == 0, 1)[:, -new_tokens:]
    total = padding.shape[1]
    query_pos = torch.arange(start, start + new_tokens, device=device)[:, None]
    key_pos = torch.arange(total, device=device)[None, :]
    allowed = (key_pos <= query_pos)[None, :, :] & padding.bool()[:, None, :]  # (batch, new, total)
    mask = torch.zeros(batch, 1, new_tokens, total, dtype=dtype, device=device)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return positions, mask
