"""False positives of spot checks among honest peers of every configuration, live on loopback with the real model.

An honest swarm mixes float32, bfloat16, int8 and nf4 peers on all 30 blocks, plus a float32 peer on 0:15 and a
bfloat16 one on 15:30 (a chained checker route, used when no single peer is tighter). A strict client checks steps of every peer
directly: each round runs a chat prompt (a different question and length each time) through one subject's
blocks, as a session's first step would, and hands the step to the spot checker, which re-runs it on other
peers and judges it under the tolerance of the configuration pair. Decode steps come from strict answers
(every step checked). Printed: checks per configuration pair, first comparisons outside the pass threshold,
final fail verdicts and honest peers blamed; all should be 0.

    .venv/bin/python benchmarks/honest_checks.py                # 500+ checks, ~15 min on 2 cores
    .venv/bin/python benchmarks/honest_checks.py --rounds 10
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hivemind.p2p import PeerID  # noqa: E402

from peers.local import LocalSwarm  # noqa: E402
from swarm import DistributedModelForCausalLM  # noqa: E402
from swarm.config import STRICT  # noqa: E402
from swarm.hooks import StepRecord  # noqa: E402
from swarm.models import DEFAULT_MODEL  # noqa: E402
from tolerance_prefill import QUESTIONS  # noqa: E402

PEERS = (  # name, blocks, extra args
    ("fp32", "0:30", ()),
    ("bf16", "0:30", ("--dtype", "bfloat16")),
    ("int8", "0:30", ("--quant", "int8")),
    ("nf4", "0:30", ("--quant", "nf4")),
    ("fp32-head", "0:15", ()),
    ("bf16-tail", "15:30", ("--dtype", "bfloat16")),
)


def prompt_ids(model, question: str):
    return model.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )["input_ids"]


def check_directly(model, peer, blocks: tuple[int, int], ids, tag: str) -> str:
    """Run `ids` through `peer`'s blocks as a first step would, and spot-check that step."""
    hidden = model.head.embed(ids)
    peer_id = PeerID.from_base58(peer.peer_id)
    reply = model.loop.run(model.transport.forward(peer_id, *blocks, hidden))
    record = StepRecord(tag, peer_id, *blocks, 0, hidden, reply.output, (hidden,), False, reply.receipt)
    return model.loop.run(model.trust_layer.checker.check(record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=60, help="direct checks of each 0:30 / 0:15 peer")
    parser.add_argument("--answers", type=int, default=30, help="strict 8-token answers (every step checked)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    began = time.perf_counter()
    with LocalSwarm(model=DEFAULT_MODEL) as swarm:
        peers = swarm.add_peers(*PEERS)
        config_of = {peer.peer_id: name for peer, (name, _, _) in zip(peers, PEERS)}
        model = DistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, [swarm.initial_peers], **STRICT)
        outcomes: collections.Counter = collections.Counter()
        try:
            model.loop.run(model.sequence.refresh_spans(force=True))
            subjects = [(peer, tuple(int(b) for b in blocks.split(":")))
                        for peer, (_, blocks, _) in zip(peers, PEERS) if blocks.startswith("0:")]
            for r in range(args.rounds):
                ids = prompt_ids(model, QUESTIONS[r % len(QUESTIONS)])
                for peer, blocks in subjects:
                    outcomes[check_directly(model, peer, blocks, ids, f"direct-{r}-{config_of[peer.peer_id]}")] += 1
            for a in range(args.answers):
                model.generate(prompt_ids(model, QUESTIONS[a % len(QUESTIONS)]), max_new_tokens=8)
            model.loop.run(model.trust_layer.checker.drain())
            stats = model.trust_layer.checker.stats
            node = model.trust_layer.node
            pairs: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
            for subject, checkers, _, _, verdict in stats.comparisons:
                key = (config_of.get(subject, "?"), "+".join(config_of.get(c, "?") for c in checkers.split("+")))
                pairs[key][0] += 1
                pairs[key][1] += verdict != "pass"
            blamed = [config_of[p.peer_id] for p in peers if node.is_blacklisted(p.peer_id)
                      or any(row.peer_id == p.peer_id and row.fails for row in node.standings())]
        finally:
            model.shutdown()

    width = max(len(f"{s} checked by {c}") for s, c in pairs)
    print(f"{'subject checked by checker route'.ljust(width)}  checks  outside pass threshold")
    for (subject, checker), (n, flagged) in sorted(pairs.items()):
        print(f"{f'{subject} checked by {checker}'.ljust(width)}  {n:6d}  {flagged:6d}")
    total = sum(n for n, _ in pairs.values())
    flagged = sum(f for _, f in pairs.values())
    print(f"\nhonest checks compared: {total}, outside the pass threshold: {flagged}, "
          f"faults confirmed: {stats.faults}, inconclusive: {stats.inconclusive}, unverifiable: {stats.unverifiable}, "
          f"honest peers blamed: {len(blamed)} {blamed or ''}")
    print(f"outcomes of the direct checks: {dict(outcomes)}; "
          f"answers: {args.answers} strict; {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
