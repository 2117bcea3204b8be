"""Concurrent sessions: aggregate decode speed of N sessions through a 3-peer loopback swarm against local
`generate` with a batch of the same N prompts, measured side by side in one run.

Each session is a user with their own prompt (8 chat prompts of different lengths) on its own thread of one client,
greedy, `--tokens` new tokens (EOS suppressed). The swarm is measured with cross-session batching on the peers
(the default) and off (`--no-batch-sessions`), and, with batching, by two clients in turn: one that bundles its
sessions' steps to a peer into one message (the default) and one that sends each alone (`bundle_steps=False`).
Every session's tokens are compared with a local batch-1 run of its prompt. The local baseline runs in its own
process with the environment as given.

    python benchmarks/concurrency.py [--tokens 64] [--sessions 1 2 4 8] [--rounds 2] [--peer-threads N]

`--peer-threads` starts every peer with `--num-threads N` (three peers share this machine's cores).
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
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import torch  # noqa: E402

from peers.local import LocalSwarm  # noqa: E402
from swarm import DistributedModelForCausalLM  # noqa: E402
from swarm.models import DEFAULT_MODEL, open_model  # noqa: E402

LAYOUT = ["0:10", "10:20", "20:30"]
QUESTIONS = [
    "What is the capital of France?",
    "Tell me about the history of Paris.",
    "Write a short poem about the sea.",
    "Explain what a transformer model is, in two sentences.",
    "List three uses of copper.",
    "Why is the sky blue? Answer for a ten-year-old who likes football and asks a lot of questions.",
    "Give me a recipe for pancakes.",
    "What is 17 times 23?",
]


def encode(tokenizer, question: str) -> torch.Tensor:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


def greedy(generate, ids: torch.Tensor, tokens: int, **kwargs) -> torch.Tensor:
    return generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, **kwargs)


def serve_local(tokens: int) -> None:
    """Child mode: the whole model in this process. Reads a batch size per line; prints its time as JSON. First
    prints every prompt's batch-1 greedy tokens (the reference the swarm must match)."""
    checkpoint = open_model(DEFAULT_MODEL)
    model = checkpoint.load_causal_lm(torch.float32)
    tokenizer = checkpoint.load_tokenizer()
    tokenizer.padding_side = "left"
    prompts = [encode(tokenizer, q) for q in QUESTIONS]
    references = [greedy(model.generate, ids, tokens)[0, ids.shape[1]:].tolist() for ids in prompts]
    print(json.dumps(references), flush=True)
    for line in sys.stdin:
        n = int(line)
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                               tokenize=False) for q in QUESTIONS[:n]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        started = time.perf_counter()
        greedy(model.generate, batch["input_ids"], tokens, attention_mask=batch["attention_mask"],
               pad_token_id=tokenizer.pad_token_id)
        print(json.dumps(time.perf_counter() - started), flush=True)


