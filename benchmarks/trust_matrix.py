"""The trust layer's adversary matrix, live on loopback with the real model: every adversary class through N answers
(default 30) at the default check rates and in strict mode, against the outcomes the trust layer promises.

One swarm of six honest float32 peers (two each on blocks 0:10, 10:20 and 20:30, gossiping every second) stays up;
each scenario adds its adversary (and any honest peer it needs), runs fresh clients through it, and stops them.
The scenarios (`SCENARIOS`, one line each; a mode missing from `peers.testing.adversaries.ADVERSARIES` prints a
row saying so):

- unique-span         a `random` peer on blocks 0:20, a span nobody else serves (checked through chains)
- unique-compression  a `random` peer on 10:30 declaring int8, a compression nobody else declares
- no-receipt          a peer on 0:30 that computes honestly but replies without receipts
- padded-only         a peer on 10:30 that corrupts only padded batches; every answer is a batch of two
                      left-padded prompts of different lengths, with their attention mask
- sybil-trio          an honest peer on 0:30 (joined for the scenario) and three `sybil` identities on its span
- bundled-only        a peer on 0:20 that corrupts only the steps that reach it in bundles; the clients answer 3
                      questions at once, so their sessions' decode steps go to it bundled
- steer               within-tolerance steering that flips the answer (mode `steer`, when it exists)
- inflate-sybil-cs    an `inflate` peer on 0:30 (its receipts claim 10x the tokens) and three Sybil clients of the
                      same owner that route through it, accept its inflated receipts, countersign the tokens they
                      claim and gossip those countersignatures (`SybilClientTrust`)

Every adversary advertises 10x its throughput, and the clients believe announcements (`route_on_evidence=False`),
so routes pick it. Per scenario, two fresh clients (default and strict) first answer in the all-honest swarm checking
every step, until each trusts every honest peer (at most `--warm-up` answers; a scenario's own honest peers join
after that, and are vouched for the same way), as clients that have used the swarm for a while would: without seeds,
a brand-new client has no trusted referee to weigh a dispute by (the README's cold-start limit). Then the adversary
joins; the default client (newcomers checked at 0.3 a step, trusted peers at 0.05; answers wait for their own
checks) answers N questions, then the strict client (`swarm.config.STRICT`: every step checked, answers wait for
every check) answers N. (The default client's verdicts reach the strict one by gossip as accusations; a strict client
checks every reply anyway.)

A wrong answer is one whose 8 new tokens (of either row, for a padded batch) differ from the local model's greedy
answer (transformers on the same checkpoint); "flagged" is the answer's own report (`GenerationReport.flagged`:
coverage below 1), and "mean coverage" the mean of every answer's `coverage`. Credit is read from the client's own
ledger (`node.standings()`, vested + pending; each `generate` opens and closes its own session, so every answer's
work is countersigned at its close), counting only what the measured answers added after the warm-up; the cheater's
is the sum over its identities, the honest side's that of its best peer. "Cheater blacklisted" is `yes` when every
identity of the cheater is blacklisted in the client's view, and says how many hop-steps of the client's sessions
its identities served (replies refused for their receipts are not served; the notes count them). A row lists the
requirements it misses after FAILS. The checking overhead comes from the default client's `CheckStats`: blocks its
check executions re-ran (each execution once) and their batch x tokens x blocks (a check re-runs the hop's whole
history so far), each over the served batch x new tokens x blocks.

    PYTHONPATH=. .venv/bin/python benchmarks/trust_matrix.py                   # every scenario, 30 answers each
    PYTHONPATH=. .venv/bin/python benchmarks/trust_matrix.py --quick           # a smoke run: 2 scenarios, 2 answers
    PYTHONPATH=. .venv/bin/python benchmarks/trust_matrix.py --answers 5 --scenarios no-receipt,padded-only
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peers.local import LocalSwarm, PeerProcess  # noqa: E402
from peers.testing.adversaries import ADVERSARIES  # noqa: E402
from reputation.attest import Countersigned  # noqa: E402
from reputation.checks import ESTABLISHED  # noqa: E402
from reputation.client import ClientTrust  # noqa: E402
from reputation.ledger import credit_receipts, standings  # noqa: E402
from swarm import DistributedModelForCausalLM  # noqa: E402
from swarm.config import STRICT  # noqa: E402
from swarm.errors import SwarmConnectionError  # noqa: E402
from swarm.models import DEFAULT_MODEL, open_model  # noqa: E402

TOKENS = 8  # new tokens per answer
GOSSIP = ("--gossip-period", "1")
HONEST = ("0:10", "10:20", "20:30")  # two honest float32 peers on each
QUESTIONS = ("What is the capital of France?", "What is 2 + 2?", "Name a primary colour.")
PADDED = (
    ("The capital of France is", "Once upon a time, in a small village by the sea, there lived"),
    ("The capital of Italy is", "In the early years of the twentieth century, a young engineer travelled to"),
)
LIMITS = {"credit_share": 0.01, "wrong_default": 0.1, "wrong_strict": 0}  # the bars (3 of 30 = 0.1)


@dataclass(frozen=True)
class Scenario:
    name: str
    mode: str  # the adversary's `--adversary` mode
    cheaters: tuple[tuple[str, tuple[str, ...]], ...]  # (blocks, extra join arguments) of each identity
    honest: tuple[tuple[str, tuple[str, ...]], ...] = ()  # honest peers the scenario adds for itself
    padded: bool = False  # answers are batches of two left-padded prompts
    sybil_clients: int = 0  # clients of the cheater's owner that countersign what its receipts claim
    concurrent: int = 1  # answers a client runs at once (its sessions' steps to a peer then travel in bundles)


SCENARIOS = (
    Scenario("unique-span", "random", (("0:20", ()),)),
    Scenario("unique-compression", "random", (("10:30", ("--quant", "int8")),)),
    Scenario("no-receipt", "no-receipt", (("0:30", ()),)),
    Scenario("padded-only", "padded-only", (("10:30", ()),), padded=True),
    Scenario("bundled-only", "bundled-only", (("0:20", ()),), concurrent=3),
    Scenario("sybil-trio", "sybil", (("0:30", ()),) * 3, honest=(("0:30", ()),)),
    Scenario("steer", "steer", (("0:30", ()),)),
    Scenario("inflate-sybil-cs", "inflate", (("0:30", ()),), sybil_clients=3),
)
BY_NAME = {s.name: s for s in SCENARIOS}
QUICK = ("no-receipt", "padded-only")


class SybilClientTrust(ClientTrust):
    """A client run by a cheating peer's owner: it takes every reply whatever its receipt says, and at each session's
    close countersigns each hop's last receipt with the tokens the receipt claims (not the tokens it sent)."""

    def __init__(self, context):
        super().__init__(context)
        node = self.node

        def countersign(receipt, tokens: int, verified: bool = True) -> Countersigned | None:
            if receipt.signer == node.peer_id:
                return None
            work = Countersigned.make(receipt, node.peer_id, node.private_key, receipt.tokens, node.puzzle_nonce)
            node.ingest("work", work.encode())
            return work

        node.countersign = countersign

    def verify(self, sent, inputs, reply) -> None:
        return None


