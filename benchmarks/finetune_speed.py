"""Prompt-tuning speed: training tokens/s through a 3-peer loopback swarm against local training of the same
prompts, side by side in one run.

Both train soft prompts (16 tokens) with Adam on the same batches of the shipped reviews (swarm/data/reviews.jsonl):
locally, the whole default model in this process (float32, transformers, `inputs_embeds`); through the swarm,
`DistributedModelForCausalLM(tuning="prompt")` with peers on 0:10, 10:20, 20:30. Rounds alternate between the two,
so both see the same machine load; a step's tokens are batch x (prompt + sequence) tokens, forward and backward.

With `--micro-batches M` (default 1 and 4) the swarm also runs each batch as M micro-batches sent together, so the
peers work in a pipeline (`train_micro_batches`); each setting is a row.

    python benchmarks/finetune_speed.py [--steps 6] [--rounds 3] [--batch-size 8] [--micro-batches 1 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from peers.local import LocalSwarm
from swarm import DistributedModelForCausalLM
from swarm.client import causal_lm_loss
from swarm.finetune import DEFAULT_DATA, batch_of, encode, load_examples
from swarm.models import DEFAULT_MODEL, open_model

PROMPT_LENGTH = 16


def batches(tokenizer, count: int, size: int):
    examples = load_examples(DEFAULT_DATA)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [encode(tokenizer, e) for e in examples]
    return [batch_of(encoded[i * size:(i + 1) * size], pad) for i in range(count)]


def local_step(model, prompts: torch.Tensor, ids, mask, labels) -> None:
    embeds = model.model.embed_tokens(ids)
    inputs = torch.cat([prompts[None].expand(ids.shape[0], -1, -1), embeds], dim=1)
    full_mask = torch.cat([torch.ones(ids.shape[0], PROMPT_LENGTH, dtype=mask.dtype), mask], dim=1)
    logits = model(inputs_embeds=inputs, attention_mask=full_mask).logits[:, PROMPT_LENGTH:]
    causal_lm_loss(logits, labels).backward()


def timed(steps, train_step) -> float:
    """Training tokens per second over `steps` (each: ids, mask, labels)."""
    tokens, began = 0, time.perf_counter()
    for ids, mask, labels in steps:
        train_step(ids, mask, labels)
        tokens += ids.shape[0] * (ids.shape[1] + PROMPT_LENGTH)
    return tokens / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()

    checkpoint = open_model(DEFAULT_MODEL)
    tokenizer = checkpoint.load_tokenizer()
    local = checkpoint.load_causal_lm(torch.float32)
    local.requires_grad_(False)
    steps = batches(tokenizer, args.steps, args.batch_size)
    with LocalSwarm(model=DEFAULT_MODEL) as swarm:
        swarm.add_peers(*((f"peer-{b}", b, ()) for b in ("0:10", "10:20", "20:30")))
        remote = DistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, [swarm.initial_peers], tuning="prompt",
                                                             prompt_length=PROMPT_LENGTH, spot_checks=False)
        prompts = remote.tuning.prompt_embeddings.detach().clone().requires_grad_(True)
        local_opt = torch.optim.Adam([prompts], lr=0.03)
        remote_opt = torch.optim.Adam(remote.parameters(), lr=0.03)

        def local_train(ids, mask, labels):
            local_opt.zero_grad()
            local_step(local, prompts, ids, mask, labels)
            local_opt.step()

        def remote_train(ids, mask, labels):
            remote_opt.zero_grad()
            remote(ids, attention_mask=mask, labels=labels).loss.backward()
            remote_opt.step()

        try:
            timed(steps[:1], local_train), timed(steps[:1], remote_train)  # warm-up
            rows: dict[str, list[float]] = {"local": [], **{f"swarm{m}": [] for m in args.micro_batches}}
            for _ in range(args.rounds):
                rows["local"].append(timed(steps, local_train))
                for m in args.micro_batches:
                    remote.micro_batches = m
                    rows[f"swarm{m}"].append(timed(steps, remote_train))
        finally:
            remote.shutdown()
    local_speed = statistics.median(rows["local"])
    width = steps[0][0].shape[1]
    print(f"prompt tuning, {DEFAULT_MODEL} float32, {PROMPT_LENGTH} prompt tokens, batches of {args.batch_size} "
          f"(about {width} tokens each), {args.steps} steps per round, median of {args.rounds} rounds")
    print(f"{'setup':<44}{'training tokens/s':>18}{'ratio':>8}")
    print(f"{'local (one process)':<44}{local_speed:>18.0f}{1.0:>8.2f}")
    for m in args.micro_batches:
        speed = statistics.median(rows[f"swarm{m}"])
        setup = f"swarm, 3 peers (loopback), {m} micro-batch{'es' if m > 1 else ''}"
        print(f"{setup:<44}{speed:>18.0f}{speed / local_speed:>8.2f}")

if __name__ == "__main__":
    main()
