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
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run blocks [start, end) (global indices; default: the whole span) on `hidden`. `prompts` (end - start,
        prompt_length, hidden): deep prompts, block i's added at its input to positions below prompt_length (of a
        step at `span_input.start_position` p, `prompts[i, p:]` to its first new tokens)."""
        return self._run(hidden, cache, span_input, start, end, prompts)

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

    @torch.inference_mode()
    def forward_batched(
        self,
        hiddens: list[torch.Tensor],
        caches: list[SpanCache],
        span_inputs: list[SpanInput],
        start: int | None = None,
        end: int | None = None,
    ) -> list[torch.Tensor]:
        """Several sessions' steps of the same number of new tokens in one batched run of blocks [start, end).

        Each session keeps its own cache, length, positions and padding: their past keys and values are laid
        side by side (right-padded to the longest and masked out), so the result equals running each alone up
        to floating-point rounding."""
        if len(hiddens) == 1:
            return [self._run(hiddens[0], caches[0], span_inputs[0], start, end)]
        new_tokens = hiddens[0].shape[1]
        if any(h.shape[1] != new_tokens for h in hiddens):
            raise ValueError("batched steps must have the same number of new tokens")
        hidden = torch.cat(hiddens)
        positions, mask, rows = _batched_positions_and_mask(hiddens, caches, span_inputs, hidden.dtype, hidden.device)
        view = _BatchedCache(caches, rows, total=mask.shape[-1])
        output = self._run(hidden, view, span_inputs[0], start, end, positions_and_mask=(positions, mask))
        return [output[r] for r in rows]

    def _run(self, hidden: torch.Tensor, cache: SpanCache | None, span_input: SpanInput, start: int | None,
             end: int | None, prompts: torch.Tensor | None = None,
             positions_and_mask: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
        # hidden: (batch, new_tokens, hidden_size)
        start, end = self._bounds(start, end)
        batch, new_tokens, _ = hidden.shape
        if positions_and_mask is None:
            positions_and_mask = _positions_and_mask(span_input, batch, new_tokens, hidden.dtype, hidden.device)
        position_ids, mask = positions_and_mask
        position_embeddings = self.rotary_emb(hidden, position_ids)
        for index, layer in enumerate(self.layers[start - self.start : end - self.start]):
            if prompts is not None:
                hidden = add_prompt(hidden, prompts[index], span_input.start_position)
            # Positional arguments: the cache keyword is `past_key_values` or `cache` depending on the
            # transformers release, and the first four parameters have kept their order.
            out = layer(hidden, mask, position_ids, cache, position_embeddings=position_embeddings)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


def add_prompt(hidden: torch.Tensor, prompt: torch.Tensor, position: int) -> torch.Tensor:
    """`hidden` (batch, new, hidden), the new tokens of a step at `position`, with one block's deep prompt
    (prompt_length, hidden) added to those below prompt_length: `prompt[position + t]` to token t."""
    count = min(prompt.shape[0] - position, hidden.shape[1])
    if count <= 0:
        return hidden
    return torch.cat([hidden[:, :count] + prompt[position : position + count], hidden[:, count:]], dim=1)


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


class _BatchedCache:
    """The caches of several sessions seen as one (duck-typed like `SpanCache`) by a batched run: each layer's
    new keys and values go into their own session's cache, and the layer attends over all sessions' keys laid
    side by side, right-padded to `total` positions (the padding is masked out)."""

    def __init__(self, caches: list[SpanCache], rows: list[slice], total: int):
        self._caches, self._rows, self._total = caches, rows, total

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        batch, heads, _, dim = key.shape
        keys = key.new_zeros(batch, heads, self._total, dim)
        values = value.new_zeros(batch, heads, self._total, dim)
        for cache, rows in zip(self._caches, self._rows):
            session_keys, session_values = cache.update(key[rows], value[rows], layer_idx)
            length = session_keys.shape[2]
            keys[rows, :, :length] = session_keys
            values[rows, :, :length] = session_values
        return keys, values


def _batched_positions_and_mask(
    hiddens: list[torch.Tensor], caches: list[SpanCache], span_inputs: list[SpanInput], dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, list[slice]]:
    """Position ids (rows, new) and an additive mask (rows, 1, new, longest past + new) for sessions laid side
    by side, and each session's rows."""
    new_tokens = hiddens[0].shape[1]
    total = max(span_input.start_position for span_input in span_inputs) + new_tokens
    positions, masks, rows, first = [], [], [], 0
    for hidden, span_input in zip(hiddens, span_inputs):
        batch = hidden.shape[0]
        own_positions, own_mask = _positions_and_mask(span_input, batch, new_tokens, dtype, device)
        length = span_input.start_position + new_tokens
        mask = torch.full((batch, 1, new_tokens, total), torch.finfo(dtype).min, dtype=dtype, device=device)
        if own_mask is None:  # no padding: causal over this session's own tokens
            query_pos = torch.arange(span_input.start_position, length, device=device)[:, None]
            allowed = torch.arange(length, device=device)[None, :] <= query_pos
            mask[:, :, :, :length].masked_fill_(allowed, 0.0)
        else:
            mask[:, :, :, :length] = own_mask
        positions.append(own_positions)
        masks.append(mask)
        rows.append(slice(first, first + batch))
        first += batch
    return torch.cat(positions), torch.cat(masks), rows