@dataclass
class Prompt:
    ids: torch.Tensor
    mask: torch.Tensor | None
    expected: list[list[int]]  # the local model's greedy new tokens, per row


@dataclass
class Row:
    scenario: str
    mode: str
    answers: int = 0
    wrong: int = 0
    wrong_unflagged: int = 0
    flagged: int = 0
    coverage: float = float("nan")
    cheater: str = "-"
    blamed: str = "-"
    credit: str = "-"
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # the requirements this row misses

    def cells(self) -> tuple[str, ...]:
        coverage = "-" if self.coverage != self.coverage else f"{self.coverage:.2f}"
        answers = "-" if self.mode == "-" else str(self.answers)
        count = (lambda n: "-" if self.mode == "-" else str(n))
        return (self.scenario, self.mode, answers, count(self.wrong), count(self.wrong_unflagged), count(self.flagged),
                coverage, self.cheater, self.blamed, self.credit, "-" if self.mode == "-" else f"{self.seconds:.0f}",
                "; ".join(self.notes + [f"FAILS: {', '.join(self.failed)}"] * bool(self.failed)))


HEADER = ("scenario", "mode", "answers", "wrong", "wrong+unflagged", "flagged", "mean coverage", "cheater blacklisted",
          "honest blamed", "cheater / best honest credit", "s", "notes")


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def build_prompts(tokenizer, local, padded: bool) -> list[Prompt]:
    prompts = []
    if padded:
        tokenizer.padding_side = "left"
        for pair in PADDED:
            batch = tokenizer(list(pair), return_tensors="pt", padding=True)
            assert (batch["attention_mask"] == 0).any()
            prompts.append(Prompt(batch["input_ids"], batch["attention_mask"], []))
    else:
        for question in QUESTIONS:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
            prompts.append(Prompt(ids, None, []))
    with torch.no_grad():
        for prompt in prompts:
            out = local.generate(prompt.ids, attention_mask=prompt.mask, max_new_tokens=TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            prompt.expected = out[:, prompt.ids.shape[1]:].tolist()
    return prompts


def answer(model, prompt: Prompt):
    """(new tokens per row, the answer's GenerationReport)."""
    result = model.generate(prompt.ids, prompt.mask, max_new_tokens=TOKENS, pad_token_id=model.tokenizer.pad_token_id,
                            return_dict_in_generate=True)
    return result.sequences[:, prompt.ids.shape[1]:].tolist(), result.report


def client(swarm: LocalSwarm, strict: bool, attempts: int = 3, **options) -> DistributedModelForCausalLM:
    """A fresh client that believes announced throughputs (so adversaries draw its traffic). Joining is tried again
    when the bootstrap node does not answer in time (it happens on a loaded machine)."""
    for attempt in range(attempts):
        try:
            return DistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, [swarm.initial_peers], gossip_period=1.0,
                                                               route_on_evidence=False, **(STRICT if strict else {}),
                                                               **options)
        except SwarmConnectionError as e:
            if attempt == attempts - 1:
                raise
            log(f"a client could not join ({e}); trying again")
    raise AssertionError("unreachable")


