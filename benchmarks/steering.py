"""What it takes to steer an answer on the real default model, and what catches it: the calibration of the effect
check (reputation.effect) next to the numeric tolerances (reputation.tolerance).

Every configuration a peer may declare without SVD (float32 / bfloat16 / float16 compute, none / int8 / nf4
weights; --quick: fp32, bf16, fp32+int8) runs the whole model (blocks 0:30: the worst span, errors add up along
a chain) the two ways a check compares: as a session (a prefill, then one token per step with its KV cache) and
as a re-run of the whole sequence. Sequences: passages of real text (the last 8 tokens stepped) and chat answers
(a question, then the float32 model's greedy answer, every answer token stepped: exactly what generation reads).
Each output goes through the client's float32 head (final norm + LM head).

1. Honest leads. For each pair (subject, checker), both directions: the subject's outputs (session steps and
   whole sequence) against the checker's whole-sequence outputs, position by position: positions compared, those
   where the top-1 token differs, and the checker's largest lead (top-1 minus runner-up logit) at such a change;
   then the positions that would fail the effect check under `reputation.effect.pair_margin` (must be 0), and
   how many positions have a lead clear of that margin (what the check covers). And the spread of the float32
   model's leads at the positions generation reads.
2. Steering. "What is the capital of France?", at the position where " Paris" wins: the smallest relative L2
   (of the last position's update, what a check measures on a one-token step) of a push towards " London" that
   makes it win (`peers.testing.adversaries.steering_push`), for a subject of each configuration, and for float32
   on spans 0:30, 20:30 and 29:30 (the shorter the span, the smaller its update, the larger the relative push).
   Then, per (subject, checker) pair, at that size and at the adversary's default 0.075: the pair's tolerance, the
   numeric verdict and the effect check's verdict.

    python benchmarks/steering.py                           # fp32, bf16, fp16, fp32+int8, bf16+int8 (684 s, 2 busy cores)
    python benchmarks/steering.py --quick                   # fp32, bf16, fp32+int8, fewer sequences
    python benchmarks/steering.py --all                     # every configuration without SVD (225 s on 2 quieter cores)
    python benchmarks/steering.py --outputs /tmp/steer.pt   # keep what was run, to print the tables again at once
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from benchmarks.tolerance_pairs import QUANTS, config_name, texts  # noqa: E402
from peers.config import PeerConfig  # noqa: E402
from peers.loading import build_span  # noqa: E402
from peers.testing.adversaries import STEER_REL_L2, load_steering_head, steering_push  # noqa: E402
from reputation.effect import effect_verdict, pair_margin, top_two  # noqa: E402
from reputation.tolerance import compare_updates, judge, pair_profile  # noqa: E402
from swarm.blocks import BlockSpan, SpanInput  # noqa: E402
from swarm.head import ClientHead  # noqa: E402
from swarm.models import DEFAULT_MODEL, open_model  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")
QUESTIONS = (
    "What is the capital of France?", "What is the capital of Germany?", "Who wrote Romeo and Juliet?",
    "What is 2 + 2?", "Name a primary color.", "What is the largest planet in the solar system?",
    "How many days are in a week?", "What language is spoken in Brazil?", "What do bees make?",
    "Tell me a fun fact about octopuses.",
)
STEER_QUESTION, STEER_PREFIX = "What is the capital of France?", "The capital of France is"


@dataclass
class Sequence:
    kind: str  # "text" | "chat"
    ids: torch.Tensor  # (1, tokens)
    stepped_from: int  # positions from here on are one-token session steps (the one before: the prefill's last)


@dataclass
class Tops:
    """One configuration's outputs for one sequence, as the client's head sees them."""

    session: tuple[torch.Tensor, torch.Tensor]  # (top-1, lead) at the prefill's last position and every step
    whole: tuple[torch.Tensor, torch.Tensor]  # (top-1, lead) at every position of the whole-sequence re-run


def chat_ids(tokenizer, question: str, answer: str = "") -> torch.Tensor:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    if answer:
        ids = torch.cat([ids, torch.tensor([tokenizer(answer, add_special_tokens=False)["input_ids"]])], dim=1)
    return ids


@torch.inference_mode()
def greedy(span: BlockSpan, head: ClientHead, ids: torch.Tensor, tokens: int, eos: int | None) -> torch.Tensor:
    cache = span.new_cache()
    hidden = span(head.embed(ids), cache, SpanInput(None, 0))
    for _ in range(tokens):
        token = head.logits(hidden[:, -1:]).argmax(-1)  # (1, 1)
        ids = torch.cat([ids, token], dim=1)
        if eos is not None and int(token) == eos:
            break
        hidden = span(head.embed(token), cache, SpanInput(None, ids.shape[1] - 1))
    return ids


@torch.inference_mode()
def run(span: BlockSpan, dtype: torch.dtype, head: ClientHead, seq: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """(session outputs from the prefill's last position on, whole-sequence outputs), float32 as on the wire."""
    hidden = head.embed(seq.ids)
    whole = span(hidden.to(dtype), None, SpanInput(None, 0)).float()
    cache = span.new_cache()
    start = seq.stepped_from
    outs = [span(hidden[:, :start].to(dtype), cache, SpanInput(None, 0)).float()[:, -1:]]
    outs += [span(hidden[:, t : t + 1].to(dtype), cache, SpanInput(None, t)).float()
             for t in range(start, hidden.shape[1])]
    return torch.cat(outs, dim=1), whole


def tops(head: ClientHead, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return top_two(head.logits(hidden))


def compare(subject: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor],
            margin: float | None) -> tuple[int, int, float, int, int]:
    """(positions, top-1 changes, largest reference lead at a change, fails at `margin`, clear positions)."""
    changed = subject[0] != reference[0]
    lead = reference[1]
    worst = float(lead[changed].max()) if bool(changed.any()) else 0.0
    if margin is None:
        return int(lead.numel()), int(changed.sum()), worst, 0, 0
    clear = lead > margin
    return int(lead.numel()), int(changed.sum()), worst, int((changed & clear).sum()), int(clear.sum())


def honest_leads(configs, results: dict, sequences: list[Sequence]) -> None:
    print(f"\n1. Honest top-1 changes, blocks 0:30, {sum(s.kind == 'text' for s in sequences)} text passages and "
          f"{sum(s.kind == 'chat' for s in sequences)} chat answers, both directions")
    print(f"{'subject ~ checker':<24} {'positions':>9} {'changed':>8} {'max lead at change':>19} "
          f"{'margin':>7} {'fails':>6} {'clear':>7}")
    for a, b in itertools.combinations_with_replacement(configs, 2):
        margin = pair_margin(a, b)
        total = [0, 0, 0.0, 0, 0]
        for (subject, checker), index in itertools.product(((a, b), (b, a)), range(len(sequences))):
            reference = results[(checker, index)].whole
            offset = sequences[index].stepped_from - 1
            session_ref = (reference[0][offset:], reference[1][offset:])
            forms = [(results[(subject, index)].session, session_ref)]
            if sequences[index].kind == "text":  # a prefill's every position (generation reads only the last)
                forms.append((results[(subject, index)].whole, reference))
            for mine, theirs in forms:
                n, changed, worst, fails, clear = compare(mine, theirs, margin)
                total = [total[0] + n, total[1] + changed, max(total[2], worst), total[3] + fails, total[4] + clear]
        shown = "-" if margin is None else f"{margin:.2f}"
        print(f"{config_name(*a) + ' ~ ' + config_name(*b):<24} {total[0]:>9} {total[1]:>8} {total[2]:>19.3f} "
              f"{shown:>7} {total[3]:>6} {total[4]:>7}")


def lead_spread(results: dict, sequences: list[Sequence]) -> None:
    leads = torch.cat([results[(("float32", "none"), i)].session[1] for i, s in enumerate(sequences) if s.kind == "chat"])
    quantiles = torch.quantile(leads, torch.tensor([0.05, 0.1, 0.25, 0.5, 0.75, 0.9]))
    print(f"\nfloat32 model's lead of its top-1 at the {leads.numel()} positions generation read in the chat answers "
          f"(logits): " + ", ".join(f"p{int(q * 100)} {v:.2f}" for q, v in zip((0.05, 0.1, 0.25, 0.5, 0.75, 0.9), quantiles))
          + f"; share above 0.5: {float((leads > 0.5).float().mean()):.2f}, above 1: {float((leads > 1).float().mean()):.2f}, "
          f"above 2: {float((leads > 2).float().mean()):.2f}")


def smallest_flip(last: torch.Tensor, update_norm: float, steering, limit: float = 2.0) -> float | None:
    """The smallest relative L2 (to `update_norm`) of a push that makes the target the top-1 token, to 1e-3: up
    in steps of 0.01 to the first size that flips (a push much larger than needed may overshoot to a third
    token), then halving the last step."""
    head = steering.head

    def flips(rel: float) -> bool:
        push = steering_push(last, head, steering.target, rel * update_norm)
        return int(head.logits((last + push)[None, None]).argmax()) == steering.target

    low, high = 0.0, 0.01
    while not flips(high):
        if high >= limit:
            return None
        low, high = high, high + 0.01
    while high - low > 1e-3:
        mid = (low + high) / 2
        low, high = (low, mid) if flips(mid) else (mid, high)
    return high


def steering_table(configs, spans_out: dict, steering, fp32_spans: dict[str, float]) -> None:
    head = steering.head
    print(f"\n2. Steering \"{STEER_QUESTION}\" at the position where \" Paris\" wins, towards \" London\"")
    print("smallest relative L2 of the last position's update that makes \" London\" win, float32 subject: "
          + ", ".join(f"blocks {span}: {rel:.3f}" if rel is not None else f"blocks {span}: none up to 2.0"
                      for span, rel in fp32_spans.items()))
    print(f"{'subject':<11} {'its top-1':<9} {'flip at':>7}   {'checker':<11} {'pass <=':>8} {'fail >':>7} "
          f"{'margin':>6}   {'numeric/effect at flip':<24} numeric/effect at {STEER_REL_L2}")
    for a in configs:
        x, own, _ = spans_out[a]  # the step's input (1, 1, hidden) and the subject's own session output
        last = own[0, -1]
        top = int(head.logits(own).argmax())
        flip = smallest_flip(last, float((last - x[0, -1]).norm()), steering) if top == steering.trigger else None
        for b in configs:
            reference = spans_out[b][2]  # the checker's re-run of the whole sequence
            profile, margin = pair_profile(a, b), pair_margin(a, b)
            verdicts = []
            for rel in (flip, STEER_REL_L2):
                if rel is None or profile is None:
                    verdicts.append("-")
                    continue
                size = rel * float((last - x[0, -1]).norm())
                steered = (last + steering_push(last, head, steering.target, size))[None, None]
                numeric = judge(compare_updates(x, reference, steered), profile)
                effect = "-" if margin is None else effect_verdict(head.logits(steered), head.logits(reference), margin).verdict
                verdicts.append(f"{numeric}/{effect}")
            top_text = "Paris" if top == steering.trigger else str(top)
            flip_text = "-" if flip is None else f"{flip:.3f}"
            shown_margin = "-" if margin is None else f"{margin:.2f}"
            print(f"{config_name(*a):<11} {top_text:<9} {flip_text:>7}   {config_name(*b):<11} "
                  f"{profile.pass_max_rel_l2:>8.3f} {profile.fail_max_rel_l2:>7.3f} {shown_margin:>6}   "
                  f"{verdicts[0]:<24} {verdicts[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--all", action="store_true")
    parser.add_argument("--outputs", type=Path, help="load what was run from this file, or run and save it there")
    args = parser.parse_args()
    steering = load_steering_head()
    if args.outputs is not None and args.outputs.exists():
        measured = torch.load(args.outputs, weights_only=False)
    else:
        measured = measure(args)
        if args.outputs is not None:
            torch.save(measured, args.outputs)
    configs, results, sequences, spans_out, fp32_spans, seconds = measured
    print(f"CPU, {DEFAULT_MODEL}, the client's float32 head, {seconds:.0f} s")
    honest_leads(configs, results, sequences)
    lead_spread(results, sequences)
    steering_table(configs, spans_out, steering, fp32_spans)


def measure(args) -> tuple:
    torch.manual_seed(0)
    began = time.perf_counter()
    checkpoint = open_model(DEFAULT_MODEL)
    model_config, tokenizer = checkpoint.load_config(), checkpoint.load_tokenizer()
    n = checkpoint.num_blocks
    head = ClientHead(checkpoint, model_config, torch.float32)
    steering = load_steering_head()
    if args.all:
        configs = [(d, q) for d in DTYPES for q in QUANTS]
    elif args.quick:
        configs = [("float32", "none"), ("bfloat16", "none"), ("float32", "int8")]
    else:
        configs = [("float32", "none"), ("bfloat16", "none"), ("float16", "none"), ("float32", "int8"),
                   ("bfloat16", "int8")]
    reference = BlockSpan(model_config, 0, n)
    reference.load_blocks(checkpoint.load_block_state)
    sequences = [Sequence("text", ids, ids.shape[1] - 8) for ids in texts(tokenizer, 2 if args.quick else 4, 96)]
    for question in QUESTIONS[: 4 if args.quick else len(QUESTIONS)]:
        prompt = chat_ids(tokenizer, question)
        answered = greedy(reference, head, prompt, 24, tokenizer.eos_token_id)
        sequences.append(Sequence("chat", answered, prompt.shape[1]))
    steer_ids = chat_ids(tokenizer, STEER_QUESTION, STEER_PREFIX)
    steer_seq = Sequence("steer", steer_ids, steer_ids.shape[1] - 1)
    fp32_spans = {}
    with torch.inference_mode():  # float32 spans ending at the last block: the push a flip needs grows as they shrink
        hidden = head.embed(steer_ids)
        for block in range(n):
            if block in (0, n - 10, n - 1):
                start_hidden = hidden
                full = reference(hidden, None, SpanInput(None, 0), block, n)
                x, last = start_hidden[0, -1], full[0, -1]
                fp32_spans[f"{block}:{n}"] = smallest_flip(last, float((last - x).norm()), steering)
            hidden = reference(hidden, None, SpanInput(None, 0), block, block + 1)
    del reference
    results, spans_out = {}, {}
    for dtype, quant in configs:
        cfg = PeerConfig(model=DEFAULT_MODEL, initial_peers=(), dtype=dtype, quant=quant)
        span = build_span(checkpoint, model_config, 0, n, cfg)
        for index, seq in enumerate(sequences):
            session, whole = run(span, cfg.torch_dtype(), head, seq)
            results[((dtype, quant), index)] = Tops(tops(head, session), tops(head, whole))
        session, whole = run(span, cfg.torch_dtype(), head, steer_seq)
        x = head.embed(steer_ids)[:, -1:]
        spans_out[(dtype, quant)] = (x, session[:, -1:], whole[:, -1:])
        del span
        print(f"  ran {config_name(dtype, quant)} ({time.perf_counter() - began:.0f} s)", file=sys.stderr)
    return configs, results, sequences, spans_out, fp32_spans, time.perf_counter() - began


if __name__ == "__main__":
    main()
