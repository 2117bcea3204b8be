"""Signed receipts for the work a peer returns (the trust layer's evidence and the ledger's unit of pay)."""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass

import torch
from hivemind.utils.crypto import RSAPrivateKey

from reputation.attest import Receipt, tensor_digest
from swarm.protocol import inputs_digest


@dataclass(frozen=True)
class ReceiptSigner:
    private_key: RSAPrivateKey  # the peer's identity key (its peer id derives from it)
    peer_id: str  # base58
    dht_prefix: str
    dtype: str  # declared compute dtype
    compression: str  # declared weight compression ("none", "nf4", ...)

    def sign(
        self, session_id: str, step: int, start: int, end: int, tokens: int, inputs: torch.Tensor, output: torch.Tensor,
        prompts: torch.Tensor | None = None,
    ) -> str:
        """base64 of the signed receipt for returning `output` computed from `inputs` (and the deep prompts
        `prompts`, when the request carried some) on blocks [start, end)."""
        receipt = Receipt(
            session_id=session_id,
            step=step,
            dht_prefix=self.dht_prefix,
            block_start=start,
            block_end=end,
            tokens=tokens,
            dtype=self.dtype,
            compression=self.compression,
            input_digest=inputs_digest(inputs, prompts),
            output_digest=tensor_digest(output),
            signer=self.peer_id,
            signed_at=time.time(),
        ).sign(self.private_key)
        return base64.b64encode(receipt.encode()).decode()
