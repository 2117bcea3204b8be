"""Reputation simulator (issue 4, part 7; issue 12): thousands of peers, cheaters, colluding liars and Sybils,
using the same pure spot-check policy, EigenTrust, blacklist and ledger code that runs live.

Model (one round = every active peer serves --requests responses). The view simulated is that of the honest
nodes, anchored in the seeds:
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
- trust (trust_vector) is recomputed every round; faults and low trust feed the blacklist (apply).
New attacks (issue 12), all run by every cheater at once, on top of corrupting outputs:
- receipt inflation: its receipts claim --inflation times the tokens it served. Its --sybils Sybil client
  identities (each paying the identity puzzle) countersign --fake-sessions fake sessions a round each, claiming
  as much; colluding liars, as clients, countersign the same inflated claims for it. Credit follows the live
  rule (reputation.ledger.credit_receipts): min(claimed, counted by the client) x the countersigner's weight
  (1 for a seed, else its relative trust capped at 1) x the server's; a client other than a seed vouches in
  all for no more than the busiest seed used (its allowance). An honest client that countersigns an inflated
  receipt records an inflation fault in its own view (a ban here when the client is a seed).
- Sybil accusers and referees: each Sybil signs "fail" against --sybil-accusations random honest peers a round
  and offers itself as a referee. Any "fail" by another node is an accusation: the view checks the accused on
  every reply until --refute-passes honest passes refute it (the accuser loses weight, and one mostly refuted
  is no longer heard) or a check confirms it. Sybils are never checked, so they have no trust: never referees.
- a seed-signed false accusation: at round --false-seed-round one seed accuses --false-seed-accusations honest
  peers. No signer's word alone convicts, not even a seed's (the old rule blacklisted them at once).
The ledger vests credit after --vesting-rounds and forfeits unvested credit on a ban. The old credit rule
(receipts paid as claimed, whoever countersigned them) is computed alongside for comparison.
Crypto is not simulated (signatures are checked in tests/unit/test_reputation_attest.py).

    .venv/bin/python benchmarks/reputation_sim.py              # 10,000 peers, about a minute on one core
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
PUZZLE_CPU_S = 1.28  # expected CPU seconds per identity at the default puzzle (benchmarks/results/identity_puzzle.txt)


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
    sybils: int = 5  # Sybil client identities per cheater
    inflation: float = 1000.0  # cheaters' receipts claim this many times the tokens served
    fake_sessions: int = 10  # fake sessions each Sybil (and each colluding liar) countersigns per round
    sybil_accusations: int = 1  # honest peers each Sybil accuses per round
    refute_passes: int = 3  # honest passes that refute an open accusation (ReputationConfig.refute_passes)
    false_seed_round: int = 5  # round at which one seed signs false accusations
    false_seed_accusations: int = 100  # honest peers it accuses


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
        # Sybil identities: n .. n + S - 1 in the trust graph; never serve, never checked
        self.sybil_owner = np.repeat(np.sort(cheaters), cfg.sybils)
        self.n_sybils = len(self.sybil_owner)
        self.total = n + self.n_sybils  # nodes in the trust graph
        self.checks = np.zeros(n, np.int64)  # completed checks per subject
        self.served = np.zeros(n, np.int64)  # responses served
        self.accusations = np.zeros(self.total, np.int64)
        self.refuted = np.zeros(self.total, np.int64)
        self.ban_at_response = np.full(n, -1, np.int64)  # responses served when first banned
        self.ban_reason = [""] * n
        self.op_truster: list[np.ndarray] = []
        self.op_subject: list[np.ndarray] = []
        self.op_pass: list[np.ndarray] = []
        self.op_fail: list[np.ndarray] = []
        self.trust = np.zeros(self.total)
        self.trust[self.seeds] = 1.0 / len(self.seeds)
        self.blacklist = BlacklistState()
        self.policy = BlacklistPolicy(base_ban_s=1e9)  # longer than the simulation: one ban per peer
        self.banned = np.zeros(n, bool)
        self.ledger = ledger_mod.Ledger()
        self.old_ledger = ledger_mod.Ledger()  # the old rule: receipts paid as claimed, any countersigner
        self.used = np.zeros(self.total)  # units each client vouched for (the allowance's counter)
        self.executions = 0  # checker + referee re-executions (the overhead)
        self.round_executions: list[int] = []
        self.round_served: list[int] = []
        self.false_faults = 0
        # accusations: subject -> accusers awaiting the view's own checks, and honest passes since
        self.pending: dict[int, list[int]] = {}
        self.pending_passes: dict[int, int] = {}
        self.accused_ever = np.zeros(n, bool)
        self.sybil_heard = 0
        self.sybil_made = 0
        self.seed_accused: list[int] = []
        self.accusation_checks = 0  # checks run because an accusation was open
        self.sybils_in_pool = 0  # Sybil identities that ever qualified as referees
        self.inflated = 0  # inflated receipts countersigned by honest clients
        self.inflation_faults = 0  # ... each one an inflation fault in that client's own view
        self.inflation_seen_by = np.zeros(n, np.int64)  # honest clients' views that recorded its inflation
        self.minted_claims = 0.0  # units Sybils and colluders claimed beyond the work served
        self.credit_total = 0.0  # credit granted, before forfeits
        self.credit_beyond = 0.0  # ... of it for units beyond the work served (colluders within their allowances)

    # ---- accusations ----------------------------------------------------------------------------------

    def _accuse(self, accuser: int, subject: int) -> bool:
        """A "fail" signed by `accuser` reaches the view: an open accusation if the accuser is heard."""
        heard = should_referee(int(self.accusations[accuser]), int(self.refuted[accuser]))
        heard = heard and not (accuser < self.cfg.peers and self.banned[accuser]) and not self.banned[subject]
        self._opinions.append((accuser, subject, False, True))
        if heard:  # as live: only accusations put to the test count
            self.accusations[accuser] += 1
            self.pending.setdefault(subject, []).append(accuser)
            self.accused_ever[subject] = True
        return heard

    def _own_pass(self, subject: int) -> None:
        """An honest client's check of `subject` passed: open accusations against it move towards refutation."""
        if subject not in self.pending:
            return
        self.pending_passes[subject] = self.pending_passes.get(subject, 0) + 1
        if self.pending_passes[subject] >= self.cfg.refute_passes:
            for accuser in self.pending.pop(subject):
                self.refuted[accuser] += 1
            self.pending_passes.pop(subject, None)

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
            self.old_ledger = ledger_mod.forfeit(self.old_ledger, self.ids[peer])
            self.pending.pop(peer, None)  # its accusers were right
            self.pending_passes.pop(peer, None)

    def _check(self, subject: int, position: int, now: float, active: list[int], referee_pool: list[int]) -> None:
        rng = self.rng
        client = choose_checker(active, subject, rng)
        checker = choose_checker(active, subject, rng, exclude=(client,))
        if client is None or checker is None:
            return
        self.executions += 1
        self.checks[subject] += 1
        if subject in self.pending:
            self.accusation_checks += 1
        s_cheat = rng.random() < self.q[subject]
        k_cheat = self.cfg.cheat_when_checking and rng.random() < self.q[checker]
        mismatch = s_cheat or k_cheat or rng.random() < self.cfg.false_positive
        if self.kind[client] == LIAR:
            verdict = "fail" if self.kind[subject] == HONEST else "pass"
        else:
            verdict = "fail" if mismatch else "pass"
        self._opinions.append((client, subject, verdict == "pass", verdict == "fail"))
        if verdict == "pass":
            if self.kind[client] == HONEST:
                self._own_pass(subject)
            return
        if not should_referee(int(self.accusations[client]), int(self.refuted[client])):
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
            self._own_pass(subject)  # the referees re-ran it and it passed

    # ---- one round -------------------------------------------------------------------------------------

    def _referee_pool(self, active_mask: np.ndarray, relative: np.ndarray) -> list[int]:
        """Established, trusted peers whose accusations were rarely refuted, plus the seeds; Sybil identities
        are candidates too (they offer themselves), but nobody checked them, so none qualifies."""
        n = self.cfg.peers
        refuted_fraction = np.divide(self.refuted, self.accusations, out=np.zeros(self.total), where=self.accusations > 0)
        checks = np.concatenate([self.checks, np.zeros(self.n_sybils, np.int64)])
        active = np.concatenate([active_mask, np.ones(self.n_sybils, bool)])
        seeds = np.concatenate([self.is_seed, np.zeros(self.n_sybils, bool)])
        ok = active & (checks >= self.cfg.newcomer_checks) & (relative >= 0.5) & (refuted_fraction <= 0.1)
        self.sybils_in_pool = max(self.sybils_in_pool, int(ok[n:].sum()))
        return sorted(set(np.flatnonzero((ok | (seeds & active))[:n]).tolist()))

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
        self._opinions: list[tuple[int, int, bool, bool]] = []
        self._sybil_round(r, active_mask)
        rates = np.array([check_probability(relative[i], int(self.checks[i]), cfg.base, cfg.newcomer,
                                            cfg.newcomer_checks, cfg.trusted_level) for i in active])
        n_checks = self.np_rng.binomial(cfg.requests, rates)
        subjects = np.repeat(np.array(active), n_checks)
        positions = self.np_rng.integers(0, cfg.requests, size=len(subjects))
        # while an accusation is open, every response of the accused is checked (until it is refuted)
        accused = np.array(sorted(i for i in self.pending if active_mask[i]), dtype=np.int64)
        subjects = np.concatenate([subjects, np.repeat(accused, cfg.requests)])
        positions = np.concatenate([positions, np.tile(np.arange(cfg.requests), len(accused))])
        extra = np.concatenate([np.zeros(int(n_checks.sum()), bool), np.ones(len(accused) * cfg.requests, bool)])
        pool = self._referee_pool(active_mask, relative)
        for k in np.argsort(positions, kind="stable"):
            subject = int(subjects[k])
            if not self.banned[subject] and (not extra[k] or subject in self.pending):
                self._check(subject, int(positions[k]), now, active, pool)
        newly = active_mask & self.banned
        self.served[newly] = self.ban_at_response[newly]
        self.served += np.where(active_mask & ~self.banned, cfg.requests, 0)
        self._record_opinions()
        self._recompute_trust(now)
        self._pay(now, active_mask, cfg.requests)

    def _sybil_round(self, r: int, active_mask: np.ndarray) -> None:
        """Sybils vouch for their cheater and accuse honest peers; one seed accuses honest peers falsely once."""
        cfg, n = self.cfg, self.cfg.peers
        honest = np.flatnonzero(active_mask & (self.kind == HONEST) & ~self.is_seed)
        if len(honest) == 0:
            return
        targets = self.np_rng.choice(honest, (self.n_sybils, cfg.sybil_accusations))
        for j in range(self.n_sybils):  # Sybils go on after their cheater is caught: identities are cheap to keep
            self._opinions.append((n + j, int(self.sybil_owner[j]), True, False))  # "pass" for its cheater
            for target in targets[j]:
                self.sybil_made += 1
                self.sybil_heard += self._accuse(n + j, int(target))
        if r == cfg.false_seed_round and len(self.seeds):
            liar_seed = int(self.seeds[0])
            for target in self.np_rng.choice(honest, min(cfg.false_seed_accusations, len(honest)), replace=False):
                if self._accuse(liar_seed, int(target)):
                    self.seed_accused.append(int(target))

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
        refuted_fraction = np.divide(self.refuted, self.accusations, out=np.zeros(self.total), where=self.accusations > 0)
        self.trust = trust_vector(
            self.total, np.concatenate(self.op_truster), np.concatenate(self.op_subject), np.concatenate(self.op_pass),
            np.concatenate(self.op_fail), refuted_fraction, self.seeds,
        )
        relative = self.trust[:n] * int((~self.banned).sum())
        for i in np.flatnonzero(~self.banned & (relative < self.policy.trust_threshold) & (self.checks >= self.policy.min_checks)):
            event = TrustObserved(self.ids[i], float(relative[i]), int(self.checks[i]), now)
            self._ban(int(i), now, event, int(self.served[i]), "low trust")

    # ---- credit ------------------------------------------------------------------------------------------

    def _pay(self, now: float, was_active: np.ndarray, requests: int) -> None:
        """The round's countersignatures, credited by the live rule (and by the old one, for comparison)."""
        cfg, n = self.cfg, self.cfg.peers
        earning = np.flatnonzero(was_active & ~self.banned)
        if len(earning) == 0:
            return
        relative = self.trust * int((~self.banned).sum())
        server_w = np.clip(relative[:n], 0.0, 1.0)
        client_w = np.clip(relative, 0.0, 1.0)
        client_w[self.seeds] = 1.0
        cheater = self.kind == CHEATER
        claim = np.where(cheater, cfg.inflation, 1.0)  # units a receipt claims per response served
        # every response served: a real session of a random active client (seeds included)
        servers = np.repeat(earning, requests)
        clients = self.np_rng.choice(np.flatnonzero(was_active), len(servers))
        clients = np.where(clients == servers, self.seeds[0], clients)
        honest_client = (self.kind[clients] == HONEST)
        colluding = ~honest_client & cheater[servers]  # a liar or cheater client vouches for the inflated claim
        counted = np.where(colluding, claim[servers], 1.0)
        inflated = honest_client & cheater[servers]
        self.inflated += int(inflated.sum())
        self.inflation_faults += int(inflated.sum())
        np.add.at(self.inflation_seen_by, servers[inflated], 1)
        for i in np.unique(servers[inflated & self.is_seed[clients]]):  # a seed's own countersignature: a ban here
            self._ban(int(i), now, FaultConfirmed(self.ids[i], now), int(self.served[i]), "inflation")
        units = np.where(inflated, 0.0, np.minimum(claim[servers], counted))  # no credit for an inflated receipt
        # fake sessions: each Sybil and each colluding liar countersigns inflated claims for a cheater
        live_cheaters = np.flatnonzero(cheater & was_active & ~self.banned)
        fake_servers = np.empty(0, np.int64)
        fake_clients = np.empty(0, np.int64)
        if len(live_cheaters):
            sybils = np.flatnonzero(~self.banned[self.sybil_owner]) + n
            liars = np.flatnonzero((self.kind == LIAR) & ~self.banned)
            fake_clients = np.repeat(np.concatenate([sybils, liars]), cfg.fake_sessions)
            fake_servers = np.concatenate([
                np.repeat(self.sybil_owner[sybils - n], cfg.fake_sessions),
                self.np_rng.choice(live_cheaters, len(liars) * cfg.fake_sessions),
            ])
        all_servers = np.concatenate([servers, fake_servers])
        all_clients = np.concatenate([clients, fake_clients])
        all_units = np.concatenate([units, np.full(len(fake_servers), cfg.inflation)])
        beyond = np.concatenate([np.clip(units - 1.0, 0.0, None), np.full(len(fake_servers), cfg.inflation)])
        self.minted_claims += float(claim[servers].sum() - len(servers) + len(fake_servers) * cfg.inflation)
        # the allowance: a client other than a seed vouches in all for no more than the busiest seed used
        anchor = np.concatenate([self.is_seed, np.zeros(self.n_sybils, bool)])[all_clients]
        wants = np.bincount(all_clients, weights=all_units, minlength=self.total)
        self.used[self.seeds] += wants[self.seeds]
        allowance = np.clip(self.used[self.seeds].max() - self.used, 0.0, None)
        scale = np.where(anchor, 1.0, np.divide(np.minimum(wants, allowance), wants, out=np.zeros(self.total),
                                                 where=wants > 0)[all_clients])
        non_anchor = np.ones(self.total, bool)
        non_anchor[self.seeds] = False
        self.used[non_anchor] += np.minimum(wants, allowance)[non_anchor]
        credit = all_units * scale * client_w[all_clients] * server_w[all_servers]
        self.credit_total += float(credit.sum())
        self.credit_beyond += float((credit * np.divide(beyond, all_units, out=np.zeros(len(credit)), where=all_units > 0)).sum())
        amounts = np.bincount(all_servers, weights=credit, minlength=n)
        self.ledger = ledger_mod.credit(self.ledger, {self.ids[i]: float(amounts[i]) for i in earning}, now,
                                        float(cfg.vesting_rounds))
        self.ledger = ledger_mod.vest(self.ledger, now)
        # the old rule: every receipt paid as claimed, whoever countersigned it, weighted by the server's trust
        old_units = np.concatenate([claim[servers], np.full(len(fake_servers), cfg.inflation)])
        old = np.bincount(all_servers, weights=old_units * server_w[all_servers], minlength=n)
        self.old_ledger = ledger_mod.credit(self.old_ledger, {self.ids[i]: float(old[i]) for i in earning}, now,
                                            float(cfg.vesting_rounds))
        self.old_ledger = ledger_mod.vest(self.old_ledger, now)


