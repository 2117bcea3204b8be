"""What a 7B-wide peer costs its host: peak RSS per block against the weight bytes per block, and time to ONLINE.

Builds a random-weight Llama checkpoint of Llama-2-7B's width (hidden 4096, intermediate 11008, 32 heads) with a
few blocks and a small vocabulary, stored in bfloat16 safetensors, converts it once into a temporary cache, then
for each of bf16 (dense, --dtype auto), int8 and nf4 starts a real peer process (`python -m peers.cli join`,
through peers.local.LocalSwarm) serving one block and then all blocks. The peer's main process holds the
weights; its VmHWM (peak RSS) and VmRSS are read once it is ONLINE. The per-block figures are the differences
between the two runs divided by the extra blocks, so the interpreter, torch and hivemind do not count.

    python benchmarks/host_memory.py [--blocks 3] [--tree /path/to/another/checkout]

--tree runs the peers (and the conversion) from another checkout of the project, to compare with it.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from peers.local import LocalSwarm  # noqa: E402

WIDE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
            vocab_size=512, max_position_embeddings=4096)
MODES = {"bf16": (), "int8": ("--quant", "int8"), "nf4": ("--quant", "nf4")}
MB = 1e6


@dataclass(frozen=True)
class Run:
    peak: int  # VmHWM of the peer's main process, bytes
    rss: int  # VmRSS once ONLINE, bytes
    online_s: float  # seconds from start to the ONLINE line
    dtype: str  # the compute dtype the peer reported when ONLINE
    load_peak: int  # VmHWM when its blocks were loaded (logged by peers.loading), bytes


def build_checkpoint(directory: Path, num_blocks: int) -> Path:
    """A random-weight bf16 Llama checkpoint of 7B width with `num_blocks` blocks, and a tiny tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    source = directory / "llama-4096"
    torch.manual_seed(0)
    config = LlamaConfig(**WIDE, num_hidden_layers=num_blocks)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(source)
    del model
    gc.collect()
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(source)
    return source


def tree_env(tree: Path, cache: Path) -> dict[str, str]:
    return {"PYTHONPATH": str(tree), "EFEDLLM_CACHE": str(cache)}


def convert(source: Path, env: dict[str, str]) -> None:
    """Convert once, in a process of its own, so no peer's figures include the conversion."""
    code = f"from swarm.models import open_model; open_model({str(source)!r}, show_progress=False)"
    subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, check=True, cwd=env["PYTHONPATH"])


def process_memory(pid: int) -> tuple[int, int]:
    """(VmHWM, VmRSS) of a process, in bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmHWM"].split()[0]) * 1024, int(fields["VmRSS"].split()[0]) * 1024


def serve(source: Path, env: dict[str, str], blocks: int, args: tuple[str, ...]) -> Run:
    with LocalSwarm(model=str(source), extra_env=env, startup_timeout=900.0) as swarm:
        began = time.monotonic()
        peer = swarm.add_peer(f"0:{blocks}", "--max-length", "512", "--cache-tokens", "512",
                              "--status-interval", "0", *args, wait=False)
        swarm.wait_online(peer)
        online_s = time.monotonic() - began
        peak, rss = process_memory(peer.process.pid)
        dtype = re.search(r"block-steps/s, torch\.(\w+)\)", peer.log())
        load_peak = re.search(r"loaded: .*peak RSS so far (\d+) MB", peer.log())
    return Run(peak, rss, online_s, dtype.group(1) if dtype else "?", int(load_peak.group(1)) * 10**6 if load_peak else 0)


def block_weight_bytes() -> int:
    """Stored bytes of one block's tensors (bf16)."""
    config = WIDE
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    return 2 * (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden)


def footprints() -> dict[str, int]:
    """Bytes one block should take once loaded, by the peer's own budget (peers.compression.footprint)."""
    from transformers import LlamaConfig

    from peers.compression.footprint import block_footprint
    from peers.config import PeerConfig

    config = LlamaConfig(**WIDE, num_hidden_layers=1)
    dense = block_weight_bytes()
    return {mode: block_footprint(config, dense, 2, PeerConfig("m", (), quant=args[1] if args else "none")).per_block
            for mode, args in MODES.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=3, help="blocks of the checkpoint (the larger run serves all)")
    parser.add_argument("--tree", type=Path, default=ROOT.parent, help="checkout whose peers are measured")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of bf16,int8,nf4")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="host-memory-") as work:
        work_dir = Path(work)
        began = time.monotonic()
        source = build_checkpoint(work_dir, options.blocks)
        env = tree_env(options.tree.resolve(), work_dir / "cache")
        convert(source, env)
        print(f"checkpoint: {options.blocks} blocks of hidden 4096 / intermediate 11008, bf16 safetensors "
              f"(built and converted in {time.monotonic() - began:.0f} s); peers from {options.tree.resolve()}",
              flush=True)
        weight, fits = block_weight_bytes(), footprints()
        n = options.blocks
        columns = ("mode", "dtype", "stored/blk", "final/blk", "peak 1", f"peak {n}", f"load peak {n}", f"RSS {n}",
                   "peak/blk", "RSS/blk", "peak/blk:final", f"load peak:held {n}", "ONLINE 1", f"ONLINE {n}")
        widths = [max(len(c), 8) for c in columns]
        line = "  ".join(c.rjust(w) for c, w in zip(columns, widths))
        print(line, "-" * len(line), sep="\n", flush=True)
        for mode in options.modes.split(","):
            one = serve(source, env, 1, MODES[mode])
            every = serve(source, env, n, MODES[mode])
            peak_per_block = (every.peak - one.peak) / (n - 1)
            rss_per_block = (every.rss - one.rss) / (n - 1)
            quantised = bool(MODES[mode])  # dense blocks are memory-mapped: their pages are read after loading
            base = one.rss - rss_per_block  # the peer process without weights, extrapolated from the two runs
            cells = (mode, every.dtype, f"{weight / MB:.0f}MB", f"{fits[mode] / MB:.0f}MB", f"{one.peak / MB:.0f}MB",
                     f"{every.peak / MB:.0f}MB", f"{every.load_peak / MB:.0f}MB" if quantised else "-", f"{every.rss / MB:.0f}MB",
                     f"{peak_per_block / MB:.0f}MB", f"{rss_per_block / MB:.0f}MB", f"{peak_per_block / fits[mode]:.2f}",
                     f"{(every.load_peak - base) / (every.rss - base):.2f}" if quantised else "-",
                     f"{one.online_s:.1f}s", f"{every.online_s:.1f}s")
            print("  ".join(c.rjust(w) for c, w in zip(cells, widths)), flush=True)
    notes = (
        "stored/blk: a block's bf16 bytes on disk; final/blk: its bytes once loaded at that mode "
        "(peers.compression.footprint, bf16 compute)",
        f"peak 1, peak {n}: VmHWM of the peer's process serving 1 or {n} blocks, read at ONLINE (loading, then the "
        "throughput measurement)",
        f"load peak {n}: its VmHWM when the blocks were loaded (logged by peers.loading; '-' for dense blocks, which "
        f"are memory-mapped and read at first use); RSS {n}: its VmRSS at ONLINE",
        f"peak/blk, RSS/blk: ({n}-block run - 1-block run) / {n - 1}; peak/blk:final: peak/blk over final/blk",
        f"load peak:held {n}: (load peak {n} - base) / (RSS {n} - base), base = RSS 1 - RSS/blk (the process "
        "without weights)",
        "ONLINE 1, ONLINE N: seconds from start to ONLINE (load, quantise, measure throughput)",
    )
    print("\n".join(notes))


if __name__ == "__main__":
    main()
