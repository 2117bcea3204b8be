"""How far honest peers of each pair of configurations disagree, on the real default model: the calibration of
the spot checks' tolerance per configuration pair (reputation.tolerance.PAIR_TOLERANCES).

Every configuration a peer may declare without SVD (float32 / bfloat16 / float16 compute, none / int8 / nf4
weights) loads the default model's blocks as a peer does (peers.loading.build_span). Spans of 1, 10 and 30
blocks get the same float32 input (the reference model's hidden states at the span's first block, for real
text), as a subject and its checker do. Each configuration runs a span twice: over the whole sequence at once
(as a check re-runs a history), and as a session would (a prefill, then one token per step with its KV
cache). For each pair (a, b) the script compares a's session outputs with b's whole-sequence outputs, token by
token, the way `reputation.tolerance.compare_updates` compares a step's update (output - input): the relative
L2 of the update's difference and the cosine between the updates. One token per step is the check's worst
case (a longer step averages over its tokens). It prints, per pair, the worst token over every span and text.

    python benchmarks/tolerance_pairs.py                  # ~10-20 min on 2 busy CPU cores
    python benchmarks/tolerance_pairs.py --quick          # float32 / bfloat16 / int8 only, fewer tokens
    python benchmarks/tolerance_pairs.py --json out.json  # also write every pair's figures
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from peers.config import PeerConfig  # noqa: E402
from peers.loading import build_span  # noqa: E402
from swarm.blocks import BlockSpan, SpanInput  # noqa: E402
from swarm.head import ClientHead  # noqa: E402
from swarm.models import DEFAULT_MODEL, open_model  # noqa: E402

TEXT = ROOT.parent / "peers" / "data" / "calibration.txt"
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
QUANTS = ("none", "int8", "nf4")


def config_name(dtype: str, quant: str) -> str:
    return DTYPES[dtype] + ("" if quant == "none" else f"+{quant}")


def texts(tokenizer, count: int, tokens: int) -> list[torch.Tensor]:
    """`count` passages of `tokens` tokens each from the calibration text (real activations, not noise)."""
    ids = tokenizer(TEXT.read_text())["input_ids"]
    stride = max((len(ids) - tokens) // max(count, 1), 1)
    return [torch.tensor(ids[i * stride : i * stride + tokens])[None] for i in range(count)]


@torch.inference_mode()
def reference_inputs(checkpoint, model_config, passages, spans) -> dict[tuple[int, int, int], torch.Tensor]:
    """The float32 hidden states entering each span's first block, per passage."""
    head = ClientHead(checkpoint, model_config, torch.float32)
    full = BlockSpan(model_config, 0, checkpoint.num_blocks)
    full.load_blocks(checkpoint.load_block_state)
    starts = {s for s, _ in spans}
    found = {}
    for p, ids in enumerate(passages):
        hidden = head.embed(ids)
        for block in range(checkpoint.num_blocks):
            if block in starts:
                found[(p, block)] = hidden
            hidden = full(hidden, None, SpanInput(None, 0), block, block + 1)
    return {(p, s, e): found[(p, s)] for p in range(len(passages)) for s, e in spans}


@torch.inference_mode()
def run_config(span: BlockSpan, dtype: torch.dtype, hidden: torch.Tensor, start: int, end: int, steps: int):
    """(whole-sequence output, session output of the last `steps` tokens), both float32 as on the wire."""
    whole = span(hidden.to(dtype), None, SpanInput(None, 0), start, end).float()
    cache = span.new_cache(start, end)
    prefill = hidden.shape[1] - steps
    span(hidden[:, :prefill].to(dtype), cache, SpanInput(None, 0), start, end)
    outs = [span(hidden[:, t : t + 1].to(dtype), cache, SpanInput(None, t), start, end).float()
            for t in range(prefill, hidden.shape[1])]
    return whole, torch.cat(outs, dim=1)


def per_token(inputs: torch.Tensor, reference: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine, relative L2) of the update per token, as compare_updates computes them for a one-token step."""
    delta_r = (reference - inputs).reshape(-1, inputs.shape[-1])
    delta_o = (other - inputs).reshape(-1, inputs.shape[-1])
    cos = torch.nn.functional.cosine_similarity(delta_r, delta_o, dim=-1, eps=1e-12)
    rel = (delta_o - delta_r).norm(dim=-1) / delta_r.norm(dim=-1).clamp_min(1e-12)
    return cos, rel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    checkpoint = open_model(DEFAULT_MODEL)
    model_config = checkpoint.load_config()
    n = checkpoint.num_blocks
    spans = [(0, 1), (n // 2, n // 2 + 1), (n - 1, n), (0, 10), (10, 20), (20, 30), (0, n)]
    passages = texts(checkpoint.load_tokenizer(), 2 if args.quick else 4, 48 if args.quick else 96)
    steps = 4 if args.quick else 8
    dtypes = ("float32", "bfloat16") if args.quick else tuple(DTYPES)
    quants = ("none", "int8") if args.quick else QUANTS
    configs = [(d, q) for d in dtypes for q in quants]
    began = time.perf_counter()
    inputs = reference_inputs(checkpoint, model_config, passages, spans)
    outputs: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    for dtype, quant in configs:
        cfg = PeerConfig(model=DEFAULT_MODEL, initial_peers=(), dtype=dtype, quant=quant)
        span = build_span(checkpoint, model_config, 0, n, cfg)
        for key, hidden in inputs.items():
            outputs[(dtype, quant, *key)] = run_config(span, cfg.torch_dtype(), hidden, key[1], key[2], steps)
        del span
        print(f"  ran {config_name(dtype, quant)} ({time.perf_counter() - began:.0f} s)", file=sys.stderr)
    results = {}
    for a, b in itertools.combinations_with_replacement(configs, 2):
        worst_rel, worst_cos, by_span = 0.0, 1.0, {}
        for key, hidden in inputs.items():
            tail = hidden[:, -steps:]
            for subject, checker in ((a, b), (b, a)):  # a's session checked by b's re-run, and the other way
                session = outputs[(*subject, *key)][1]
                rerun = outputs[(*checker, *key)][0][:, -steps:]
                cos, rel = per_token(tail, rerun, session)
                worst_rel, worst_cos = max(worst_rel, float(rel.max())), min(worst_cos, float(cos.min()))
                span_key = f"{key[1]}:{key[2]}"
                by_span[span_key] = max(by_span.get(span_key, 0.0), float(rel.max()))
        name = f"{config_name(*a)} ~ {config_name(*b)}"
        results[name] = {"max_rel_l2": worst_rel, "min_cosine": worst_cos, "max_rel_l2_by_span": by_span}
    print(f"{len(passages)} passages x {steps} one-token steps x {len(spans)} spans "
          f"{[f'{s}:{e}' for s, e in spans]}, both directions, CPU, {time.perf_counter() - began:.0f} s")
    print(f"{'pair':<24} {'max rel L2':>10} {'1 - min cos':>12}   worst span")
    for name, r in results.items():
        worst_span = max(r["max_rel_l2_by_span"], key=r["max_rel_l2_by_span"].get)
        print(f"{name:<24} {r['max_rel_l2']:>10.2e} {1 - r['min_cosine']:>12.2e}   {worst_span}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