def warm_up(model, prompts: list[Prompt], honest: list[str], most: int) -> tuple[int, int, int]:
    """Answer checking every step until this client trusts every peer of `honest` (at most `most` answers), as a
    client that has used the swarm for a while would; returns (answers, answers that differed from the local
    model's: 0 in an honest swarm, honest peers trusted)."""
    checker, node = model.trust_layer.checker, model.trust_layer.node
    rate, checker.check_rate = checker.check_rate, 1.0
    answers = mismatches = 0
    model.loop.run(model.sequence.refresh_spans(force=True))
    try:
        while answers < most:
            prompt = prompts[answers % len(prompts)]
            mismatches += answer(model, prompt)[0] != prompt.expected
            answers += 1
            model.loop.run(checker.drain())
            node.refresh(force=True)
            if all(node.score(p) >= ESTABLISHED for p in honest):
                break
    finally:
        checker.check_rate = rate
    return answers, mismatches, sum(node.score(p) >= ESTABLISHED for p in honest)


def credits(model) -> dict[str, float]:
    return {row.peer_id: row.vested + row.pending for row in model.trust_layer.node.standings()}


def stop_peers(peers: list[PeerProcess]) -> None:
    for peer in peers:
        peer.signal(signal.SIGINT)
    for peer in peers:
        try:
            peer.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        peer.kill_group()


