"""What compression costs and saves on a real model: the paper's Figure 5, measured.

For each configuration a fresh process loads every block of the default model as a peer would
(peers.loading.build_span), decodes a few tokens (block-span steps with a KV cache) and reports its peak RSS;
then it scores the evaluation text (benchmarks/data/eval.txt, a public-domain passage, never the calibration
text) with the client's own float32 embeddings and head: perplexity and top-1 next-token agreement with float32.
SVD factors are computed (and cached) before the measured process starts, so its RSS is that of serving.

    python benchmarks/compression.py            # every configuration (~15-25 min on 2 busy cores)
    python benchmarks/compression.py --quick    # a few configurations, fewer tokens
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent


sys.path.insert(0, str(ROOT.parent))

from peers.compression.options import compression_tag, svd_spec  # noqa: E402
from peers.compression.svd import LowRankLinear  # noqa: E402
from peers.config import PeerConfig  # noqa: E402
from peers.memory import peak_rss  # noqa: E402
from swarm.blocks import SpanInput  # noqa: E402
from swarm.models import DEFAULT_MODEL, open_model  # noqa: E402

EVAL_TEXT = ROOT / "data" / "eval.txt"
WINDOW = 512  # tokens scored per forward pass

FIXED = {"fp32": {}, "bf16": {"dtype": "bfloat16"}, "int8": {"quant": "int8"}, "nf4": {"quant": "nf4"}}
METHODS = {"plain": "plain", "aa": "activation-aware"}


def all_configs(quick: bool, energies: tuple[float, ...] | None = None) -> dict[str, dict]:
    fractions = (0.9, 0.5) if quick else (0.9, 0.7, 0.5, 0.3)
    if energies is None:
        energies = () if quick else (0.99, 0.95, 0.9)
    configs = dict(FIXED)
    for fraction in fractions:
        for short, method in METHODS.items():
            configs[f"svd-{short} params {fraction:g}"] = {"svd_params": fraction, "svd_method": method}
    for energy in energies:
        for short, method in METHODS.items():
            configs[f"svd-{short} energy {energy:g}"] = {"svd_energy": energy, "svd_method": method}
    return configs


def span_size(span) -> tuple[int, int]:
    """(parameters kept, bytes kept) of the span's weights; a quantised weight counts its logical size."""
    params, seen, nbytes = 0, set(), 0
    for module in span.modules():
        if isinstance(module, LowRankLinear):
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and hasattr(module, "in_features"):
            params += module.in_features * module.out_features
        elif weight is not None:
            params += weight.numel()
    for value in span.state_dict().values():
        if torch.is_tensor(value) and value.device.type != "meta" and value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            nbytes += value.numel() * value.element_size()
    return params, nbytes


def decode_tokens_per_second(span, hidden_size: int, dtype: torch.dtype, steps: int) -> float:
    cache = span.new_cache()
    span(torch.randn(1, 16, hidden_size, dtype=dtype), cache, SpanInput(None, 0))
    began = time.perf_counter()
    for position in range(16, 16 + steps):
        span(torch.randn(1, 1, hidden_size, dtype=dtype), cache, SpanInput(None, position))
    return steps / (time.perf_counter() - began)


def worker(options: dict, tokens: int, steps: int, out: Path) -> None:
    """One configuration in this (fresh) process; writes JSON results and top-1 predictions."""
    from peers.loading import build_span

    torch.manual_seed(0)
    checkpoint = open_model(DEFAULT_MODEL)
    config = checkpoint.load_config()
    cfg = PeerConfig(DEFAULT_MODEL, (), **options)
    span = build_span(checkpoint, config, 0, checkpoint.num_blocks, cfg)
    speed = decode_tokens_per_second(span, config.hidden_size, cfg.torch_dtype(), steps)
    serving_peak = peak_rss()  # serving peak, before the eval
    params, nbytes = span_size(span)
    client = checkpoint.load_client_state()
    embed, norm = client["embed_tokens.weight"].float(), client["norm.weight"].float()
    head = client.get("lm_head.weight", embed).float()
    ids = checkpoint.load_tokenizer()(EVAL_TEXT.read_text(), return_tensors="pt")["input_ids"][0, : tokens + 1]
    total_nll, predictions = 0.0, []
    for start in range(0, len(ids) - 1, WINDOW):
        window = ids[start : start + WINDOW + 1]
        hidden = span(embed[window[:-1]][None].to(cfg.torch_dtype()), None, SpanInput(None, 0)).float()[0]
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps) * norm
        logits = hidden @ head.T  # (T, vocab)
        total_nll += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
        predictions.append(logits.argmax(-1))
    torch.save(torch.cat(predictions), out.with_suffix(".pt"))
    scored = len(ids) - 1
    out.write_text(json.dumps({"params": params, "bytes": nbytes, "peak_rss": serving_peak, "tokens_per_s": speed,
                               "perplexity": math.exp(total_nll / scored), "scored": scored,
                               "tag": compression_tag(cfg)}))


