"""What checking receipts on the token path costs: the client's work per hop-step (one peer's reply to one step).

A client verifies every reply before it uses it (`reputation.verify.receipt_problem`): decode the base64
receipt (msgpack, strict schema), verify its RSA-PSS signature and that the key hashes to the peer's id, and
sha256 the hidden states it sent and got back. This times that, and the peer's signing for comparison, for
hidden sizes of the default model (576), a 1B-class model (2048) and Llama-7B (4096), for one decoded token
and a 128-token prefill, on one thread.

    python benchmarks/receipt_cost.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hivemind.p2p import PeerID  # noqa: E402
from hivemind.utils.crypto import RSAPrivateKey  # noqa: E402

from peers.receipts import ReceiptSigner  # noqa: E402
from reputation.attest import tensor_digest  # noqa: E402
from reputation.checks import decode_receipt  # noqa: E402
from reputation.node import peer_id_of_key  # noqa: E402
from reputation.verify import receipt_problem  # noqa: E402
from swarm.hooks import HopStep  # noqa: E402
from swarm.protocol import StepRequest  # noqa: E402


def per_call_us(function, repeats: int) -> float:
    function()
    began = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - began) / repeats * 1e6


def main() -> None:
    torch.set_num_threads(1)
    key = RSAPrivateKey()
    peer = peer_id_of_key(key)
    signer = ReceiptSigner(key, peer, "model@digest", "float32", "none")
    print(f"{'hidden':>6} {'tokens':>6} | {'verify all':>10} {'decode':>8} {'signature':>9} {'digests':>8} | "
          f"{'peer signs':>10}   (microseconds per hop-step, one thread)")
    for hidden in (576, 2048, 4096):
        for tokens in (1, 128):
            x, y = torch.randn(1, tokens, hidden), torch.randn(1, tokens, hidden)
            meta = StepRequest(session_id="s" * 32, start=0, end=10, position=7, max_length=2048)
            text = signer.sign(meta.session_id, 3, 0, 10, tokens, x, y)
            sent = HopStep(PeerID.from_base58(peer), meta, step=3, tokens=tokens)
            assert receipt_problem(text, sent, x, y) is None
            receipt = decode_receipt(text)
            repeats = 400 if tokens == 1 else 100
            total = per_call_us(lambda: receipt_problem(text, sent, x, y), repeats)
            decode = per_call_us(lambda: decode_receipt(text), repeats)
            signature = per_call_us(receipt.verify, repeats)
            digests = per_call_us(lambda: (tensor_digest(x), tensor_digest(y)), repeats)
            sign = per_call_us(lambda: signer.sign(meta.session_id, 3, 0, 10, tokens, x, y), repeats // 4)
            print(f"{hidden:>6} {tokens:>6} | {total:>10.0f} {decode:>8.0f} {signature:>9.0f} {digests:>8.0f} | "
                  f"{sign:>10.0f}")


if __name__ == "__main__":
    main()
