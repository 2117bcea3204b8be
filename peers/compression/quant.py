"""int8 (LLM.int8) and nf4 (4-bit NormalFloat) weights through bitsandbytes, on CPU and CUDA.

Every nn.Linear of a loaded block (the factors of a low-rank layer included) is swapped for its bitsandbytes
counterpart; the weights are quantised when the module is moved to its device.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from swarm.errors import ConfigError

logger = logging.getLogger(__name__)

INT8_OUTLIER_THRESHOLD = 6.0  # LLM.int8: input features above this magnitude go through a float matmul


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
    """A bitsandbytes linear layer holding `weight` (out, in) quantised on `device`; the float copy bitsandbytes
    quantises from (float32 for nf4, float16 for int8) lives only until it is quantised."""
    bnb = _bitsandbytes()
    out_features, in_features = weight.shape
    weight = weight.to("cpu", torch.float32 if kind == "nf4" else torch.float16)
    has_bias = bias is not None
    if kind == "int8":
        module = bnb.nn.Linear8bitLt(in_features, out_features, bias=has_bias, device="meta",
                                     has_fp16_weights=False, threshold=INT8_OUTLIER_THRESHOLD)
        module.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    elif kind == "nf4":
        module = bnb.nn.Linear4bit(in_features, out_features, bias=has_bias, device="meta",
                                   compute_dtype=compute_dtype, quant_type="nf4")
        module.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        if out_features % 32 or in_features % module.weight.blocksize:
            # bitsandbytes' packed AVX512-BF16 CPU kernel needs out % 32 == 0 and in % blocksize == 0 (not so
            # for some low-rank factors); such layers take its generic dequantise-then-matmul path instead.
            module.support_avx512bf16_for_cpu = False
    else:
        raise ValueError(f"unknown quantisation {kind!r}")
    del weight  # the module holds the float copy until .to() below quantises it
    if has_bias:
        module.bias = nn.Parameter(bias.to(compute_dtype), requires_grad=False)
    return module.to(device)


def quantise_layer(layer: nn.Module, kind: str, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Swap every nn.Linear inside `layer` for a quantised one, in place."""
    for name, module in list(layer.named_modules()):
        if type(module) is not nn.Linear:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = layer.get_submodule(parent_name) if parent_name else layer
        setattr(parent, child, quantised_linear(module, kind, compute_dtype, device))