def _work(stats) -> tuple[int, int, int, int]:
    """(served token-blocks, token-blocks checks re-ran, hop-blocks checks re-ran, check executions)."""
    return stats.served_block_tokens, stats.extra_block_tokens, stats.extra_blocks, stats.executions


class Measure:
    """One client's answers in one scenario, and the row they make."""

    def __init__(self, model, row: Row, honest: list[str], cheaters: list[str]):
        self.model, self.row, self.honest, self.cheaters = model, row, honest, cheaters
        stats = model.trust_layer.checker.stats
        self.served_before = {peer: stats.served[peer] for peer in cheaters}
        self.work_before = _work(stats)
        self.bad_receipts = stats.bad_receipts
        self.bundled_before = model.transport.bundled_steps
        self.credit_before = credits(model)
        self.coverages: list[float] = []
        self.requested = 0

    def run(self, prompts: list[Prompt], answers: int, concurrent: int = 1) -> None:
        row, began, self.requested = self.row, time.perf_counter(), answers
        self.model.loop.run(self.model.sequence.refresh_spans(force=True))  # see the adversary at once
        with ThreadPoolExecutor(concurrent) as pool:
            for first in range(0, answers, concurrent):
                group = [prompts[i % len(prompts)] for i in range(first, min(first + concurrent, answers))]
                jobs = [pool.submit(answer, self.model, prompt) for prompt in group]
                for i, (prompt, job) in enumerate(zip(group, jobs), start=first):
                    self._count(i, prompt, job)
        row.seconds = time.perf_counter() - began
        row.coverage = sum(self.coverages) / len(self.coverages) if self.coverages else float("nan")

    def _count(self, i: int, prompt: Prompt, job: Future) -> None:
        row = self.row
        try:
            tokens, report = job.result()
        except Exception as e:  # an answer that never came is counted, not hidden
            row.notes.append(f"answer {i + 1} raised {type(e).__name__}: {str(e)[:80]}")
            return
        row.answers += 1
        wrong = tokens != prompt.expected
        row.wrong += wrong
        row.flagged += report.flagged
        row.wrong_unflagged += wrong and not report.flagged
        self.coverages.append(report.coverage)

    def finish(self, strict: bool) -> tuple[int, ...]:
        """Fill in the row's trust columns; returns the checker's work counts over the measured answers (`_work`)."""
        model, row = self.model, self.row
        checker = model.trust_layer.checker
        model.loop.run(checker.drain())
        stats, node = checker.stats, model.trust_layer.node
        served = {peer: stats.served[peer] - self.served_before[peer] for peer in self.cheaters}
        caught = sum(node.is_blacklisted(peer) for peer in self.cheaters)
        total = sum(served.values())
        if caught == len(self.cheaters):
            row.cheater = f"yes (served {total})"
        else:
            row.cheater = f"{'no' if not caught else f'{caught} of {len(self.cheaters)}'} (served {total})"
        avoided = all(node.is_blacklisted(peer) or served[peer] == 0 for peer in self.cheaters)
        if len(self.cheaters) > 1:
            row.notes.append("its identities served " + ", ".join(
                f"{served[peer]} ({'blacklisted' if node.is_blacklisted(peer) else 'not blacklisted'})"
                for peer in self.cheaters))
        standings = {r.peer_id: r for r in node.standings()}
        blamed = [p for p in self.honest if p in standings and (standings[p].blacklisted or standings[p].fails > 0)]
        row.blamed = str(len(blamed))
        after = credits(model)
        gained = {peer: after.get(peer, 0.0) - self.credit_before.get(peer, 0.0) for peer in set(after) | set(self.credit_before)}
        cheat = sum(gained.get(peer, 0.0) for peer in self.cheaters)
        best = max((gained.get(peer, 0.0) for peer in self.honest), default=0.0)
        share = cheat / best if best > 0 else (0.0 if cheat <= 0 else float("inf"))
        row.credit = f"{cheat:.0f} / {best:.0f} ({100 * share:.2f}%)"
        if not avoided:
            row.failed.append("cheater neither blacklisted nor avoided")
        if blamed:
            row.failed.append(f"{len(blamed)} honest blamed")
        if share > LIMITS["credit_share"] or best <= 0:
            row.failed.append("cheater credit > 1% of honest" if best > 0 else "no honest credit")
        if strict and row.wrong > LIMITS["wrong_strict"]:
            row.failed.append("wrong answers in strict mode")
        if not strict and row.wrong > LIMITS["wrong_default"] * max(row.answers, 1):
            row.failed.append(f"more than {LIMITS['wrong_default']:.0%} wrong")
        if row.wrong_unflagged:
            row.failed.append("a wrong answer unflagged")
        if row.answers < self.requested:
            row.failed.append(f"{self.requested - row.answers} answers never came")
        work = tuple(now - before for now, before in zip(_work(stats), self.work_before))
        row.notes.append(f"checks: {work[3]} executions, re-ran {work[2] / max(work[0], 1):.3f} hop-blocks and "
                         f"{work[1] / max(work[0], 1):.2f} token-blocks per served token-block")
        if model.transport.bundled_steps > self.bundled_before:
            row.notes.append(f"{model.transport.bundled_steps - self.bundled_before} steps sent in bundles")
        if stats.bad_receipts > self.bad_receipts:
            row.notes.append(f"{stats.bad_receipts - self.bad_receipts} replies refused for their receipts")
        return work


