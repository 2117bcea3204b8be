"""Decode speed: the default model in one process vs the swarm with 1, 2 and 3 peers on loopback.

Greedy, the same chat prompt, 128 new tokens (EOS suppressed). Each swarm size is measured in rounds
that alternate with the local baseline, so both see the same machine load; medians are reported.
The local baseline runs in its own process with the environment as given (transformers' `generate`,
as a user would run it); the swarm client and peers use the project's entry-point settings.

    python benchmarks/decode_speed.py [--tokens 128] [--rounds 3]
"""

from __future__ import annotations

import os
import sys

from swarm.runtime import prefer_passive_openmp

LOCAL_ENV = dict(os.environ)  # the baseline's environment, before this process changes anything
prefer_passive_openmp()  # as swarm-chat and swarm-peer do

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402

import torch  # noqa: E402

from peers.local import LocalSwarm
from peers.testing.streamers import TokenTimes
from swarm import DistributedModelForCausalLM
from swarm.models import DEFAULT_MODEL, open_model

LAYOUTS = {1: ["0:30"], 2: ["0:15", "15:30"], 3: ["0:10", "10:20", "20:30"]}


@dataclass
class Run:
    tokens_per_s: float  # decode speed: new tokens after the first / their time
    ttft_s: float
    total_s: float


def timed(generate, prompt: torch.Tensor, tokens: int) -> Run:
    timer = TokenTimes()
    output = generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, streamer=timer)
    done = time.perf_counter()
    assert output.shape[1] == prompt.shape[1] + tokens
    return Run((tokens - 1) / (done - timer.first), timer.first - timer.started, done - timer.started)


def median_run(runs: list[Run]) -> Run:
    return Run(*(statistics.median(getattr(r, f) for r in runs) for f in ("tokens_per_s", "ttft_s", "total_s")))


def benchmark_prompt(tokenizer) -> torch.Tensor:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me about the history of Paris."}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )["input_ids"]


def serve_local_runs(tokens: int) -> None:
    """Child mode: load the whole model, then time one generation per line read from stdin."""
    checkpoint = open_model(DEFAULT_MODEL)
    local = checkpoint.load_causal_lm(torch.float32)
    prompt = benchmark_prompt(checkpoint.load_tokenizer())
    timed(local.generate, prompt, 8)  # warm-up
    print("ready", flush=True)
    for _ in sys.stdin:
        print(json.dumps(asdict(timed(local.generate, prompt, tokens))), flush=True)


class LocalBaseline:
    """The single-process baseline in a child process, timed on request."""

    def __init__(self, tokens: int):
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--local-child", "--tokens", str(tokens)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=LOCAL_ENV,
        )
        assert self.process.stdout.readline().strip() == "ready"

    def run(self) -> Run:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        return Run(**json.loads(self.process.stdout.readline()))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.local_child:
        return serve_local_runs(args.tokens)

    prompt = benchmark_prompt(open_model(DEFAULT_MODEL).load_tokenizer())
    local = LocalBaseline(args.tokens)

    rows = []
    for peers, layout in LAYOUTS.items():
        with LocalSwarm(model=DEFAULT_MODEL) as swarm:
            started = [swarm.add_peer(blocks, wait=False) for blocks in layout]
            for peer in started:
                swarm.wait_online(peer)
            model = DistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, [swarm.initial_peers])
            try:
                timed(model.generate, prompt, 8)  # warm-up: route, pings, streams
                local_runs, swarm_runs = [], []
                for _ in range(args.rounds):
                    local_runs.append(local.run())
                    swarm_runs.append(timed(model.generate, prompt, args.tokens))
            finally:
                model.shutdown()
        rows.append((peers, median_run(local_runs), median_run(swarm_runs)))
        print(f"measured {peers} peer(s)", flush=True)
    local.close()

    print(f"\nDecode speed, {DEFAULT_MODEL} float32, greedy, {args.tokens} new tokens, median of {args.rounds} "
          f"alternating rounds, {torch.get_num_threads()} torch threads per process, {os.cpu_count()} cores\n")
    header = f"{'setup':<14}{'tokens/s':>10}{'TTFT ms':>10}{'swarm/local':>13}{'ms/token':>10}{'per-hop ms':>12}"
    print(header)
    print("-" * len(header))
    for peers, local_run, swarm_run in rows:
        local_ms, swarm_ms = 1000 / local_run.tokens_per_s, 1000 / swarm_run.tokens_per_s
        print(f"{'local':<14}{local_run.tokens_per_s:>10.2f}{local_run.ttft_s * 1000:>10.0f}{'':>13}{local_ms:>10.1f}{'':>12}")
        ratio = swarm_run.tokens_per_s / local_run.tokens_per_s
        per_hop = (swarm_ms - local_ms) / peers
        print(f"{f'swarm {peers} peer(s)':<14}{swarm_run.tokens_per_s:>10.2f}{swarm_run.ttft_s * 1000:>10.0f}"
              f"{ratio:>12.3f}x{swarm_ms:>10.1f}{per_hop:>12.2f}")


if __name__ == "__main__":
    main()
