"""Memory tiers and the paper's Theorem 1, measured on the default model.

1. Weights resident in the compute tier vs offloaded (disk: memory-mapped safetensors read block by block
   with the next block prefetched; cpu: pinned host RAM for a GPU peer, measured only where CUDA exists):
   decode tokens/s and peak RSS of a fresh process serving all blocks.
2. Theorem 1 (each peer's share shrinks as the model is split): with the blocks split evenly across 1, 2, 3
   and 5 peers, the bytes of weights one peer reads per token and its measured decode step time.

    python benchmarks/memory_tiers.py [--steps 24]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent


sys.path.insert(0, str(ROOT.parent))

from peers.config import PeerConfig  # noqa: E402
from peers.memory import peak_rss  # noqa: E402
from swarm.blocks import SpanInput  # noqa: E402
from swarm.models import DEFAULT_MODEL, open_model  # noqa: E402

SPLITS = (1, 2, 3, 5)


def step_times(span, hidden_size: int, dtype: torch.dtype, steps: int, device: torch.device) -> list[float]:
    """Seconds of each single-token decode step after a 16-token prompt."""
    cache = span.new_cache()
    span(torch.randn(1, 16, hidden_size, dtype=dtype, device=device), cache, SpanInput(None, 0))
    times = []
    for position in range(16, 16 + steps):
        began = time.perf_counter()
        span(torch.randn(1, 1, hidden_size, dtype=dtype, device=device), cache, SpanInput(None, position))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - began)
    return times


def worker(options: dict, steps: int, out: Path) -> None:
    from peers.loading import build_span

    checkpoint = open_model(DEFAULT_MODEL)
    config = checkpoint.load_config()
    cfg = PeerConfig(DEFAULT_MODEL, (), **options)
    span = build_span(checkpoint, config, 0, checkpoint.num_blocks, cfg)
    times = step_times(span, config.hidden_size, cfg.torch_dtype(), steps, cfg.torch_device())
    peak = peak_rss()
    out.write_text(json.dumps({"tokens_per_s": 1 / statistics.median(times), "peak_rss": peak}))


def tiers(steps: int) -> str:
    rows = {"resident (cpu)": {}, "offload disk (cpu)": {"offload": "disk"}}
    if torch.cuda.is_available():
        rows = {"resident (cuda)": {"device": "cuda"}, "offload cpu (cuda)": {"device": "cuda", "offload": "cpu"},
                "offload disk (cuda)": {"device": "cuda", "offload": "disk"}, **rows}
    lines = [f"{'weights':<22} {'decode tok/s':>12} {'peak RSS':>9}", "-" * 45]
    folder = Path(tempfile.mkdtemp(prefix="efedllm-tiers-"))
    for index, (name, options) in enumerate(rows.items()):
        out = folder / f"{index}.json"
        subprocess.run([sys.executable, __file__, "--worker", json.dumps(options), "--steps", str(steps),
                        "--out", str(out)], check=True, stderr=subprocess.DEVNULL)
        r = json.loads(out.read_text())
        lines.append(f"{name:<22} {r['tokens_per_s']:>12.1f} {r['peak_rss'] / 2**20:>7.0f}MB")
    if not torch.cuda.is_available():
        lines.append("offload cpu            (host RAM -> GPU tier: needs CUDA; not measured on this machine)")
    return "\n".join(lines)


def theorem_one(steps: int) -> str:
    from peers.loading import build_span

    checkpoint = open_model(DEFAULT_MODEL)
    config = checkpoint.load_config()
    cfg = PeerConfig(DEFAULT_MODEL, ())
    n = checkpoint.num_blocks
    lines = [f"{'peers':>5} {'blocks/peer':>11} {'weight MB read/token/peer':>25} {'step ms/peer':>12} "
             f"{'sum of steps ms':>15}", "-" * 74]
    for peers in SPLITS:
        count = n // peers  # 30 blocks split evenly across 1, 2, 3, 5 peers
        span = build_span(checkpoint, config, 0, count, cfg)
        read = sum(p.numel() * p.element_size() for p in span.layers.parameters())
        step = statistics.median(step_times(span, config.hidden_size, cfg.torch_dtype(), steps, cfg.torch_device()))
        lines.append(f"{peers:>5} {count:>11} {read / 2**20:>25.1f} {1000 * step:>12.2f} {1000 * step * peers:>15.2f}")
        del span
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24, help="decode steps timed (median)")
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker), args.steps, args.out)
    text = ("Weight tiers: all 30 blocks, float32, one process per row\n" + tiers(args.steps) +
            "\n\nTheorem 1: the model split evenly across k peers (float32, resident; no network)\n" +
            theorem_one(args.steps))
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "memory_tiers.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
