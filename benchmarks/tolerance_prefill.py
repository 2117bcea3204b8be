"""How far honest peers of each pair of configurations disagree on whole prompts (a session's first step), on the
real default model: the prefill side of the spot checks' calibration (reputation.tolerance.HONEST_DISAGREEMENT).

`benchmarks/tolerance_pairs.py` measures one-token decode steps of plain text. A check of a session's first step
compares a whole chat prompt instead, system prompt included, and some tokens there are far from the decode
figures (nf4 against any other quantisation at one token of the default system prompt). Each configuration
loads all blocks as a peer does (peers.loading.build_span) and runs ten chat prompts at once from the same
float32 embeddings; each pair is compared the way `reputation.tolerance.compare_updates` compares a step: the
worst token's cosine between the updates (output - input), and the relative L2 of the whole step's update.

    python benchmarks/tolerance_prefill.py            # ~10 min on 2 busy CPU cores
    python benchmarks/tolerance_prefill.py --quick    # float32 / bfloat16 only
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peers.config import PeerConfig  # noqa: E402
from peers.loading import build_span  # noqa: E402
from reputation.tolerance import compare_updates  # noqa: E402
from swarm.blocks import SpanInput  # noqa: E402
from swarm.head import ClientHead  # noqa: E402
from swarm.models import DEFAULT_MODEL, open_model  # noqa: E402

QUESTIONS = (
    "What is the capital of France?",
    "Name three primary colours.",
    "Explain in one sentence why the sky is blue.",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "What is 12 times 7?",
    "Give me a synonym for happy.",
    "Who wrote Romeo and Juliet?",
    "Translate 'good morning' into Spanish.",
    "What does a CPU do? Answer briefly, for a child who has never seen a computer before.",
)
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def name(dtype: str, quant: str) -> str:
    return SHORT[dtype] + ("" if quant == "none" else f"+{quant}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    checkpoint = open_model(DEFAULT_MODEL)
    model_config, tokenizer, n = checkpoint.load_config(), checkpoint.load_tokenizer(), checkpoint.num_blocks
    head = ClientHead(checkpoint, model_config, torch.float32)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"] for q in QUESTIONS]
    dtypes = ("float32", "bfloat16") if args.quick else tuple(SHORT)
    quants = ("none",) if args.quick else ("none", "int8", "nf4")
    configs = [(d, q) for d in dtypes for q in quants]
    began = time.perf_counter()
    outputs: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.inference_mode():
        for dtype, quant in configs:
            cfg = PeerConfig(model=DEFAULT_MODEL, initial_peers=(), dtype=dtype, quant=quant)
            span = build_span(checkpoint, model_config, 0, n, cfg)
            for i, ids in enumerate(prompts):
                hidden = head.embed(ids)
                outputs[(dtype, quant, i)] = (hidden, span(hidden.to(cfg.torch_dtype()), None, SpanInput(None, 0), 0, n).float())
            del span
            print(f"  ran {name(dtype, quant)} ({time.perf_counter() - began:.0f} s)", file=sys.stderr)
    print(f"{len(prompts)} chat prompts ({min(p.shape[1] for p in prompts)}-{max(p.shape[1] for p in prompts)} tokens), "
          f"whole-prompt steps over blocks 0:{n}, CPU, {time.perf_counter() - began:.0f} s")
    print(f"{'pair':<24} {'rel L2':>9} {'1 - min cos':>12}")
    for a, b in itertools.combinations_with_replacement(configs, 2):
        worst_rel, worst_cos = 0.0, 1.0
        for i in range(len(prompts)):
            hidden, out_a = outputs[(*a, i)]
            out_b = outputs[(*b, i)][1]
            for reference, other in ((out_a, out_b), (out_b, out_a)):
                agreement = compare_updates(hidden, reference, other)
                worst_rel = max(worst_rel, agreement.rel_l2)
                worst_cos = min(worst_cos, agreement.min_token_cosine)
        print(f"{name(*a) + ' ~ ' + name(*b):<24} {worst_rel:>9.2e} {1 - worst_cos:>12.2e}")


if __name__ == "__main__":
    main()
