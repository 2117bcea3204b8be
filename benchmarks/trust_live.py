"""The trust layer live on loopback: how fast real cheating peers are caught, and how honest peers fare.

A local swarm of three honest peers serving all blocks (two float32, one bfloat16) takes in one adversary
at a time (`swarm-peer join --adversary MODE`, which also advertises 10x its throughput to draw traffic).
A client generates short answers with spot checks on until the adversary is blacklisted, then a few more
to show it is no longer routed to. Printed per adversary: its responses until the fault was confirmed, the
answers that came out wrong meanwhile (a cheater caught mid-answer is rewound out of it; one caught only after
the answer ended is not), and for the occasional cheater the formula's prediction 1-(1-pq)^N. Then the honest-vs-honest comparisons seen
(fp32 vs bf16 included), their worst agreement, and the checking overhead.

    .venv/bin/python benchmarks/trust_live.py               # ~5 min on 2 cores
    .venv/bin/python benchmarks/trust_live.py --cheat-trials 5

`benchmarks/trust_matrix.py` runs the adversary matrix (unique span, unique compression, no receipts, padded-only,
Sybil trio, steering, inflation with Sybil countersigners) through N answers each, at the default rates and strict.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peers.local import LocalSwarm  # noqa: E402
from reputation.spotcheck import detection_probability, responses_to_detect  # noqa: E402
from swarm import DistributedModelForCausalLM  # noqa: E402
from swarm.models import DEFAULT_MODEL  # noqa: E402

GOSSIP = ("--gossip-period", "1")
ANSWER = "The capital of France is Paris."


def chat_ids(model):
    return model.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )["input_ids"]


def settle_cost(swarm, ids, answers: int) -> str:
    """Mean answer time in the honest swarm, for a client that waits for each answer's own spot checks
    before returning it and for one that does not, interleaved (both at the newcomers' check rate)."""
    clients = {
        settles: DistributedModelForCausalLM.from_pretrained(
            DEFAULT_MODEL, [swarm.initial_peers], gossip_period=1.0, check_rate=0.3, settle_checks=settles
        )
        for settles in (True, False)
    }
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for _ in range(answers):
            for settles, model in clients.items():
                began = time.perf_counter()
                model.generate(ids, max_new_tokens=8)
                times[settles].append(time.perf_counter() - began)
                model.loop.run(model.trust_layer.checker.drain())
    finally:
        for model in clients.values():
            model.shutdown()
    on, off = (1000 * sum(times[k]) / len(times[k]) for k in (True, False))
    return (f"honest swarm, check rate 0.3, {answers} answers of 8 tokens each: {on:.0f} ms per answer when it waits "
            f"for its own checks, {off:.0f} ms when it does not ({on / off:.2f}x)")


def default_rate_overhead(swarm, ids, answers: int) -> str:
    """The work checks add at the default (adaptive) rates, for a fresh client answering in the honest swarm: the
    token-blocks (batch x tokens x blocks) its checks re-ran per token-block the peers served it. The rate starts at
    the newcomers' 0.3 and falls as the peers earn trust, so the figure depends on how long the client has run."""
    model = DistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, [swarm.initial_peers], gossip_period=1.0)
    try:
        stats = model.trust_layer.checker.stats
        for _ in range(answers):
            model.generate(ids, max_new_tokens=8)
            model.loop.run(model.trust_layer.checker.drain())
    finally:
        model.shutdown()
    per_token = stats.extra_block_tokens / max(stats.served_block_tokens, 1)
    return (f"checking overhead at the default rates, a fresh client's first {answers} answers of 8 tokens: "
            f"{stats.executions} check executions re-ran {stats.extra_block_tokens} token-blocks for "
            f"{stats.served_block_tokens} served token-blocks ({per_token:.2f} extra compute per served token; a check "
            f"re-runs the hop's whole history)")


