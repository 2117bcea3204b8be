"""Receipts on the token path: does a hop's reply carry a valid receipt for exactly the step it was sent?

A client checks this for every reply before it uses it (`reputation.client.ClientTrust.verify`). A receipt
must decode, verify (signature, integrity, the key hashing to the signer's id), be signed by the peer that
sent the reply, name the session, blocks and step the client asked for, carry the digests of the tensors
the client sent (the deep prompts too, when the step carried some) and received, and claim no more work (cumulative batch x tokens) than the client sent that
peer on that stream. Anything else is the peer's fault: no unverifiable work is used or paid for.

Cost per hop-step of one decoded token, on one CPU core (`benchmarks/receipt_cost.py`, Ed25519 receipts): about
0.1 ms (decoding 0.015 ms, the signature 0.07 ms with each peer's receipt-key certificate checked once, the two
sha256 digests 0.01-0.02 ms at hidden sizes 576-4096); the peer signs in 0.05-0.06 ms. A 128-token prefill at
hidden size 4096 costs about 2 ms, nearly all digests.
"""

from __future__ import annotations

import torch

from reputation.attest import Check, Receipt, tensor_digest
from reputation.checks import decode_receipt
from swarm.hooks import HopStep
from swarm.protocol import inputs_digest


def receipt_problem(text: str, sent: HopStep, inputs: torch.Tensor, output: torch.Tensor) -> str | None:
    """What is wrong with the receipt `text` (base64) for the step `sent` that took `inputs` and returned
    `output`, in one line; None when it is valid for exactly that step."""
    if not text:
        return "no receipt"
    receipt = decode_receipt(text)
    if receipt is None:
        return "the receipt cannot be decoded"
    return (signature_problem(receipt, str(sent.peer_id)) or work_problem(receipt, sent)
            or tensor_problem(receipt, inputs, output, sent.prompts))


def work_problem(receipt: Receipt, sent: HopStep) -> str | None:
    """The receipt names other work than `sent`, or claims more tokens than were sent (inflation)."""
    request = sent.request
    if receipt.session_id != request.session_id:
        return f"the receipt is for session {receipt.session_id[:16]!r}, not this one"
    if (receipt.block_start, receipt.block_end) != (request.start, request.end):
        return f"the receipt is for blocks {receipt.block_start}:{receipt.block_end}, not {request.start}:{request.end}"
    if receipt.step != sent.step:
        return f"the receipt is for step {receipt.step}, not {sent.step}"
    if receipt.tokens > sent.tokens:
        return f"the receipt claims {receipt.tokens} tokens of work, but {sent.tokens} were sent (inflated)"
    return None


def signature_problem(receipt: Receipt, sender: str) -> str | None:
    if receipt.signer != sender:
        return f"the receipt is signed by {receipt.signer}, not by the peer that replied"
    result = receipt.verify()
    return None if result is Check.OK else f"the receipt does not verify ({result.value})"


def tensor_problem(receipt: Receipt, inputs: torch.Tensor, output: torch.Tensor,
                   prompts: torch.Tensor | None = None) -> str | None:
    if receipt.input_digest != inputs_digest(inputs, prompts):
        what = "hidden states" if prompts is None else "hidden states and deep prompts"
        return f"the receipt's input digest does not match the {what} sent"
    if receipt.output_digest != tensor_digest(output):
        return "the receipt's output digest does not match the hidden states returned"
    return None
