"""Churn: greedy generations through a redundant loopback swarm while peers are SIGKILLed and restarted.

Two peers serve each of the spans 0:10, 10:20 and 20:30. A chaos thread kills a random peer (never the last
online one of its span: a restarted peer still loading does not count), restarts it a few seconds later, and
repeats. The client runs the generations, one after another or `--concurrent N` at a time (the peers then batch
them and the client bundles their steps), and compares each with the local model's output for the same prompt.

    python benchmarks/churn.py [--generations 100] [--tokens 16] [--concurrent 1] [--no-push] [--seed 0]
"""

from __future__ import annotations

from swarm.runtime import prefer_passive_openmp

prefer_passive_openmp()  # as swarm-chat and swarm-peer do

import argparse  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from peers.local import LocalSwarm, PeerProcess  # noqa: E402
from swarm import DistributedModelForCausalLM  # noqa: E402
from swarm.errors import SwarmError  # noqa: E402
from swarm.models import DEFAULT_MODEL, open_model  # noqa: E402

SPANS = ("0:10", "10:20", "20:30")
TOPICS = ["the sea", "a mountain", "bread", "a violin", "the moon", "rain", "a library", "trains", "honey", "snow"]


class Chaos(threading.Thread):
    """Kill a random peer every `period` seconds (keeping one per span online) and restart it after `downtime`."""

    def __init__(self, swarm: LocalSwarm, peers: dict[str, list[PeerProcess]], period: float, downtime: float, seed: int):
        super().__init__(daemon=True)
        self.swarm, self.peers, self.period, self.downtime = swarm, peers, period, downtime
        self.random = random.Random(seed)
        self.stop_event = threading.Event()
        self.kills = 0

    def run(self) -> None:
        while not self.stop_event.wait(self.random.uniform(0.5, 1.5) * self.period):
            span = self.random.choice(SPANS)
            alive = [p for p in self.peers[span] if p.online()]
            if len(alive) < 2:
                continue
            victim = self.random.choice(alive)
            victim.kill_group()
            self.kills += 1
            if self.stop_event.wait(self.downtime):
                return
            self.peers[span].remove(victim)
            self.peers[span].append(self.swarm.add_peer(span, wait=False, name=f"{span.replace(':', '-')}-{self.kills}"))


def prompts(tokenizer) -> list[torch.Tensor]:
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": f"Write a short poem about {topic}."}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        for topic in TOPICS
    ]


@dataclass
class Tally:
    completed: int = 0
    failed: int = 0
    differing: int = 0
    bundled_steps: int = 0
    durations: list[float] = field(default_factory=list)
    failovers: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def generate_one(model: DistributedModelForCausalLM, i: int, ids: torch.Tensor, expected: list, tokens: int,
                 tally: Tally) -> None:
    began = time.perf_counter()
    try:
        with model.inference_session(max_length=ids.shape[1] + tokens) as session:
            output = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, session=session)
            failovers = [event.seconds for event in session.inner.failovers]
    except SwarmError as error:
        with tally.lock:
            tally.failed += 1
        tqdm.write(f"generation {i} failed: {error}")
        return
    with tally.lock:
        tally.durations.append(time.perf_counter() - began)
        tally.failovers.extend(failovers)
        tally.completed += 1
        tally.differing += output.tolist() != expected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--kill-period", type=float, default=8.0, help="mean seconds between kills")
    parser.add_argument("--downtime", type=float, default=4.0, help="seconds before a killed peer restarts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--push", action=argparse.BooleanOptionalAction, default=True,
                        help="decode steps travel as push chains (ClientConfig.push, on by default)")
    parser.add_argument("--concurrent", type=int, default=1, help="generations running at once")
    args = parser.parse_args()
    if args.concurrent < 1 or args.generations < 1 or args.tokens < 1:
        parser.error("--concurrent, --generations and --tokens must be at least 1")

    checkpoint = open_model(DEFAULT_MODEL)
    tokenizer = checkpoint.load_tokenizer()
    local = checkpoint.load_causal_lm()
    inputs = prompts(tokenizer)
    expected = [local.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False).tolist()
                for ids in tqdm(inputs, desc="no-churn reference")]
    del local

    tally = Tally()
    with LocalSwarm(model=DEFAULT_MODEL) as swarm:
        peers = {span: [swarm.add_peer(span, wait=False, name=f"{span.replace(':', '-')}-{i}") for i in range(2)]
                 for span in SPANS}
        for group in peers.values():
            for peer in group:
                swarm.wait_online(peer)
        model = DistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, [swarm.initial_peers], push=args.push)
        chaos = Chaos(swarm, peers, args.kill_period, args.downtime, args.seed)
        chaos.start()
        try:
            with ThreadPoolExecutor(args.concurrent) as pool, tqdm(total=args.generations,
                                                                   desc="generations under churn") as bar:
                jobs = [pool.submit(generate_one, model, i, inputs[i % len(inputs)], expected[i % len(inputs)],
                                    args.tokens, tally) for i in range(args.generations)]
                for job in jobs:
                    job.result()
                    bar.update()
            tally.bundled_steps = model.transport.bundled_steps
        finally:
            chaos.stop_event.set()
            chaos.join(timeout=60)
            model.shutdown()
    completed, failed, differing, durations, failovers = (tally.completed, tally.failed, tally.differing,
                                                          tally.durations, tally.failovers)

    def quantile(values: list[float], q: float) -> float:
        return sorted(values)[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    print(f"\nChurn: {args.generations} greedy generations of {args.tokens} tokens, {DEFAULT_MODEL}, 2 peers per span, "
          f"a peer SIGKILLed every ~{args.kill_period:.0f} s and restarted {args.downtime:.0f} s later"
          f"{', push chains on' if args.push else ', push chains off'}, {args.concurrent} at a time\n")
    rows = [
        ("peers killed", f"{chaos.kills}"),
        ("sessions completed", f"{completed}"),
        ("sessions failed", f"{failed}"),
        ("outputs differing from the no-churn run", f"{differing}"),
        ("steps sent in bundles", f"{tally.bundled_steps}"),
        ("fail-overs", f"{len(failovers)}"),
        ("fail-over extra latency, median", f"{statistics.median(failovers) * 1000:.0f} ms" if failovers else "-"),
        ("fail-over extra latency, p95", f"{quantile(failovers, 0.95) * 1000:.0f} ms" if failovers else "-"),
        ("generation time, median", f"{statistics.median(durations):.2f} s" if durations else "-"),
        ("generation time, longest", f"{max(durations):.2f} s" if durations else "-"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value:>10}")


if __name__ == "__main__":
    main()
