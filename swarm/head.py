"""The client's local parts of a model: token embeddings, final norm and LM head.

Built around the tensors read from the checkpoint: no module allocates (and randomly initialises) a weight
of its own first. `nn.Linear(hidden, vocab)` would, and with a 4096-wide model and a 32k vocabulary that
throwaway costs seconds and hundreds of MiB at start-up (benchmarks/client_startup.py).
"""

from __future__ import annotations

import torch
from torch import nn

from swarm.models import BlockCheckpoint


def _rms_norm_class(model_type: str) -> type[nn.Module]:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return LlamaRMSNorm  # Mistral and Qwen2 use the same RMSNorm


class ClientHead(nn.Module):
    """The model's local parts: token embeddings, final norm, LM head."""

    def __init__(self, checkpoint: BlockCheckpoint, config, dtype: torch.dtype):
        super().__init__()
        state = checkpoint.load_client_state()
        embeddings = state.pop("embed_tokens.weight").to(dtype)
        head = state.pop("lm_head.weight").to(dtype) if "lm_head.weight" in state else embeddings  # tied
        self.embed_tokens = nn.Embedding.from_pretrained(embeddings, freeze=True)  # uses the tensor as it is
        with torch.device("meta"):  # shapes only: the weights are the checkpoint's
            self.norm = _rms_norm_class(config.model_type)(config.hidden_size, eps=config.rms_norm_eps)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        self.norm.weight = nn.Parameter(state.pop("norm.weight").to(dtype), requires_grad=False)
        self.lm_head.weight = nn.Parameter(head, requires_grad=False)
        self.eval()

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)  # (batch, tokens, hidden)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: (batch, tokens, hidden) in any float dtype (a reply arrives in the wire dtype)
        return self.forward(hidden)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (batch, tokens, vocab) under autograd (gradients flow to `hidden`; the weights are frozen)."""
        return self.lm_head(self.norm(hidden.to(self.lm_head.weight.dtype)))
