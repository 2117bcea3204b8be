"""int8 (LLM.int8) and nf4 (4-bit NormalFloat) weights through bitsandbytes, on CPU and CUDA.

Every nn.Linear of a loaded block (the factors of a low-rank layer included) is swapped for its bitsandbytes
counterpart; the weights are quantised on the device, a few rows at a time (`quantised_rows`).
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from swarm.errors import ConfigError

logger = logging.getLogger(__name__)

INT8_OUTLIER_THRESHOLD = 6.0  # LLM.int8: input features above this magnitude go through a float matmul
QUANT_CHUNK_WEIGHTS = 1 << 22  # weights quantised per bitsandbytes call (~64 MB of its temporaries)


def _bitsandbytes():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # a CPU kernel package it does not need
            import bitsandbytes
    except ImportError as e:
        raise ConfigError(f"--quant needs bitsandbytes (pip install 'bitsandbytes>=0.48'): {e}") from None
    return bitsandbytes


def quantised_linear(linear: nn.Linear, kind: str, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The bitsandbytes twin of `linear` (weights copied, then quantised on `device`)."""
    bias = None if linear.bias is None else linear.bias.data
    return quantise_weight(linear.weight.data, bias, kind, compute_dtype, device)


def quantise_weight(weight: torch.Tensor, bias: torch.Tensor | None, kind: str, compute_dtype: torch.dtype,
                    device: torch.device) -> nn.Module:
    """A bitsandbytes linear layer holding `weight` (out, in) quantised, on `device`. The weight is quantised
    a few rows at a time (`quantised_rows`): bitsandbytes' CPU path takes ~16 bytes of temporaries per weight."""
    bnb = _bitsandbytes()
    out_features, in_features = weight.shape
    has_bias = bias is not None
    if kind == "int8":
        module = bnb.nn.Linear8bitLt(in_features, out_features, bias=has_bias, device="meta",
                                     has_fp16_weights=False, threshold=INT8_OUTLIER_THRESHOLD)
        codes, scales = quantised_rows(weight, kind, device)
        module.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scales)
    elif kind == "nf4":
        module = bnb.nn.Linear4bit(in_features, out_features, bias=has_bias, device="meta",
                                   compute_dtype=compute_dtype, quant_type="nf4")
        blocksize = module.weight.blocksize
        packed, absmax = quantised_rows(weight, kind, device, blocksize)
        state = _nf4_state(bnb, absmax, weight.shape, blocksize)
        module.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=blocksize,
                                          quant_type="nf4", module=module, bnb_quantized=True)
        module.quant_state = state
        if out_features % 32 or in_features % blocksize:
            # bitsandbytes' packed AVX512-BF16 CPU kernel needs out % 32 == 0 and in % blocksize == 0 (not so
            # for some low-rank factors); such layers take its generic dequantise-then-matmul path instead.
            module.support_avx512bf16_for_cpu = False
    else:
        raise ValueError(f"unknown quantisation {kind!r}")
    if has_bias:
        module.bias = nn.Parameter(bias.to(compute_dtype), requires_grad=False)
    return module.to(device)


def quantised_rows(weight: torch.Tensor, kind: str, device: torch.device, blocksize: int = 64,
                   chunk_weights: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' quantisation of the whole `weight` (int8: codes and row scales; nf4: packed codes and block
    absmax), computed on chunks of rows of about `chunk_weights` weights and joined: the same numbers, since
    int8 scales each row alone and nf4 blocks of `blocksize` consecutive weights never straddle two chunks
    (where the rows cannot hold whole blocks the weight goes in one piece). The float copy each chunk is
    quantised from (float16 for int8, float32 for nf4, as bitsandbytes' own Int8Params / Params4bit) is a chunk's."""
    out_features, in_features = weight.shape
    rows = max(1, (chunk_weights or QUANT_CHUNK_WEIGHTS) // in_features)
    if kind == "nf4" and in_features % blocksize:
        rows = out_features
    codes = scales = None  # filled chunk by chunk (no list of parts to join: that would be a second copy)
    done = 0
    for chunk in weight.split(rows):
        chunk_codes, chunk_scales = _quantised_chunk(chunk, kind, device, blocksize)
        per_row, scales_per_row = chunk_codes.shape[0] // len(chunk), chunk_scales.shape[0] // len(chunk)
        if codes is None:
            if len(chunk) == out_features:
                return chunk_codes, chunk_scales
            codes = chunk_codes.new_empty((per_row * out_features, *chunk_codes.shape[1:]))
            scales = chunk_scales.new_empty((scales_per_row * out_features,))
        codes[per_row * done : per_row * (done + len(chunk))] = chunk_codes
        scales[scales_per_row * done : scales_per_row * (done + len(chunk))] = chunk_scales
        done += len(chunk)
    return codes, scales


def _quantised_chunk(chunk: torch.Tensor, kind: str, device: torch.device, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "int8":
        codes, scales, _ = torch.ops.bitsandbytes.int8_vectorwise_quant.default(chunk.to(device, torch.float16), 0.0)
        return codes, scales
    return torch.ops.bitsandbytes.quantize_4bit.default(chunk.to(device, torch.float32).contiguous(), blocksize, "nf4",
                                                        torch.uint8)


def _nf4_state(bnb, absmax: torch.Tensor, shape: torch.Size, blocksize: int):
    """The QuantState bitsandbytes.functional.quantize_4bit builds for a float32 weight with compressed statistics
    (Params4bit's default): the block absmax, itself quantised in blocks of 256 around its mean."""
    functional = bnb.functional
    offset = absmax.mean()
    quantised_absmax, state2 = functional.quantize_blockwise(absmax - offset, blocksize=256)
    return functional.QuantState(absmax=quantised_absmax, shape=shape, dtype=torch.float32, blocksize=blocksize,
                                 code=functional.get_4bit_type("nf4", device=absmax.device), quant_type="nf4",
                                 offset=offset, state2=state2)


def quantise_layer(layer: nn.Module, kind: str, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Swap every nn.Linear inside `layer` for a quantised one, in place."""
    for name, module in list(layer.named_modules()):
        if type(module) is not nn.Linear:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = layer.get_submodule(parent_name) if parent_name else layer
        setattr(parent, child, quantised_linear(module, kind, compute_dtype, device))
