"""Reputation simulator (issue 4, part 7): thousands of peers, cheaters and colluding liars, using the same pure
spot-check policy, EigenTrust, blacklist and ledger code that runs live.

Model (one round = every active peer serves --requests responses):
- honest peers compute correctly; cheaters corrupt each response with probability q (half q=1, half q=0.1);
  colluding liars compute correctly but, as clients, sign "pass" for cheaters and fellow liars and "fail" for
  honest peers; as referees they vote the same way.
- each response is spot-checked with check_probability(subject); the client (a random other peer) has a
  checker (choose_checker) re-run it and signs an attestation. A "fail" goes to --referees referees drawn from
  established, trusted peers whose accusations were rarely refuted (plus the seeds); referee_decision decides.
  Referees see the subject's and the checker's signed outputs, so when they clear the subject but the two
  outputs disagree, the checker's output is judged the same way; when the two outputs agree the accusation is
  refuted and counts against the accuser.
- any comparison of two honest executions fails tolerance with probability --false-positive (default 1e-3,
  TRUST.md's example), so referees and honest clients also err.
- trust (trust_vector) is recomputed every round; faults and low trust feed the blacklist (apply); the ledger
  credits served work weighted by trust, vests it after --vesting-rounds, and forfeits unvested credit on a ban.
Crypto is not simulated (signatures are checked in tests/unit/test_reputation_attest.py).

    .venv/bin/python benchmarks/reputation_sim.py              # 10,000 peers, ~10 s on one core
    .venv/bin/python benchmarks/reputation_sim.py --strategic  # cheaters check honestly, cheat only when serving
    .venv/bin/python benchmarks/reputation_sim.py --peers 1000 --rounds 20
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reputation import ledger as ledger_mod  # noqa: E402
from reputation.spotcheck import (  # noqa: E402
    check_probability,
    choose_checker,
    referee_decision,
    responses_to_detect,
    should_referee,
)
from reputation.trust import (  # noqa: E402
    BlacklistPolicy,
    BlacklistState,
    FaultConfirmed,
    TrustObserved,
    apply,
    is_blacklisted,
    trust_vector,
)

logger = logging.getLogger(__name__)

HONEST, CHEATER, LIAR = 0, 1, 2


@dataclass(frozen=True)
class SimConfig:
    peers: int  # total peers
    cheaters: float  # fraction of cheaters
    liars: float  # fraction of colluding liars
    seeds: int  # pre-trusted honest peers
    rounds: int  # trust recomputations
    requests: int  # responses each active peer serves per round
    base: float  # check rate of established trusted peers
    newcomer: float  # check rate of newcomers and zero-trust peers
    newcomer_checks: int  # checks after which a peer is established
    trusted_level: float  # relative trust at which a peer is checked at the base rate
    referees: int  # referees per disputed check
    quorum: int | None  # "fail" votes that confirm a fault; None = strict majority
    vesting_rounds: int  # credit vests this many rounds after it is earned
    cheat_when_checking: bool  # False: cheaters do honest work as checkers/referees and cheat only as servers
    false_positive: float  # chance that a comparison of two honest executions falls outside tolerance
    seed: int  # random seed


class Sim:
    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.np_rng = np.random.default_rng(cfg.seed)
        n = cfg.peers
        kinds = np.full(n, HONEST)
        n_cheat, n_liar = int(round(n * cfg.cheaters)), int(round(n * cfg.liars))
        order = self.np_rng.permutation(n)
        kinds[order[:n_cheat]] = CHEATER
        kinds[order[n_cheat : n_cheat + n_liar]] = LIAR
        self.kind = kinds
        self.q = np.zeros(n)
        cheaters = order[:n_cheat]
        self.q[cheaters[: n_cheat // 2]] = 1.0
        self.q[cheaters[n_cheat // 2 :]] = 0.1
        self.seeds = np.sort(order[n_cheat + n_liar : n_cheat + n_liar + cfg.seeds])
        self.is_seed = np.zeros(n, bool)
        self.is_seed[self.seeds] = True
        self.ids = [f"peer{i:06d}" for i in range(n)]
        self.checks = np.zeros(n, np.int64)  # completed checks per subject
        self.served = np.zeros(n, np.int64)  # responses served
        self.accusations = np.zeros(n, np.int64)
        self.refuted = np.zeros(n, np.int64)
        self.ban_at_response = np.full(n, -1, np.int64)  # responses served when first banned
        self.ban_reason = [""] * n
        self.op_truster: list[np.ndarray] = []
        self.op_subject: list[np.ndarray] = []
        self.op_pass: list[np.ndarray] = []
        self.op_fail: list[np.ndarray] = []
        self.trust = np.zeros(n)
        self.trust[self.seeds] = 1.0 / len(self.seeds)
        self.blacklist = BlacklistState()
        self.policy = BlacklistPolicy(base_ban_s=1e9)  # longer than the simulation: one ban per peer
        self.ledger = ledger_mod.Ledger()
        self.executions = 0  # checker + referee re-executions (the overhead)
        self.round_executions: list[int] = []
        self.round_served: list[int] = []
        self.false_faults = 0

    # ---- one spot check --------------------------------------------------------------------------------

    def _vote(self, referee: int, target: int, target_cheated: bool) -> str:
        if self.kind[referee] == LIAR:  # colluders vote for their side regardless of evidence
            return "fail" if self.kind[target] == HONEST else "pass"
        referee_cheated = self.cfg.cheat_when_checking and self.rng.random() < self.q[referee]
        noise = self.rng.random() < self.cfg.false_positive
        return "fail" if target_cheated or referee_cheated or noise else "pass"

    def _ban(self, peer: int, now: float, event: FaultConfirmed | TrustObserved, at_response: int, why: str) -> None:
        before = self.blacklist
        self.blacklist = apply(self.blacklist, event, self.policy)
        if self.blacklist is not before and is_blacklisted(self.blacklist, self.ids[peer], now):
            self.banned[peer] = True
            if self.ban_at_response[peer] < 0:
                self.ban_at_response[peer] = at_response
                self.ban_reason[peer] = why
            if self.kind[peer] != CHEATER:
                self.false_faults += 1
            self.ledger = ledger_mod.forfeit(self.ledger, self.ids[peer])

    def _check(self, subject: int, position: int, now: float, active: list[int], referee_pool: list[int]) -> None:
        rng = self.rng
        client = choose_checker(active, subject, rng)
        checker = choose_checker(active, subject, rng, exclude=(client,))
        if client is None or checker is None:
            return
        self.executions += 1
        self.checks[subject] += 1
        s_cheat = rng.random() < self.q[subject]
        k_cheat = self.cfg.cheat_when_checking and rng.random() < self.q[checker]
        mismatch = s_cheat or k_cheat or rng.random() < self.cfg.false_positive
        if self.kind[client] == LIAR:
            verdict = "fail" if self.kind[subject] == HONEST else "pass"
        else:
            verdict = "fail" if mismatch else "pass"
        self._opinions.append((client, subject, verdict == "pass", verdict == "fail"))
        if verdict == "pass" or not should_referee(int(self.accusations[client]), int(self.refuted[client])):
            return
        self.accusations[client] += 1
        referees: list[int] = []
        for _ in range(self.cfg.referees):
            r = choose_checker(referee_pool, subject, rng, exclude=(client, checker, *referees))
            if r is not None:
                referees.append(r)
        self.executions += len(referees)
        at_response = int(self.served[subject]) + position + 1
        if referee_decision([self._vote(r, subject, s_cheat) for r in referees], self.cfg.quorum):
            self._ban(subject, now, FaultConfirmed(self.ids[subject], now), at_response, "as subject")
        elif mismatch:  # the referees cleared the subject, so the checker's differing output is the suspect
            if referee_decision([self._vote(r, checker, k_cheat) for r in referees], self.cfg.quorum):
                at_checker = int(self.served[checker]) + position + 1
                self._ban(checker, now, FaultConfirmed(self.ids[checker], now), at_checker, "as checker")
        else:
            self.refuted[client] += 1

    # ---- one round -------------------------------------------------------------------------------------

    def _referee_pool(self, active_mask: np.ndarray, relative: np.ndarray) -> list[int]:
        refuted_fraction = np.divide(self.refuted, self.accusations, out=np.zeros(len(self.q)), where=self.accusations > 0)
        ok = active_mask & (self.checks >= self.cfg.newcomer_checks) & (relative >= 0.5) & (refuted_fraction <= 0.1)
        return sorted(set(np.flatnonzero(ok | (self.is_seed & active_mask)).tolist()))

    def round(self, r: int) -> None:
        executions, served = self.executions, int(self.served.sum())
        self._round(r)
        self.round_executions.append(self.executions - executions)
        self.round_served.append(int(self.served.sum()) - served)

    def _round(self, r: int) -> None:
        cfg, n = self.cfg, self.cfg.peers
        now = float(r)
        self.banned = np.array([is_blacklisted(self.blacklist, self.ids[i], now) for i in range(n)])
        active_mask = ~self.banned
        active = np.flatnonzero(active_mask).tolist()
        relative = self.trust * len(active)
        rates = np.array([check_probability(relative[i], int(self.checks[i]), cfg.base, cfg.newcomer, cfg.newcomer_checks, cfg.trusted_level) for i in active])
        n_checks = self.np_rng.binomial(cfg.requests, rates)
        subjects = np.repeat(np.array(active), n_checks)
        positions = self.np_rng.integers(0, cfg.requests, size=len(subjects))
        pool = self._referee_pool(active_mask, relative)
        self._opinions: list[tuple[int, int, bool, bool]] = []
        for k in np.argsort(positions, kind="stable"):
            subject = int(subjects[k])
            if not self.banned[subject]:
                self._check(subject, int(positions[k]), now, active, pool)
        served_now = np.where(self.banned, 0, cfg.requests)
        served_now[active_mask & self.banned] = 0  # banned mid-round: counted up to the ban below
        newly = active_mask & self.banned
        self.served[newly] = self.ban_at_response[newly]
        self.served += np.where(active_mask & ~self.banned, cfg.requests, 0)
        self._record_opinions()
        self._recompute_trust(now)
        self._pay(now, active_mask & ~self.banned, cfg.requests)

    def _record_opinions(self) -> None:
        if not self._opinions:
            return
        ops = np.array(self._opinions, dtype=np.int64)
        self.op_truster.append(ops[:, 0])
        self.op_subject.append(ops[:, 1])
        self.op_pass.append(ops[:, 2].astype(float))
        self.op_fail.append(ops[:, 3].astype(float))

    def _recompute_trust(self, now: float) -> None:
        n = self.cfg.peers
        refuted_fraction = np.divide(self.refuted, self.accusations, out=np.zeros(n), where=self.accusations > 0)
        self.trust = trust_vector(
            n, np.concatenate(self.op_truster), np.concatenate(self.op_subject), np.concatenate(self.op_pass),
            np.concatenate(self.op_fail), refuted_fraction, self.seeds,
        )
        relative = self.trust * int((~self.banned).sum())
        for i in np.flatnonzero(~self.banned & (relative < self.policy.trust_threshold) & (self.checks >= self.policy.min_checks)):
            event = TrustObserved(self.ids[i], float(relative[i]), int(self.checks[i]), now)
            self._ban(int(i), now, event, int(self.served[i]), "low trust")

    def _pay(self, now: float, earning: np.ndarray, requests: int) -> None:
        relative = self.trust * int((~self.banned).sum())
        amounts = {self.ids[i]: requests * ledger_mod.trust_weight(float(relative[i])) for i in np.flatnonzero(earning)}
        self.ledger = ledger_mod.credit(self.ledger, amounts, now, float(self.cfg.vesting_rounds))
        self.ledger = ledger_mod.vest(self.ledger, now)


def _pct(x: np.ndarray, q: float) -> str:
    return f"{np.percentile(x, q):.0f}" if len(x) else "-"


def report(sim: Sim, seconds: float) -> None:
    cfg = sim.cfg
    banned_ever = sim.ban_at_response >= 0
    cheat = sim.kind == CHEATER
    rows: list[tuple[str, str]] = []
    for label, mask in (("all cheaters", cheat), ("cheaters q=1", cheat & (sim.q == 1.0)), ("cheaters q=0.1", cheat & (sim.q == 0.1))):
        caught = sim.ban_at_response[mask & banned_ever]
        rows.append((f"{label}: blacklisted", f"{100 * (mask & banned_ever).sum() / max(mask.sum(), 1):.2f}% ({(mask & banned_ever).sum()}/{mask.sum()})"))
        rows.append((f"{label}: requests-to-blacklist median / p95", f"{_pct(caught, 50)} / {_pct(caught, 95)}"))
    reasons = {w: sum(1 for i in np.flatnonzero(cheat) if sim.ban_reason[i] == w) for w in ("as subject", "as checker", "low trust")}
    rows.append(("cheaters caught as subject / as checker / low trust", " / ".join(str(v) for v in reasons.values())))
    rows.append(("predicted 99% detection at p=base, q=1 / q=0.1", f"{responses_to_detect(cfg.base, 1.0)} / {responses_to_detect(cfg.base, 0.1)}"))
    rows.append(("honest peers blacklisted", f"{(banned_ever & (sim.kind == HONEST)).sum()} of {(sim.kind == HONEST).sum()}"))
    rows.append(("colluding liars blacklisted", f"{(banned_ever & (sim.kind == LIAR)).sum()} of {(sim.kind == LIAR).sum()}"))
    final = ledger_mod.vest(sim.ledger, float("inf"))  # everything not forfeited will vest eventually
    paid = {s.peer: s.vested for s in ledger_mod.standings(final)}
    total = sum(paid.values()) or 1.0
    cheater_ids = {sim.ids[i] for i in np.flatnonzero(cheat)}
    caught_ids = {sim.ids[i] for i in np.flatnonzero(cheat & banned_ever)}
    rows.append(("cheaters' share of rewards paid (all cheaters)", f"{100 * sum(v for p, v in paid.items() if p in cheater_ids) / total:.3f}%"))
    rows.append(("  of which detected cheaters (kept pre-ban vested credit)", f"{100 * sum(v for p, v in paid.items() if p in caught_ids) / total:.3f}%"))
    rows.append(("credit forfeited by blacklisted peers", f"{100 * final.forfeited / (total + final.forfeited):.2f}% of all credit"))
    rows.append(("checking overhead (re-executions / responses)", f"{100 * sim.executions / max(sim.served.sum(), 1):.2f}%"))
    last = max(len(sim.round_served) // 4, 1)
    steady = sum(sim.round_executions[-last:]) / max(sum(sim.round_served[-last:]), 1)
    rows.append((f"checking overhead, last {last} rounds (steady state)", f"{100 * steady:.2f}%"))
    rows.append(("responses served", f"{sim.served.sum():,}"))
    rows.append(("runtime", f"{seconds:.1f} s"))
    width = max(len(a) for a, _ in rows)
    print(f"peers={cfg.peers} cheaters={cfg.cheaters:.0%} liars={cfg.liars:.0%} seeds={cfg.seeds} rounds={cfg.rounds} "
          f"requests/round={cfg.requests} base={cfg.base} newcomer={cfg.newcomer} trusted-level={cfg.trusted_level} referees={cfg.referees} "
          f"quorum={cfg.quorum or 'majority'} vesting-rounds={cfg.vesting_rounds} "
          f"cheaters-cheat-when-checking={cfg.cheat_when_checking} false-positive={cfg.false_positive} seed={cfg.seed}")
    for a, b in rows:
        print(f"{a:<{width}}  {b}")


def parse_args(argv: list[str] | None = None) -> SimConfig:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=10_000)
    ap.add_argument("--cheaters", type=float, default=0.2)
    ap.add_argument("--liars", type=float, default=0.3)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--requests", type=int, default=40, help="responses per active peer per round")
    ap.add_argument("--base", type=float, default=0.05)
    ap.add_argument("--newcomer", type=float, default=0.3)
    ap.add_argument("--newcomer-checks", type=int, default=10)
    ap.add_argument("--trusted-level", type=float, default=0.3)
    ap.add_argument("--referees", type=int, default=3)
    ap.add_argument("--quorum", type=int, default=None, help="fail votes needed (default: strict majority)")
    ap.add_argument("--vesting-rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--false-positive", type=float, default=1e-3, help="honest-vs-honest comparison failure rate")
    ap.add_argument("--strategic", action="store_true", help="cheaters cheat only when serving, never when checking")
    a = ap.parse_args(argv)
    return SimConfig(a.peers, a.cheaters, a.liars, a.seeds, a.rounds, a.requests, a.base, a.newcomer,
                     a.newcomer_checks, a.trusted_level, a.referees, a.quorum, a.vesting_rounds, not a.strategic, a.false_positive, a.seed)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    cfg = parse_args(argv)
    sim = Sim(cfg)
    start = time.perf_counter()
    for r in range(cfg.rounds):
        sim.round(r)
        logger.info("round %d done", r)
    report(sim, time.perf_counter() - start)


if __name__ == "__main__":
    main()