def _pct(x: np.ndarray, q: float) -> str:
    return f"{np.percentile(x, q):.0f}" if len(x) else "-"


def _shares(sim: Sim, ledger: ledger_mod.Ledger) -> tuple[float, float, float]:
    """(cheaters' share of credit paid %, of which detected cheaters %, best cheater / best honest peer)."""
    final = ledger_mod.vest(ledger, float("inf"))  # everything not forfeited will vest eventually
    paid = {s.peer: s.vested for s in ledger_mod.standings(final)}
    total = sum(paid.values()) or 1.0
    cheat = sim.kind == CHEATER
    cheater_ids = {sim.ids[i] for i in np.flatnonzero(cheat)}
    caught_ids = {sim.ids[i] for i in np.flatnonzero(cheat & (sim.ban_at_response >= 0))}
    best_cheater = max((v for p, v in paid.items() if p in cheater_ids), default=0.0)
    best_honest = max((v for p, v in paid.items() if p not in cheater_ids), default=0.0) or 1.0
    return (100 * sum(v for p, v in paid.items() if p in cheater_ids) / total,
            100 * sum(v for p, v in paid.items() if p in caught_ids) / total, best_cheater / best_honest)


def report(sim: Sim, seconds: float) -> None:
    cfg = sim.cfg
    banned_ever = sim.ban_at_response >= 0
    cheat = sim.kind == CHEATER
    honest = sim.kind == HONEST
    rows: list[tuple[str, str]] = []
    for label, mask in (("all cheaters", cheat), ("cheaters q=1", cheat & (sim.q == 1.0)), ("cheaters q=0.1", cheat & (sim.q == 0.1))):
        caught = sim.ban_at_response[mask & banned_ever]
        rows.append((f"{label}: blacklisted", f"{100 * (mask & banned_ever).sum() / max(mask.sum(), 1):.2f}% ({(mask & banned_ever).sum()}/{mask.sum()})"))
        rows.append((f"{label}: requests-to-blacklist median / p95", f"{_pct(caught, 50)} / {_pct(caught, 95)}"))
    reasons = {w: sum(1 for i in np.flatnonzero(cheat) if sim.ban_reason[i] == w) for w in ("as subject", "as checker", "low trust", "inflation")}
    rows.append(("cheaters caught as subject / as checker / low trust / inflation", " / ".join(str(v) for v in reasons.values())))
    rows.append(("predicted 99% detection at p=base, q=1 / q=0.1", f"{responses_to_detect(cfg.base, 1.0)} / {responses_to_detect(cfg.base, 0.1)}"))
    rows.append(("honest peers blacklisted", f"{(banned_ever & honest).sum()} of {honest.sum()}"))
    rows.append(("colluding liars blacklisted", f"{(banned_ever & (sim.kind == LIAR)).sum()} of {(sim.kind == LIAR).sum()}"))
    share, caught_share, ratio = _shares(sim, sim.ledger)
    old_share, _, old_ratio = _shares(sim, sim.old_ledger)
    rows.append(("cheaters' share of rewards paid (all cheaters)", f"{share:.3f}%"))
    rows.append(("  of which detected cheaters (kept pre-ban vested credit)", f"{caught_share:.3f}%"))
    rows.append(("  best cheater's credit / best honest peer's", f"{ratio:.4f}x"))
    rows.append(("  under the old rule (receipts paid as claimed, any countersigner)", f"{old_share:.2f}% ({old_ratio:,.0f}x)"))
    final = ledger_mod.vest(sim.ledger, float("inf"))
    total = sum(s.vested for s in ledger_mod.standings(final)) or 1.0
    rows.append(("credit forfeited by blacklisted peers", f"{100 * final.forfeited / (total + final.forfeited):.2f}% of all credit"))
    rows.append(("inflated receipts countersigned by honest clients",
                 f"{sim.inflated:,}, all caught by the client's own count (an inflation fault there), paid 0"))
    rows.append(("units claimed beyond the work served (receipts, Sybils, colluders)", f"{sim.minted_claims:,.0f}"))
    rows.append(("  credited for them before forfeits (colluders' allowances)",
                 f"{100 * sim.credit_beyond / max(sim.credit_total, 1e-9):.3f}% of credit granted"))
    rows.append(("Sybil identities (puzzle cost, CPU)", f"{sim.n_sybils:,} ({sim.n_sybils * PUZZLE_CPU_S / 3600:.1f} core-hours at {PUZZLE_CPU_S} s each)"))
    rows.append(("Sybils that qualified as referees", f"{sim.sybils_in_pool}"))
    rows.append(("Sybil accusations made / heard", f"{sim.sybil_made:,} / {sim.sybil_heard:,} (a mostly refuted accuser is not heard)"))
    rows.append(("honest peers ever accused / blamed", f"{(sim.accused_ever & honest).sum()} / {(banned_ever & honest).sum()}"))
    seed_banned = sum(1 for i in sim.seed_accused if banned_ever[i])
    seed = int(sim.seeds[0]) if len(sim.seeds) else -1
    refuted = f"{sim.refuted[seed]}/{sim.accusations[seed]}" if seed >= 0 else "-"
    rows.append(("a seed's false accusations: honest accused / blacklisted",
                 f"{len(sim.seed_accused)} / {seed_banned} (old rule: {len(sim.seed_accused)}); its accusations refuted {refuted}"))
    rows.append(("checks run because an accusation was open", f"{sim.accusation_checks:,}"))
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
    print(f"new attacks: sybils/cheater={cfg.sybils} inflation={cfg.inflation:g}x fake-sessions/round={cfg.fake_sessions} "
          f"sybil-accusations/round={cfg.sybil_accusations} refute-passes={cfg.refute_passes} "
          f"false-seed-accusations={cfg.false_seed_accusations}@round{cfg.false_seed_round}")
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
    ap.add_argument("--sybils", type=int, default=5, help="Sybil client identities per cheater")
    ap.add_argument("--inflation", type=float, default=1000.0, help="cheaters' receipts claim this many times the work")
    ap.add_argument("--fake-sessions", type=int, default=10, help="fake sessions each Sybil or colluder countersigns a round")
    ap.add_argument("--sybil-accusations", type=int, default=1, help="honest peers each Sybil accuses a round")
    ap.add_argument("--refute-passes", type=int, default=3)
    ap.add_argument("--false-seed-round", type=int, default=5)
    ap.add_argument("--false-seed-accusations", type=int, default=100)
    a = ap.parse_args(argv)
    return SimConfig(a.peers, a.cheaters, a.liars, a.seeds, a.rounds, a.requests, a.base, a.newcomer,
                     a.newcomer_checks, a.trusted_level, a.referees, a.quorum, a.vesting_rounds, not a.strategic,
                     a.false_positive, a.seed, a.sybils, a.inflation, a.fake_sessions, a.sybil_accusations,
                     a.refute_passes, a.false_seed_round, a.false_seed_accusations)


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
