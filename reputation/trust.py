"""Global trust from attestations (EigenTrust) and the blacklist (issue 4, part 4).

EigenTrust (Kamvar, Schlosser, Garcia-Molina, WWW 2003, sections 4.1-4.5): local trust c_ij from i's own
pass/fail counts of j, negatives clipped to 0, rows normalised; global trust t <- (1-a) C^T t + a p with p
uniform over the pre-trusted seeds. A row with no outgoing trust (and the mass removed from refuted accusers)
goes to p, so t always sums to 1 and colluders cannot keep the walk to themselves. Accusers whose "fail"
verdicts referees refuted keep only (1 - refuted fraction) of their outgoing weight (TRUST.md). Newcomers have
no incoming trust, so they start near 0. Every function sorts peer ids, so all nodes compute the same answer.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Opinion:
    """What one peer's own checks of another concluded, summed over its valid attestations."""

    truster: str  # peer id of the checker
    subject: str  # peer id of the checked peer
    passes: int  # "pass" attestations
    fails: int  # "fail" attestations


@dataclass(frozen=True)
class AccuserRecord:
    """How a peer's accusations ("fail" attestations) fared before referees."""

    peer: str
    accusations: int  # fail verdicts sent to referees
    refuted: int  # of those, the referees found no fault


@dataclass(frozen=True)
class TrustSummary:
    """Frozen input of compute_trust."""

    opinions: tuple[Opinion, ...]
    accusers: tuple[AccuserRecord, ...] = ()
    peers: tuple[str, ...] = ()  # peers to score even if nobody has an opinion of them yet


def trust_vector(
    n: int,
    truster: np.ndarray,
    subject: np.ndarray,
    passes: np.ndarray,
    fails: np.ndarray,
    refuted_fraction: np.ndarray,
    pre_trusted: np.ndarray,
    alpha: float = 0.15,
    iterations: int = 20,
) -> np.ndarray:
    """EigenTrust over integer peer indices 0..n-1; returns t (n,), summing to 1.

    truster/subject/passes/fails: one entry per (i, j) pair (duplicates are summed). refuted_fraction: (n,)
    in [0, 1]. pre_trusted: indices of the seeds (non-empty).
    """
    if len(pre_trusted) == 0:
        raise ValueError("EigenTrust needs at least one pre-trusted peer")
    p = np.zeros(n)
    p[np.asarray(pre_trusted)] = 1.0 / len(pre_trusted)
    keep = truster != subject  # a peer's opinion of itself counts for nothing
    local = sp.coo_matrix(
        (np.asarray(passes, float)[keep] - np.asarray(fails, float)[keep], (truster[keep], subject[keep])), shape=(n, n)
    ).tocsr()  # duplicates summed here, before clipping
    local.data = np.clip(local.data, 0.0, None)
    local.eliminate_zeros()
    row_sum = np.asarray(local.sum(axis=1)).ravel()
    scale = np.divide(1.0 - np.clip(refuted_fraction, 0.0, 1.0), row_sum, out=np.zeros(n), where=row_sum > 0)
    c_transposed = (sp.diags(scale) @ local).T.tocsr()  # (n, n): column i is i's normalised opinions
    t = p.copy()
    for _ in range(iterations):
        t_next = (1.0 - alpha) * (c_transposed @ t)
        t = t_next + (1.0 - t_next.sum()) * p  # alpha, dangling rows and refuted weight all return to the seeds
    return t


def compute_trust(
    summary: TrustSummary, pre_trusted: Iterable[str], alpha: float = 0.15, iterations: int = 20
) -> dict[str, float]:
    """Global trust per peer id (sums to 1), deterministic for equal inputs."""
    seeds = sorted(set(pre_trusted))
    ids = sorted({*seeds, *summary.peers, *(o.truster for o in summary.opinions), *(o.subject for o in summary.opinions)})
    index = {peer: i for i, peer in enumerate(ids)}
    ops = sorted(summary.opinions, key=lambda o: (o.truster, o.subject))
    refuted = np.zeros(len(ids))
    for record in summary.accusers:
        if record.peer in index and record.accusations > 0:
            refuted[index[record.peer]] = record.refuted / record.accusations
    t = trust_vector(
        len(ids),
        np.array([index[o.truster] for o in ops], dtype=np.int64),
        np.array([index[o.subject] for o in ops], dtype=np.int64),
        np.array([o.passes for o in ops], dtype=float),
        np.array([o.fails for o in ops], dtype=float),
        refuted,
        np.array([index[s] for s in seeds], dtype=np.int64),
        alpha,
        iterations,
    )
    return {peer: float(t[i]) for i, peer in enumerate(ids)}


# ---- blacklist: pure state transitions -------------------------------------------------------------------


@dataclass(frozen=True)
class BlacklistPolicy:
    """When to ban and for how long."""

    trust_threshold: float = 0.02  # ban an established peer whose relative trust (t * active peers) is below this
    min_checks: int = 20  # ... once it has had at least this many checks (live: the node's own; newcomers start low)
    faults_to_ban: int = 1  # referee-confirmed faults that ban at once
    base_ban_s: float = 3600.0  # first ban length; doubles on every repeat (Petals bans 15 s, doubling)


@dataclass(frozen=True)
class Ban:
    until: float  # unix seconds
    count: int  # bans so far, this one included


@dataclass(frozen=True)
class FaultConfirmed:
    peer: str
    at: float


@dataclass(frozen=True)
class TrustObserved:
    peer: str
    relative_trust: float
    checks: int
    at: float


@dataclass(frozen=True)
class BlacklistState:
    bans: Mapping[str, Ban] = field(default_factory=dict)  # never mutated; apply() returns a new mapping
    faults: Mapping[str, int] = field(default_factory=dict)  # confirmed faults since the last ban


def is_blacklisted(state: BlacklistState, peer: str, now: float) -> bool:
    ban = state.bans.get(peer)
    return ban is not None and now < ban.until


def _ban(state: BlacklistState, peer: str, at: float, policy: BlacklistPolicy, reason: str) -> BlacklistState:
    count = state.bans[peer].count + 1 if peer in state.bans else 1
    until = at + policy.base_ban_s * 2 ** (count - 1)
    logger.info("blacklisting %s until %.0f (ban #%d, %s)", peer, until, count, reason)
    faults = {k: v for k, v in state.faults.items() if k != peer}
    return BlacklistState(bans={**state.bans, peer: Ban(until, count)}, faults=faults)


def apply(state: BlacklistState, event: FaultConfirmed | TrustObserved, policy: BlacklistPolicy) -> BlacklistState:
    """The next state; returns `state` itself when nothing changes. Events about a banned peer are ignored."""
    if is_blacklisted(state, event.peer, event.at):
        return state
    if isinstance(event, FaultConfirmed):
        faults = state.faults.get(event.peer, 0) + 1
        if faults >= policy.faults_to_ban:
            return _ban(state, event.peer, event.at, policy, f"{faults} confirmed fault(s)")
        return dataclasses.replace(state, faults={**state.faults, event.peer: faults})
    if event.checks >= policy.min_checks and event.relative_trust < policy.trust_threshold:
        return _ban(state, event.peer, event.at, policy, f"relative trust {event.relative_trust:.3g}")
    return state