def prepare_factors(configs: dict[str, dict]) -> None:
    """Factorise (and cache) every SVD configuration in this process, calibrating once."""
    from peers.compression.calibration import collect_grams
    from peers.loading import factorised_files

    checkpoint = open_model(DEFAULT_MODEL)
    config = checkpoint.load_config()
    blocks = range(checkpoint.num_blocks)
    grams = None
    for name, options in configs.items():
        spec = svd_spec(PeerConfig(DEFAULT_MODEL, (), **options))
        if spec is None:
            continue
        if spec.method == "activation-aware" and grams is None:
            grams = collect_grams(checkpoint, config, list(blocks))
        began = time.perf_counter()
        factorised_files(checkpoint, config, spec, blocks, grams if spec.method == "activation-aware" else None)
        print(f"  factors ready: {name} ({time.perf_counter() - began:.0f} s)", file=sys.stderr)


def run_all(configs: dict[str, dict], tokens: int, steps: int) -> dict[str, dict]:
    results, folder = {}, Path(tempfile.mkdtemp(prefix="efedllm-compression-"))
    for index, (name, options) in enumerate(configs.items()):
        out = folder / f"{index}.json"
        command = [sys.executable, __file__, "--worker", json.dumps(options), "--tokens", str(tokens),
                   "--steps", str(steps), "--out", str(out)]
        began = time.perf_counter()
        subprocess.run(command, check=True, stderr=subprocess.DEVNULL)
        results[name] = {**json.loads(out.read_text()), "predictions": torch.load(out.with_suffix(".pt"))}
        print(f"  measured {name} ({time.perf_counter() - began:.0f} s)", file=sys.stderr)
    return results


def table(results: dict[str, dict]) -> str:
    base = results["fp32"]
    header = (f"{'configuration':<22} {'announced':<22} {'params kept':>11} {'bytes kept':>10} {'ratio':>6} "
              f"{'peak RSS':>9} {'perplexity':>10} {'top-1 = fp32':>12} {'decode tok/s':>12}")
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        agreement = (r["predictions"] == base["predictions"]).float().mean().item()
        r["agreement"], r["ratio"] = agreement, base["bytes"] / r["bytes"]
        lines.append(
            f"{name:<22} {r['tag']:<22} {r['params'] / base['params']:>10.1%} {r['bytes'] / 2**20:>8.1f}MB "
            f"{r['ratio']:>5.2f}x {r['peak_rss'] / 2**20:>7.0f}MB {r['perplexity']:>10.2f} {agreement:>12.1%} "
            f"{r['tokens_per_s']:>12.1f}"
        )
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = {"dtype / bitsandbytes": lambda n: n in FIXED, "plain SVD": lambda n: n.startswith("svd-plain"),
                "activation-aware SVD": lambda n: n.startswith("svd-aa")}
    fig, ax = plt.subplots(figsize=(8, 5))
    for (label, member), marker in zip(families.items(), "os^"):
        names = [n for n in results if member(n)]
        ax.scatter([results[n]["ratio"] for n in names], [100 * results[n]["agreement"] for n in names],
                   marker=marker, label=label)
        for n in names:
            ax.annotate(n.replace("svd-plain ", "").replace("svd-aa ", ""), (results[n]["ratio"],
                        100 * results[n]["agreement"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("compression ratio of the served blocks (fp32 bytes / bytes kept)")
    ax.set_ylabel("top-1 next-token agreement with fp32 (%)")
    ax.set_title("SmolLM2-135M, all 30 blocks: compression vs retained accuracy (measured)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer configurations and tokens")
    parser.add_argument("--tokens", type=int, help="evaluation tokens (default 1024, quick 512)")
    parser.add_argument("--energies", type=float, nargs="*", help="--svd-energy values (default 0.99 0.95 0.9)")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per configuration")
    parser.add_argument("--results", type=Path, default=ROOT / "results", help="where the table and plot go")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    tokens = args.tokens or (512 if args.quick else 1024)
    if args.worker:
        torch.set_num_threads(torch.get_num_threads())
        return worker(json.loads(args.worker), tokens, args.steps, args.out)
    configs = all_configs(args.quick, None if args.energies is None else tuple(args.energies))
    print(f"Compression benchmark: {len(configs)} configurations, {tokens} evaluation tokens", file=sys.stderr)
    prepare_factors(configs)
    results = run_all(configs, tokens, args.steps)
    text = table(results)
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (args.results / f"compression{suffix}.txt").write_text(text + "\n")
    plot(results, args.results / f"compression{suffix}.png")
    print(f"\nplot: {args.results / f'compression{suffix}.png'}")


if __name__ == "__main__":
    main()
