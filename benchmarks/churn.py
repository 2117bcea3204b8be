"""Churn: greedy generations through a redundant loopback swarm while peers are SIGKILLed and restarted.

Two peers serve each of the spans 0:10, 10:20 and 20:30. A chaos thread kills a random peer (never the
last live one of its span), restarts it a few seconds later, and repeats. The client runs the
generations one after another and compares each with the local model's output for the same prompt.

    python benchmarks/churn.py [--generations 100] [--tokens 16] [--seed 0]
"""

from __future__ import annotations

from swarm.runtime import prefer_passive_openmp

prefer_passive_openmp()  # as swarm-chat and swarm-peer do

import argparse  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from peers.local import LocalSwarm, PeerProcess  # noqa: E402
from swarm import DistributedModelForCausalLM  # noqa: E402
from swarm.errors import SwarmError  # noqa: E402
from swarm.models import DEFAULT_MODEL, open_model  # noqa: E402

SPANS = ("0:10", "10:20", "20:30")
TOPICS = ["the sea", "a mountain", "bread", "a violin", "the moon", "rain", "a library", "trains", "honey", "snow"]


class Chaos(threading.Thread):
    """Kill a random peer every `period` seconds (keeping one per span alive) and restart it after `downtime`."""

    def __init__(self, swarm: LocalSwarm, peers: dict[str, list[PeerProcess]], period: float, downtime: float, seed: int):
        super().__init__(daemon=True)
        self.swarm, self.peers, self.period, self.downtime = swarm, peers, period, downtime
        self.random = random.Random(seed)
        self.stop_event = threading.Event()
        self.kills = 0

    def run(self) -> None:
        while not self.stop_event.wait(self.random.uniform(0.5, 1.5) * self.period):
            span = self.random.choice(SPANS)
            alive = [p for p in self.peers[span] if p.alive()]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--kill-period", type=float, default=8.0, help="mean seconds between kills")
    parser.add_argument("--downtime", type=float, default=4.0, help="seconds before a killed peer restarts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--push", action="store_true", help="decode steps travel as push chains (ClientConfig.push)")
    args = parser.parse_args()

    checkpoint = open_model(DEFAULT_MODEL)
    tokenizer = checkpoint.load_tokenizer()
    local = checkpoint.load_causal_lm()
    inputs = prompts(tokenizer)
    expected = [local.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False).tolist()
                for ids in tqdm(inputs, desc="no-churn reference")]
    del local

    completed, failed, differing, durations, failovers = 0, 0, 0, [], []
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
            for i in tqdm(range(args.generations), desc="generations under churn"):
                ids = inputs[i % len(inputs)]
                began = time.perf_counter()
                try:
                    with model.inference_session(max_length=ids.shape[1] + args.tokens) as session:
                        output = model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                                session=session)
                        failovers.extend(event.seconds for event in session.inner.failovers)
                except SwarmError as error:
                    failed += 1
                    tqdm.write(f"generation {i} failed: {error}")
                    continue
                durations.append(time.perf_counter() - began)
                completed += 1
                differing += output.tolist() != expected[i % len(inputs)]
        finally:
            chaos.stop_event.set()
            chaos.join(timeout=60)
            model.shutdown()

    def quantile(values: list[float], q: float) -> float:
        return sorted(values)[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    print(f"\nChurn: {args.generations} greedy generations of {args.tokens} tokens, {DEFAULT_MODEL}, 2 peers per span, "
          f"a peer SIGKILLed every ~{args.kill_period:.0f} s and restarted {args.downtime:.0f} s later"
          f"{', push chains on' if args.push else ''}\n")
    rows = [
        ("peers killed", f"{chaos.kills}"),
        ("sessions completed", f"{completed}"),
        ("sessions failed", f"{failed}"),
        ("outputs differing from the no-churn run", f"{differing}"),
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
