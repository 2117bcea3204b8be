"""Speculative decoding with prompt lookup through a 3-peer swarm: round trips per token, and time per token.

For a few prompts (the chat prompt, which ends early; a text that repeats itself and a summary that quotes its
text, where lookup helps; a free answer, where it rarely does), greedy decoding without drafts and with prompt lookup of k = 4 and 8 draft
tokens. Every mode must give the same tokens (asserted). Timed on loopback, and over a slower link emulated
in the client: each step on each hop's stream waits `--rtt-ms` first (the peers stay on loopback), as a round
trip to a peer further away would. ms/token is a generation's wall time (the prompt's step included) over its
new tokens; loopback figures are medians of `--rounds` alternating rounds, the slow link's of one round.
Last, what drafts cost: the time of one loopback step by the tokens it carries (after a 60-token prompt, each
step rolled back), since every draft token is a position the peers compute whether or not it is accepted.

    python benchmarks/speculative.py [--rounds 3] [--rtt-ms 25]
"""

from __future__ import annotations

import os

from swarm.runtime import prefer_passive_openmp

prefer_passive_openmp()  # as swarm-chat and swarm-peer do

import argparse  # noqa: E402
import asyncio  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402

from peers.local import LocalSwarm  # noqa: E402
from swarm import DistributedModelForCausalLM  # noqa: E402
from swarm.models import DEFAULT_MODEL  # noqa: E402

MODES = (0, 4, 8)  # draft tokens per step (0: plain decoding)
STEP_SIZES = (1, 2, 5, 9)  # tokens per step, for the cost of drafts


@dataclass(frozen=True)
class Prompt:
    name: str
    text: str
    chat: bool  # through the chat template
    new_tokens: int
    min_new_tokens: int


SUMMARY = ("Summarize: The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is "
           "named after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.")
PROMPTS = (
    Prompt("chat: capital of France", "What is the capital of France?", True, 64, 0),
    Prompt("text that repeats", "red green blue, red green blue, red green blue, red green blue,", False, 60, 60),
    Prompt("chat: summary (quotes)", SUMMARY, True, 64, 0),
    Prompt("chat: history of Paris", "Tell me about the history of Paris.", True, 32, 32),
)


@dataclass(frozen=True)
class Run:
    tokens: int
    round_trips: int
    accepted: int
    drafted: int
    seconds: float


class DelayedStream:
    """A stream whose every step first waits `delay` seconds: a peer one round trip of that length away."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay = inner, delay

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    async def step(self, *args, **kwargs):
        await asyncio.sleep(self.delay)
        return await self.inner.step(*args, **kwargs)


class DelayedTransport:
    """The client's transport, with each inference step delayed (pings and spot checks are not)."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay = inner, delay

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def open_stream(self, peer_id):
        return DelayedStream(self.inner.open_stream(peer_id), self.delay)


def encode(tokenizer, prompt: Prompt) -> torch.Tensor:
    if prompt.chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt.text}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
    return tokenizer(prompt.text, return_tensors="pt")["input_ids"]


def generate(model: DistributedModelForCausalLM, ids: torch.Tensor, prompt: Prompt, lookup: int
             ) -> tuple[torch.Tensor, Run]:
    began = time.perf_counter()
    output = model.generate(ids, max_new_tokens=prompt.new_tokens, min_new_tokens=prompt.min_new_tokens,
                            prompt_lookup_num_tokens=lookup, return_dict_in_generate=True)
    seconds = time.perf_counter() - began
    stats = output.report.decoding
    return output.sequences, Run(stats.new_tokens, stats.round_trips, stats.accepted, stats.drafted, seconds)


def measure(model, tokenizer, rounds: int) -> dict[tuple[str, int], list[Run]]:
    """Every prompt in every mode, `rounds` times (modes alternate within a round); asserts equal answers."""
    runs: dict[tuple[str, int], list[Run]] = {}
    for prompt in PROMPTS:
        ids = encode(tokenizer, prompt)
        for _ in range(rounds):
            answers = {}
            for lookup in MODES:
                answers[lookup], run = generate(model, ids, prompt, lookup)
                runs.setdefault((prompt.name, lookup), []).append(run)
            plain = answers[0].tolist()
            assert all(answer.tolist() == plain for answer in answers.values()), f"answers differ for {prompt.name}"
    return runs


