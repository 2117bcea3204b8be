"""The client's start-up cost of building its LM head, the old way and the new way, side by side.

The old `ClientHead` built `nn.Linear(hidden, vocab)`, which allocates and randomly initialises a weight of
its own, then replaced that weight with the checkpoint's. `swarm.head.ClientHead` builds its modules on the
meta device and uses the loaded tensors directly. Measured on a random Llama checkpoint with Llama-2-7B's
head (hidden size 4096, vocabulary 32000, untied, stored in float16) and two small blocks; the client runs
in float32 as it does by default. Each build runs in a fresh process: seconds to build the head (reading
the client's tensors included) and the growth of peak resident memory while building it.

    python benchmarks/client_startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from peers.memory import peak_rss, release_free_memory  # noqa: E402
from swarm.head import ClientHead  # noqa: E402
from swarm.models import open_model  # noqa: E402

HIDDEN, VOCAB, BLOCKS = 4096, 32000, 2
MIB = 2**20


class OldClientHead(nn.Module):
    """The construction swarm.head.ClientHead replaced, as it was in swarm/client.py."""

    def __init__(self, checkpoint, config, dtype: torch.dtype):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        state = checkpoint.load_client_state()
        self.embed_tokens = nn.Embedding.from_pretrained(state["embed_tokens.weight"].to(dtype), freeze=True)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm.load_state_dict({"weight": state["norm.weight"].to(dtype)})
        head = state.get("lm_head.weight", state["embed_tokens.weight"]).to(dtype)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        self.lm_head.weight = nn.Parameter(head, requires_grad=False)
        self.eval()

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))


BUILDERS = {"old: nn.Linear, then its weight replaced": OldClientHead, "new: swarm.head.ClientHead": ClientHead}


def build_checkpoint(folder: Path) -> Path:
    """A random Llama with a 4096 x 32000 untied head, saved as a Hugging Face directory; returns its path."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    source = folder / "random-llama-4096"
    config = LlamaConfig(hidden_size=HIDDEN, vocab_size=VOCAB, num_hidden_layers=BLOCKS, intermediate_size=1024,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
                         torch_dtype="float16")
    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in AutoModelForCausalLM.from_config(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    tensors = {name: (torch.randn(shape, generator=generator) * 0.02).half() for name, shape in shapes.items()}
    source.mkdir()
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(source)
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(source)
    return source


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def worker(source: str, cache: str, builder: str, out: Path) -> None:
    checkpoint = open_model(source, cache_dir=Path(cache), show_progress=False)
    config = checkpoint.load_config()
    release_free_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
        peak_reset = True
    except OSError:
        peak_reset = False
    before = _status_bytes("VmRSS")
    began = time.perf_counter()
    head = BUILDERS[builder](checkpoint, config, torch.float32)
    seconds = time.perf_counter() - began
    peak, after = peak_rss(), _status_bytes("VmRSS")
    hidden = torch.randn(1, 4, HIDDEN, generator=torch.Generator().manual_seed(1))
    logits = head.logits(hidden)
    out.write_text(json.dumps({
        "seconds": seconds, "peak_growth": peak - before, "rss_growth": after - before, "peak_reset": peak_reset,
        "logits_sha256": hashlib.sha256(logits.numpy().tobytes()).hexdigest(),
    }))


def measure(repeats: int) -> str:
    with tempfile.TemporaryDirectory(prefix="efedllm-client-startup-") as folder:
        return _measure(Path(folder), repeats)


def _measure(folder: Path, repeats: int) -> str:
    source = build_checkpoint(folder)
    cache = folder / "cache"
    open_model(str(source), cache_dir=cache, show_progress=False)  # converted once, before timing
    runs: dict[str, list[dict]] = {name: [] for name in BUILDERS}
    for index in range(repeats):
        for name in BUILDERS:  # alternating, so both see the same page cache and machine load
            out = folder / f"{index}-{len(runs[name])}-{name[:3]}.json"
            subprocess.run([sys.executable, __file__, "--worker", name, "--source", str(source), "--cache",
                            str(cache), "--out", str(out)], check=True)
            runs[name].append(json.loads(out.read_text()))
    digests = {run["logits_sha256"] for results in runs.values() for run in results}
    lines = [
        f"client head of a {HIDDEN} x {VOCAB} model (untied, float16 on disk, float32 client), "
        f"median of {repeats} fresh processes each",
        f"{'construction':<44} {'seconds':>8} {'peak RSS growth':>16} {'RSS after':>10}",
        "-" * 81,
    ]
    for name, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        peak = statistics.median(r["peak_growth"] for r in results) / MIB
        after = statistics.median(r["rss_growth"] for r in results) / MIB
        lines.append(f"{name:<44} {seconds:>8.2f} {peak:>12.0f} MiB {after:>6.0f} MiB")
    lines.append(f"logits bit-identical: {'yes' if len(digests) == 1 else 'NO'}")
    if not all(run["peak_reset"] for results in runs.values() for run in results):
        lines.append("(peak RSS could not be reset before building: the figures are upper bounds)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.source, args.cache, args.worker, args.out)
        return
    table = measure(args.repeats)
    print(table)
    results = ROOT / "results"
    results.mkdir(exist_ok=True)
    (results / "client_startup.txt").write_text(table + "\n")


if __name__ == "__main__":
    main()