def run_until_caught(model, ids, peer_id: str, limit: int, tokens: int) -> tuple[int | None, int, float, str]:
    """Generate until `peer_id` is blacklisted or served `limit` responses;
    (caught after, served, seconds, 'wrong answers/answers')."""
    stats, node = model.trust_layer.checker.stats, model.trust_layer.node
    began, answers, wrong = time.perf_counter(), 0, 0
    while not node.is_blacklisted(peer_id) and stats.responses[peer_id] < limit:
        out = model.generate(ids, max_new_tokens=tokens)
        answers += 1
        wrong += not model.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).startswith(ANSWER[:20])
        model.loop.run(model.trust_layer.checker.drain())
    caught = stats.caught_after.get(peer_id) if node.is_blacklisted(peer_id) else None
    return caught, stats.responses[peer_id], time.perf_counter() - began, f"{wrong}/{answers}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cheat-trials", type=int, default=3, help="occasional cheaters to catch, one after another")
    parser.add_argument("--q", type=float, default=0.1, help="fraction of requests the occasional cheater corrupts")
    parser.add_argument("--p", type=float, default=0.5, help="fixed check rate used against the occasional cheater")
    parser.add_argument("--settle-answers", type=int, default=10, help="answers timed with and without settling")
    parser.add_argument("--overhead-answers", type=int, default=20, help="answers measuring the default rates' cost")
    parser.add_argument("--limit", type=int, default=400, help="give up on an adversary after this many responses")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    rows: list[tuple[str, ...]] = []
    with LocalSwarm(model=DEFAULT_MODEL) as swarm:
        honest = swarm.add_peers(
            ("honest-fp32-a", "0:30", GOSSIP),
            ("honest-bf16", "0:30", (*GOSSIP, "--dtype", "bfloat16")),
            ("honest-fp32-b", "0:30", GOSSIP),
        )
        # routes believe announcements here, so that each adversary (10x its throughput) draws the traffic
        adaptive = DistributedModelForCausalLM.from_pretrained(
            DEFAULT_MODEL, [swarm.initial_peers], gossip_period=1.0, route_on_evidence=False
        )
        fixed = DistributedModelForCausalLM.from_pretrained(
            DEFAULT_MODEL, [swarm.initial_peers], gossip_period=1.0, check_rate=args.p, route_on_evidence=False
        )
        ids = chat_ids(adaptive)
        try:
            settle_line = settle_cost(swarm, ids, args.settle_answers)
            overhead_line = default_rate_overhead(swarm, ids, args.overhead_answers)
            for mode in ("random", "skip", "noise", "cheap-quant"):
                peer = swarm.add_peer("0:30", *GOSSIP, "--adversary", mode, name=mode)
                caught, served, seconds, wrong = run_until_caught(adaptive, ids, peer.peer_id, args.limit, tokens=8)
                before = adaptive.trust_layer.checker.stats.responses[peer.peer_id]
                adaptive.generate(ids, max_new_tokens=8)
                after = adaptive.trust_layer.checker.stats.responses[peer.peer_id]
                rows.append((mode, "adaptive (0.3 for newcomers)", "-", f"{caught}" if caught else f"not in {served}",
                             wrong, f"{seconds:.0f} s; routed to it after: {after - before}"))
                peer.signal(2)
            pq = args.p * args.q
            for trial in range(args.cheat_trials):
                peer = swarm.add_peer("0:30", *GOSSIP, "--adversary", f"cheat:{args.q}", name=f"cheat{trial}")
                caught, served, seconds, wrong = run_until_caught(fixed, ids, peer.peer_id, args.limit, tokens=16)
                prob = "-" if caught is None else f"{detection_probability(args.p, args.q, caught):.2f}"
                rows.append((f"cheat:{args.q} #{trial + 1}", f"fixed p={args.p}",
                             f"mean {1 / pq:.0f}, 99% by {responses_to_detect(args.p, args.q)}",
                             f"{caught}" if caught else f"not in {served}", wrong, f"{seconds:.0f} s; P(caught by then)={prob}"))
                peer.signal(2)
        finally:
            honest_ids = {p.peer_id for p in honest}
            comparisons = [c for m in (adaptive, fixed) for c in m.trust_layer.checker.stats.comparisons
                           if c[0] in honest_ids and c[1] in honest_ids]
            flagged = [c for c in comparisons if c[4] != "pass"]
            blacklisted = [p.name for p in honest for m in (adaptive, fixed) if m.trust_layer.node.is_blacklisted(p.peer_id)]
            stats = [m.trust_layer.checker.stats for m in (adaptive, fixed)]
            responses = sum(sum(s.responses.values()) - s.executions for s in stats)
            executions = sum(s.executions for s in stats)
            for m in (adaptive, fixed):
                m.shutdown()

    header = ("adversary", "check rate", "predicted responses", "caught after", "wrong answers", "notes")
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    print()
    mixed = [c for c in comparisons if {c[0], c[1]} & {honest[1].peer_id}]
    worst_cos = min((c[2] for c in comparisons), default=math.nan)
    worst_l2 = max((c[3] for c in comparisons), default=math.nan)
    print(f"honest-vs-honest checks: {len(comparisons)} ({len(mixed)} with the bf16 peer on one side), "
          f"flagged: {len(flagged)}, honest peers blacklisted: {len(blacklisted)}")
    print(f"worst honest agreement: min token cosine {worst_cos:.5f}, relative L2 {worst_l2:.4f} "
          f"(profile passes at >= 0.99 and <= 0.08)")
    settles = sum(s.settles for s in stats)
    settle_ms = 1000 * sum(s.settle_seconds for s in stats) / max(settles, 1)
    print(f"answers that waited for their own checks before returning: {settles}, {settle_ms:.0f} ms on average")
    print(settle_line)
    print(overhead_line)
    print(f"checking overhead: {executions} extra forward passes for {responses} served responses "
          f"({executions / max(responses, 1):.2f} per response; against adversaries the rate is raised on purpose)")


if __name__ == "__main__":
    main()