class LocalBaseline:
    def __init__(self, tokens: int):
        self.process = subprocess.Popen([sys.executable, __file__, "--local-child", "--tokens", str(tokens)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=LOCAL_ENV)
        self.references: list[list[int]] = json.loads(self.process.stdout.readline())

    def seconds(self, sessions: int) -> float:
        self.process.stdin.write(f"{sessions}\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


def run_sessions(model: DistributedModelForCausalLM, prompts: list[torch.Tensor], tokens: int
                 ) -> tuple[float, list[list[int]]]:
    """All sessions at once, one thread each: (wall seconds, each session's new tokens)."""
    with ThreadPoolExecutor(len(prompts)) as pool:
        started = time.perf_counter()
        outputs = list(pool.map(lambda ids: greedy(model.generate, ids, tokens), prompts))
        seconds = time.perf_counter() - started
    return seconds, [out[0, ids.shape[1]:].tolist() for out, ids in zip(outputs, prompts)]


CLIENTS = {"bundled": True, "separate": False}  # client name -> bundle_steps (one message per peer, or one per step)


def measure_swarm(batching: bool, clients: dict[str, bool], prompts: list[torch.Tensor], sizes: list[int], tokens: int,
                  rounds: int, local: LocalBaseline, local_seconds: dict[int, list[float]],
                  peer_threads: int | None = None) -> tuple[dict[str, dict[int, float]], dict[str, int]]:
    """Per client (name -> bundle_steps), median wall seconds per session count and how many sessions' tokens
    differed from the reference. The clients share one swarm and take turns, in alternating order."""
    extra = () if batching else ("--no-batch-sessions",)
    seconds: dict[str, dict[int, list[float]]] = {name: {n: [] for n in sizes} for name in clients}
    mismatches = dict.fromkeys(clients, 0)
    with LocalSwarm(model=DEFAULT_MODEL, peer_threads=peer_threads) as swarm:
        swarm.add_peers(*[(f"peer{i}", blocks, extra) for i, blocks in enumerate(LAYOUT)])
        models = {name: DistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, [swarm.initial_peers],
                                                                   bundle_steps=bundle)
                  for name, bundle in clients.items()}
        try:
            for model in models.values():
                run_sessions(model, prompts[:2], 4)  # warm-up: route, pings, streams
            for round_ in range(rounds):
                for n in sizes:
                    local_seconds[n].append(local.seconds(n))
                    for name in (list(models) if round_ % 2 == 0 else list(models)[::-1]):
                        wall, outputs = run_sessions(models[name], prompts[:n], tokens)
                        seconds[name][n].append(wall)
                        mismatches[name] += sum(out != ref for out, ref in zip(outputs, local.references))
        finally:
            for model in models.values():
                model.shutdown()
    return {name: {n: statistics.median(s) for n, s in per_n.items()} for name, per_n in seconds.items()}, mismatches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--peer-threads", type=int, help="every peer's --num-threads (default: the peer's own)")
    parser.add_argument("--local-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.local_child:
        return serve_local(args.tokens)
    if max(args.sessions) > len(QUESTIONS):
        parser.error(f"at most {len(QUESTIONS)} sessions")

    tokenizer = open_model(DEFAULT_MODEL).load_tokenizer()
    prompts = [encode(tokenizer, q) for q in QUESTIONS]
    local = LocalBaseline(args.tokens)
    local_seconds: dict[int, list[float]] = {n: [] for n in args.sessions}
    batched, batched_wrong = measure_swarm(True, CLIENTS, prompts, args.sessions, args.tokens, args.rounds, local,
                                           local_seconds, args.peer_threads)
    print("measured the swarm with batching", flush=True)
    unbatched, unbatched_wrong = measure_swarm(False, {"bundled": True}, prompts, args.sessions, args.tokens,
                                               args.rounds, local, local_seconds, args.peer_threads)
    print("measured the swarm without batching", flush=True)
    local.close()

    threads = "torch's default" if args.peer_threads is None else args.peer_threads
    print(f"\nConcurrent sessions, {DEFAULT_MODEL} float32, greedy, {args.tokens} new tokens per session, 3 peers "
          f"({', '.join(LAYOUT)}) on loopback, median of {args.rounds} rounds, {os.cpu_count()} cores, "
          f"peer threads: {threads}\n"
          f"swarm: peers batch sessions, the client bundles their steps (one message per peer and token); "
          f"separate: the same peers, a client sending each session's step alone; unbatched: peers that compute "
          f"sessions one by one\n")
    header = (f"{'sessions':>8}{'local tok/s':>13}{'swarm tok/s':>13}{'swarm/local':>13}{'separate tok/s':>16}"
              f"{'separate/local':>16}{'unbatched tok/s':>17}{'unbatched/local':>17}")
    print(header)
    print("-" * len(header))
    for n in args.sessions:
        total = n * args.tokens
        local_rate = total / statistics.median(local_seconds[n])
        rates = [total / batched["bundled"][n], total / batched["separate"][n], total / unbatched["bundled"][n]]
        print(f"{n:>8}{local_rate:>13.1f}{rates[0]:>13.1f}{rates[0] / local_rate:>12.3f}x{rates[1]:>16.1f}"
              f"{rates[1] / local_rate:>15.3f}x{rates[2]:>17.1f}{rates[2] / local_rate:>16.3f}x")
    sessions_run = args.rounds * sum(args.sessions)
    print(f"\nsessions whose tokens differ from local batch-1 greedy: swarm {batched_wrong['bundled']} of {sessions_run}, "
          f"separate {batched_wrong['separate']} of {sessions_run}, unbatched {unbatched_wrong['bundled']} of "
          f"{sessions_run}")


if __name__ == "__main__":
    main()