def run_scenario(swarm: LocalSwarm, scenario: Scenario, prompts: list[Prompt], args) -> tuple[list[Row], tuple[int, ...]]:
    """Both modes' rows, and the default mode's work counts (`_work`)."""
    if scenario.mode not in ADVERSARIES:
        row = Row(scenario.name, "-", notes=[f"not available: no adversary mode {scenario.mode!r} in this tree"])
        return [row], (0, 0, 0, 0)
    began = time.perf_counter()
    honest = [p.peer_id for p in swarm.honest]
    clients: dict[str, DistributedModelForCausalLM] = {}
    extra: list[PeerProcess] = []
    cheaters: list[PeerProcess] = []
    sybils: list[DistributedModelForCausalLM] = []
    rows, work = [], (0, 0, 0, 0)
    try:
        for mode in args.modes:
            clients[mode] = client(swarm, strict=mode == "strict")
        # the scenario's own honest peers join once the clients trust the others, which then vouch for them
        for phase in ("swarm", "scenario") if scenario.honest else ("swarm",):
            if phase == "scenario":
                extra = swarm.add_peers(*((f"{scenario.name}-honest-{i}", blocks, (*GOSSIP, *more))
                                          for i, (blocks, more) in enumerate(scenario.honest)))
                honest += [p.peer_id for p in extra]
            for mode, model in clients.items():
                answers, mismatches, trusted = warm_up(model, prompts, honest, args.warm_up)
                log(f"{scenario.name}: {mode} client warmed up with {answers} fully checked answers: {trusted} of "
                    f"{len(honest)} honest peers trusted, {mismatches} answers differed from the local model")
        cheaters = swarm.add_peers(*((f"{scenario.name}-{scenario.mode}-{i}", blocks,
                                      (*GOSSIP, "--adversary", scenario.mode, *more))
                                     for i, (blocks, more) in enumerate(scenario.cheaters)))
        cheater_ids = [p.peer_id for p in cheaters]
        sybil_ids: set[str] = set()
        minted = 0
        if scenario.sybil_clients:
            sybils = [client(swarm, strict=False, check_rate=0.0, trust_layer=SybilClientTrust)
                      for _ in range(scenario.sybil_clients)]
            for sybil in sybils:
                while not sybil.trust_layer.node.puzzle_nonce:  # countersignatures without it are ignored
                    time.sleep(0.2)
                _wait_until_seen(sybil, cheater_ids)  # else its answers go round the inflater and mint nothing
                for i in range(args.sybil_answers):
                    answer(sybil, prompts[i % len(prompts)])
                sybil.loop.run(sybil.trust_layer.sync())
            sybil_ids = {s.trust_layer.node.peer_id for s in sybils}
            minted = len(set().union(*(_sybil_work(s.trust_layer.node, cheater_ids, sybil_ids) for s in sybils)))
            log(f"{scenario.name}: {len(sybils)} Sybil clients countersigned {minted} inflated receipts")
            if not minted:
                raise RuntimeError("the Sybil clients countersigned no inflated receipt: the attack was not exercised")
        log(f"{scenario.name}: set up in {time.perf_counter() - began:.0f} s")
        for mode in args.modes:
            model = clients[mode]
            row = Row(scenario.name, mode)
            measure = Measure(model, row, honest, cheater_ids)
            measure.run(prompts, args.answers, scenario.concurrent)
            if sybil_ids:
                got = _wait_for_sybil_work(model, cheater_ids, sybil_ids, expected=minted)
                row.notes.append(f"{got} of {minted} Sybil countersignatures of inflated receipts reached this client, "
                                 f"worth {_unbanned_worth(model, cheater_ids, sybil_ids):.0f} credit here even were the "
                                 f"inflater not blacklisted")
            counts = measure.finish(strict=mode == "strict")
            if mode == "default":
                work = counts
            rows.append(row)
            log("  ".join(row.cells()))
    finally:
        for model in (*clients.values(), *sybils):
            model.shutdown()
        stop_peers(cheaters + extra)
        for peer in cheaters + extra:
            if peer in swarm.processes:
                swarm.processes.remove(peer)
    return rows, work