def step_costs(model, repeats: int = 8) -> list[str]:
    """Median ms of one step through the route by tokens sent (random ids after a 60-token prompt)."""
    generator = torch.Generator().manual_seed(0)
    times: dict[int, list[float]] = {count: [] for count in STEP_SIZES}
    with model.inference_session(max_length=128) as session:
        model.step_logits(session, torch.randint(100, 10_000, (1, 60), generator=generator), None)
        for _ in range(repeats):
            for count in STEP_SIZES:
                ids = torch.randint(100, 10_000, (1, count), generator=generator)
                began = time.perf_counter()
                model.step_logits(session, ids, None, last=count)
                times[count].append(time.perf_counter() - began)
                session.rollback(60)
    lines = [f"One step on loopback by tokens sent (1 + drafts), median of {repeats}", "tokens   ms/step   vs 1 token",
             "-" * 29]
    one = statistics.median(times[1])
    for count, values in times.items():
        lines.append(f"{count:>6}{statistics.median(values) * 1000:>10.1f}{statistics.median(values) / one:>12.2f}x")
    return lines


def table(title: str, runs: dict[tuple[str, int], list[Run]]) -> list[str]:
    header = (f"{'prompt':<26}{'mode':<12}{'tokens':>7}{'round trips':>13}{'tokens/trip':>13}{'accepted':>11}"
              f"{'ms/token':>10}{'speed-up':>10}")
    lines = [title, header, "-" * len(header)]
    for prompt in PROMPTS:
        base = statistics.median(r.seconds for r in runs[(prompt.name, 0)]) / runs[(prompt.name, 0)][0].tokens
        for lookup in MODES:
            group = runs[(prompt.name, lookup)]
            run = group[0]  # tokens and round trips are the same every round
            per_token = statistics.median(r.seconds for r in group) / run.tokens
            mode = "plain" if lookup == 0 else f"lookup k={lookup}"
            accepted = "-" if lookup == 0 else f"{run.accepted}/{run.drafted}"
            lines.append(f"{prompt.name:<26}{mode:<12}{run.tokens:>7}{run.round_trips:>13}"
                         f"{run.tokens / run.round_trips:>13.2f}{accepted:>11}{per_token * 1000:>10.1f}"
                         f"{base / per_token:>9.2f}x")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rtt-ms", type=float, default=25.0)
    args = parser.parse_args()
    began = time.perf_counter()
    with LocalSwarm(model=DEFAULT_MODEL) as swarm:
        started = [swarm.add_peer(blocks, wait=False) for blocks in ("0:10", "10:20", "20:30")]
        for peer in started:
            swarm.wait_online(peer)
        model = DistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, [swarm.initial_peers])
        try:
            tokenizer = model.tokenizer
            model.generate(encode(tokenizer, PROMPTS[0]), max_new_tokens=8)  # warm-up: route, pings, streams
            loopback = measure(model, tokenizer, args.rounds)
            costs = step_costs(model)
            print("measured loopback", flush=True)
            model.transport = DelayedTransport(model.transport, args.rtt_ms / 1000)
            delayed = measure(model, tokenizer, 1)
        finally:
            model.shutdown()
    print(f"\nSpeculative decoding (prompt lookup: matches of 2 tokens, drafts of up to k adapting), {DEFAULT_MODEL} float32, greedy, 3 peers "
          f"(blocks 0:10, 10:20, 20:30), {torch.get_num_threads()} torch threads per process, {os.cpu_count()} cores; "
          f"answers identical in every mode; {time.perf_counter() - began:.0f} s\n")
    for line in table(f"Loopback, median of {args.rounds} rounds", loopback):
        print(line)
    print()
    for line in table(f"Each step on each hop delayed by {args.rtt_ms:g} ms (a slower link), 1 round", delayed):
        print(line)
    print()
    for line in costs:
        print(line)


if __name__ == "__main__":
    main()
