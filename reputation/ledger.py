"""Rewards: credit for verified work, weighted by trust, vesting, forfeiture (issue 4, part 5; issue 12).

Credit cannot be minted. A peer earns only for work a client received in its own session and countersigned,
and the countersignature carries the client's own count of the tokens it sent through that hop. So a receipt
earns min(receipt.tokens, countersigned tokens) x blocks: claiming more than the client sent earns nothing
extra. Each countersignature then weighs by its signer's trust in this node's view: the node itself and its
seeds weigh 1, anyone else its relative trust capped at 1. Clients are never checked, so a Sybil client has no
trust and mints nothing; a trusted one vouches in all for no more than the busiest of the node and its seeds
has used (an allowance), so colluding clients cannot mint either. The work is also weighted by the serving peer's own relative trust (capped at 1), so
newcomers earn little until checks establish them. Both counts are cumulative over the session, so a later
receipt of the same (peer, session, blocks) earns only what goes beyond what was already paid.
Credit vests after a delay; a blacklisted peer forfeits what has not vested, so a cheater's earnings before
detection are lost. Pure: every function returns a new Ledger.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field

from reputation.attest import Check, Countersigned, Receipt

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Account:
    vested: float = 0.0  # paid out, never taken back
    pending: tuple[tuple[float, float], ...] = ()  # (amount, vests_at), oldest first


@dataclass(frozen=True)
class Ledger:
    accounts: Mapping[str, Account] = field(default_factory=dict)  # never mutated
    forfeited: float = 0.0  # total credit taken back from blacklisted peers
    credited: frozenset[str] = frozenset()  # "<receipt digest>/<client>" of countersignatures already paid
    work: Mapping[str, float] = field(default_factory=dict)  # weighted units paid per (signer, session, blocks)
    used: Mapping[str, float] = field(default_factory=dict)  # units each countersigner vouched for, credited or not


@dataclass(frozen=True)
class Standing:
    peer: str
    vested: float
    pending: float


def work_units(receipt: Receipt, tokens: int | None = None) -> float:
    """tokens x blocks: the unit of work a receipt proves, capped at `tokens` (the countersigner's count)."""
    claimed = receipt.tokens if tokens is None else min(receipt.tokens, tokens)
    return float(claimed * max(receipt.block_end - receipt.block_start, 0))


def trust_weight(relative_trust: float, cap: float = 1.0) -> float:
    """Relative trust (1.0 = average peer) clipped to [0, cap], divided by cap: the share of credit earned."""
    return min(max(relative_trust, 0.0), cap) / cap


def countersigner_weight(client: str, relative_trust: Mapping[str, float], anchors: Set[str]) -> float:
    """How much a client's countersignature counts: 1 for the node itself and its seeds, else its trust."""
    return 1.0 if client in anchors else trust_weight(relative_trust.get(client, 0.0))


def credit(ledger: Ledger, amounts: Mapping[str, float], now: float, vesting_s: float) -> Ledger:
    """Add pending credit per peer (already weighted), vesting at now + vesting_s."""
    accounts = dict(ledger.accounts)
    for peer in sorted(amounts):
        if amounts[peer] <= 0:
            continue
        acc = accounts.get(peer, Account())
        accounts[peer] = Account(acc.vested, (*acc.pending, (amounts[peer], now + vesting_s)))
    return Ledger(accounts, ledger.forfeited, ledger.credited, ledger.work, ledger.used)


def credit_receipts(
    ledger: Ledger,
    receipts: Sequence[Countersigned],
    relative_trust: Mapping[str, float],
    now: float,
    vesting_s: float,
    anchors: Set[str] = frozenset(),
) -> Ledger:
    """Credit countersigned receipts whose signatures verify: min(claimed, countersigned tokens) x blocks, times
    the countersigner's weight (1 for `anchors`, else its relative trust capped at 1) and the server's.

    A countersigner other than the anchors vouches for at most as many units in all as the busiest anchor has
    (its allowance): a trusted client colluding with cheaters cannot claim to have used more of the swarm than
    the node or a seed did. Anchors' countersignatures are taken first, since they set the allowance.
    Each countersignature is paid once; per (signer, session, blocks) the ledger keeps the most it has paid
    (weighted), and a later or better-weighted countersignature earns only the difference.
    """
    amounts: dict[str, float] = {}
    paid, work, used = set(ledger.credited), dict(ledger.work), dict(ledger.used)
    for c in sorted(receipts, key=lambda c: c.client not in anchors):
        once = f"{c.receipt.digest}/{c.client}"
        if once in paid or c.client == c.receipt.signer or c.verify() is not Check.OK:
            logger.debug("not crediting receipt %s of %s", c.receipt.digest[:12], c.receipt.signer)
            continue
        paid.add(once)
        r = c.receipt
        units = work_units(r, c.tokens)
        if c.client not in anchors:
            allowance = max((used.get(a, 0.0) for a in anchors), default=0.0) - used.get(c.client, 0.0)
            units = min(units, max(allowance, 0.0))
        used[c.client] = used.get(c.client, 0.0) + units
        key = f"{r.signer}/{r.session_id}/{r.block_start}:{r.block_end}"
        weight = countersigner_weight(c.client, relative_trust, anchors) * trust_weight(relative_trust.get(r.signer, 0.0))
        units *= weight
        if units <= work.get(key, 0.0):
            continue
        amounts[r.signer] = amounts.get(r.signer, 0.0) + units - work.get(key, 0.0)
        work[key] = units
    updated = credit(ledger, amounts, now, vesting_s)
    return Ledger(updated.accounts, updated.forfeited, frozenset(paid), work, used)


def vest(ledger: Ledger, now: float) -> Ledger:
    """Move every pending amount whose time has come into vested."""
    accounts = dict(ledger.accounts)
    for peer, acc in ledger.accounts.items():
        due = sum(a for a, at in acc.pending if at <= now)
        if due:
            accounts[peer] = Account(acc.vested + due, tuple((a, at) for a, at in acc.pending if at > now))
    return Ledger(accounts, ledger.forfeited, ledger.credited, ledger.work, ledger.used)


def forfeit(ledger: Ledger, peer: str) -> Ledger:
    """A blacklisted peer loses its unvested credit."""
    acc = ledger.accounts.get(peer)
    if acc is None or not acc.pending:
        return ledger
    lost = sum(a for a, _ in acc.pending)
    logger.info("%s forfeits %.1f unvested credit", peer, lost)
    return Ledger({**ledger.accounts, peer: Account(acc.vested, ())}, ledger.forfeited + lost, ledger.credited, ledger.work,
                  ledger.used)


def standings(ledger: Ledger) -> list[Standing]:
    """All accounts, most vested credit first, ties by peer id (the same order on every node)."""
    rows = [Standing(p, a.vested, sum(x for x, _ in a.pending)) for p, a in ledger.accounts.items()]
    return sorted(rows, key=lambda s: (-s.vested, -s.pending, s.peer))