def _wait_until_seen(model, peers: list[str], timeout: float = 60.0) -> None:
    """Refresh `model`'s view of the swarm until it lists every one of `peers`."""
    deadline = time.monotonic() + timeout
    while True:
        seen = {str(s.peer_id) for s in model.loop.run(model.sequence.refresh_spans(force=True))}
        if set(peers) <= seen:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"a Sybil client did not see the cheaters {sorted(set(peers) - seen)} in {timeout:.0f} s")
        time.sleep(0.5)


def _sybil_work(node, cheaters: list[str], sybils: set[str]) -> set[bytes]:
    """The countersignatures by `sybils` of receipts by `cheaters` that `node` holds."""
    found = (Countersigned.decode(data) for kind, data in node.messages() if kind == "work")
    return {c.signature for c in found if c.receipt.signer in cheaters and c.client in sybils}


def _unbanned_worth(model, cheaters: list[str], sybils: set[str]) -> float:
    """What the Sybil clients' countersignatures held by this client would add to its ledger if the inflater were
    not blacklisted (the ledger drops a blacklisted peer's work first): each weighs by its countersigner's trust
    here, which no check ever gave a client."""
    node = model.trust_layer.node
    node.refresh(force=True)
    works = [Countersigned.decode(data) for kind, data in node.messages() if kind == "work"]
    works = [c for c in works if c.receipt.signer in cheaters and c.client in sybils]
    ledger = node._ledger  # read only: what the client has paid so far, and the countersigners' allowances
    before = {s.peer: s.vested + s.pending for s in standings(ledger)}
    after = credit_receipts(ledger, works, node.snapshot.relative, node.clock(), node.cfg.vesting_s,
                            frozenset({node.peer_id, *node.cfg.seeds}))
    return sum(s.vested + s.pending - before.get(s.peer, 0.0) for s in standings(after) if s.peer in cheaters)


def _wait_for_sybil_work(model, cheaters: list[str], sybils: set[str], expected: int, timeout: float = 20.0) -> int:
    """Gossip until the Sybil clients' countersignatures reach this client (or `timeout`); how many did."""
    deadline = time.monotonic() + timeout
    while True:
        got = len(_sybil_work(model.trust_layer.node, cheaters, sybils))
        if got >= expected or time.monotonic() > deadline:
            return got
        model.loop.run(model.trust_layer.sync())
        time.sleep(0.5)


