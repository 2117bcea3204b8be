"""How far honest peers' backward passes disagree, per pair of declared dtypes, on the real default model.

For each span (0:10, 10:20, 20:30, 0:30) and each of several chat prompts (with soft prompts before them), the
gradient a peer returns for a backward (`peers.training.train_step`, as `rpc_train` runs it) is computed in float32
and in bfloat16 from the same inputs and output gradient (the real ones: the next-token loss's gradient at that
span's output). Printed per pair: the worst relative L2 between the two input gradients and the worst token
cosine, the figures `reputation/gradients.py`'s tolerances are calibrated from.

    python benchmarks/gradient_tolerance.py [--prompts 8]
"""

from __future__ import annotations

import argparse
import itertools

import torch

from peers.training import train_step
from reputation.gradients import compare_gradients
from swarm.blocks import BlockSpan
from swarm.client import causal_lm_loss
from swarm.finetune import DEFAULT_DATA, encode, load_examples
from swarm.models import DEFAULT_MODEL, open_model
from swarm.protocol import TrainRequest

SPANS = ((0, 10), (10, 20), (20, 30), (0, 15), (15, 30), (0, 30))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    args = parser.parse_args()
    checkpoint = open_model(DEFAULT_MODEL)
    tokenizer, local = checkpoint.load_tokenizer(), checkpoint.load_causal_lm(torch.float32)
    local.requires_grad_(False)
    config = checkpoint.load_config()
    spans = {}
    for (start, end), (name, dtype) in itertools.product(SPANS, DTYPES.items()):
        span = BlockSpan(config, start, end)
        span.load_blocks(lambda i: {k: v.to(dtype) for k, v in checkpoint.load_block_state(i).items()})
        spans[(start, end, name)] = span
    worst: dict[tuple[str, str], list[float]] = {}
    for whole, example in itertools.product((False, True), load_examples(DEFAULT_DATA)[: args.prompts]):
        ids, labels = encode(tokenizer, example)
        ids, labels = torch.tensor([ids]), torch.tensor([labels])
        if whole:  # the loss on every token, not only the answer's
            labels = ids.clone()
        prompt = local.model.embed_tokens.weight[torch.randint(0, 1000, (16,))].clone()
        hidden = torch.cat([prompt[None], local.model.embed_tokens(ids)], dim=1)
        # the real gradients at every block boundary, from the loss through the whole local model
        boundaries = [hidden.requires_grad_(True)]
        out = hidden
        position_ids = torch.arange(out.shape[1])[None]
        embeddings = local.model.rotary_emb(out, position_ids)
        for layer in local.model.layers:
            out = layer(out, None, position_ids, None, position_embeddings=embeddings)
            out = out[0] if isinstance(out, tuple) else out
            out.retain_grad()
            boundaries.append(out)
        logits = local.lm_head(local.model.norm(out))[:, 16:]
        causal_lm_loss(logits, labels).backward()
        for start, end in SPANS:
            inputs, grad = boundaries[start].detach(), boundaries[end].grad.detach()
            meta = TrainRequest(kind="backward", request_id="c", start=start, end=end, tensors=2)
            grads = {name: train_step(spans[(start, end, name)], meta, inputs, grad, None, None, torch.device("cpu"),
                                      dtype)[0] for name, dtype in DTYPES.items()}
            for a, b in (("fp32", "fp32"), ("fp32", "bf16"), ("bf16", "bf16")):
                agreement = compare_gradients(grads[a], grads[b])
                row = worst.setdefault((a, b), [0.0, 1.0, 0])
                row[0], row[1], row[2] = max(row[0], agreement.rel_l2), min(row[1], agreement.min_token_cosine), row[2] + 1
    print(f"honest backward disagreement, {DEFAULT_MODEL}, spans {' '.join(f'{s}:{e}' for s, e in SPANS)}, "
          f"{args.prompts} reviews with 16 soft-prompt tokens, gradients of the next-token loss on the answer and, "
          f"separately, on every token")
    print(f"{'pair':<12}{'comparisons':>12}{'worst rel L2':>14}{'worst cosine':>14}")
    for (a, b), (rel, cos, count) in worst.items():
        print(f"{a + '/' + b:<12}{count:>12}{rel:>14.5f}{cos:>14.5f}")


if __name__ == "__main__":
    main()