def print_table(rows: list[Row]) -> None:
    cells = [HEADER, *(r.cells() for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER) - 1)]
    for n, line in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1])
        if n == 0:
            print("-" * (sum(widths) + 2 * len(widths) + len(HEADER[-1])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answers", type=int, default=30, help="answers per scenario and mode")
    parser.add_argument("--scenarios", default=",".join(BY_NAME), help=f"comma-separated, of: {', '.join(BY_NAME)}")
    parser.add_argument("--modes", default="default,strict", help="default (adaptive check rates), strict, or both")
    parser.add_argument("--warm-up", type=int, default=4,
                        help="at most this many fully checked answers per fresh client (and per honest peer joining) "
                             "to come to trust the honest peers, before the adversary joins")
    parser.add_argument("--sybil-answers", type=int, default=2, help="answers each Sybil client takes through the inflater")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {', '.join(QUICK)}, 2 answers each")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the swarm's warnings (blacklists, fail-overs)")
    args = parser.parse_args()
    if args.quick:
        args.answers, args.scenarios = 2, ",".join(QUICK)
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = [name for name in args.scenarios.split(",") if name not in BY_NAME] + [m for m in args.modes if m not in ("default", "strict")]
    if unknown:
        parser.error(f"unknown scenario or mode: {', '.join(unknown)}")
    scenarios = [BY_NAME[name] for name in args.scenarios.split(",")]
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.ERROR)

    began = time.perf_counter()
    checkpoint = open_model(DEFAULT_MODEL)
    tokenizer, local = checkpoint.load_tokenizer(), checkpoint.load_causal_lm(torch.float32)
    prompts = {padded: build_prompts(tokenizer, local, padded) for padded in (False, True)}
    del local
    rows: list[Row] = []
    work = [0, 0, 0, 0]
    with LocalSwarm(model=DEFAULT_MODEL) as swarm:
        swarm.honest = swarm.add_peers(*((f"honest-{blocks}-{i}", blocks, GOSSIP) for blocks in HONEST for i in (1, 2)))
        log(f"honest swarm online after {time.perf_counter() - began:.0f} s")
        for scenario in scenarios:
            try:
                scenario_rows, counts = run_scenario(swarm, scenario, prompts[scenario.padded], args)
            except Exception as e:  # one scenario's breakdown is reported, and the others still run
                log(f"{scenario.name} broke off: {type(e).__name__}: {e}")
                scenario_rows, counts = [Row(scenario.name, "-", notes=[f"broke off: {type(e).__name__}: {e}"],
                                             failed=["the scenario did not run"])], (0, 0, 0, 0)
            rows += scenario_rows
            work = [a + b for a, b in zip(work, counts)]
    wall = time.perf_counter() - began

    print(f"trust matrix: {args.answers} answers of {TOKENS} tokens per scenario and mode, {DEFAULT_MODEL}, honest "
          f"peers 2x {' '.join(HONEST)} (float32); each fresh client first answered fully checked (at most "
          f"{args.warm_up}) until it trusted every honest peer")
    print()
    print_table(rows)
    print()
    served, tokens, blocks, executions = work
    print(f"checking overhead at the default rates (the default rows together, checks of the adversaries included): "
          f"{executions} check executions re-ran {blocks} hop-blocks and {tokens} token-blocks for {served} served "
          f"token-blocks: {blocks / max(served, 1):.3f} re-run hop-blocks (spot-check executions x blocks) and "
          f"{tokens / max(served, 1):.2f} re-run token-blocks (a check re-runs the hop's whole history) per served "
          f"token-block")
    failing = [f"{r.scenario}/{r.mode}" for r in rows if r.failed]
    print(f"rows failing a requirement: {', '.join(failing) if failing else 'none'}")
    print(f"wall time: {wall:.0f} s")


if __name__ == "__main__":
    main()
