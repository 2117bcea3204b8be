"""Rewards: credit for verified work, weighted by trust, vesting, forfeiture (issue 4, part 5).

Only receipts a client countersigned earn credit. A receipt's tokens are cumulative over its session, so a client
countersigns the last receipt of each (session, peer, blocks) and a later one credits only the increase (TRUST.md: pay only for work that was checked or accepted).
Credit = tokens x blocks x trust weight, where the weight is the peer's relative trust capped at 1, so newcomers
earn little until checks establish them. Credit vests after a delay; a blacklisted peer forfeits what has not
vested, so a cheater's earnings before detection are lost. Pure: every function returns a new Ledger.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
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
    credited: frozenset[str] = frozenset()  # digests of receipts already paid (no double counting)
    work: Mapping[str, float] = field(default_factory=dict)  # units credited per (signer, session, blocks)


@dataclass(frozen=True)
class Standing:
    peer: str
    vested: float
    pending: float


def work_units(receipt: Receipt) -> float:
    """tokens x blocks: the unit of work a receipt proves."""
    return float(receipt.tokens * max(receipt.block_end - receipt.block_start, 0))


def trust_weight(relative_trust: float, cap: float = 1.0) -> float:
    """Relative trust (1.0 = average peer) clipped to [0, cap], divided by cap: the share of credit earned."""
    return min(max(relative_trust, 0.0), cap) / cap


def credit(ledger: Ledger, amounts: Mapping[str, float], now: float, vesting_s: float) -> Ledger:
    """Add pending credit per peer (already weighted), vesting at now + vesting_s."""
    accounts = dict(ledger.accounts)
    for peer in sorted(amounts):
        if amounts[peer] <= 0:
            continue
        acc = accounts.get(peer, Account())
        accounts[peer] = Account(acc.vested, (*acc.pending, (amounts[peer], now + vesting_s)))
    return Ledger(accounts, ledger.forfeited, ledger.credited, ledger.work)


def credit_receipts(
    ledger: Ledger,
    receipts: Sequence[Countersigned],
    relative_trust: Mapping[str, float],
    now: float,
    vesting_s: float,
) -> Ledger:
    """Credit countersigned receipts whose signatures verify, weighted by the server's trust.

    Each receipt is paid once, and a session's receipts are cumulative: a later receipt of the same
    (signer, session, blocks) earns only the work beyond what was already credited.
    """
    amounts: dict[str, float] = {}
    paid, work = set(ledger.credited), dict(ledger.work)
    for c in receipts:
        if c.receipt.digest in paid or c.client == c.receipt.signer or c.verify() is not Check.OK:
            logger.debug("not crediting receipt %s of %s", c.receipt.digest[:12], c.receipt.signer)
            continue
        paid.add(c.receipt.digest)
        r = c.receipt
        key = f"{r.signer}/{r.session_id}/{r.block_start}:{r.block_end}"
        new_units = work_units(r) - work.get(key, 0.0)
        if new_units <= 0:
            continue
        work[key] = work_units(r)
        weight = trust_weight(relative_trust.get(r.signer, 0.0))
        amounts[r.signer] = amounts.get(r.signer, 0.0) + new_units * weight
    updated = credit(ledger, amounts, now, vesting_s)
    return Ledger(updated.accounts, updated.forfeited, frozenset(paid), work)


def vest(ledger: Ledger, now: float) -> Ledger:
    """Move every pending amount whose time has come into vested."""
    accounts = dict(ledger.accounts)
    for peer, acc in ledger.accounts.items():
        due = sum(a for a, at in acc.pending if at <= now)
        if due:
            accounts[peer] = Account(acc.vested + due, tuple((a, at) for a, at in acc.pending if at > now))
    return Ledger(accounts, ledger.forfeited, ledger.credited, ledger.work)


def forfeit(ledger: Ledger, peer: str) -> Ledger:
    """A blacklisted peer loses its unvested credit."""
    acc = ledger.accounts.get(peer)
    if acc is None or not acc.pending:
        return ledger
    lost = sum(a for a, _ in acc.pending)
    logger.info("%s forfeits %.1f unvested credit", peer, lost)
    return Ledger({**ledger.accounts, peer: Account(acc.vested, ())}, ledger.forfeited + lost, ledger.credited, ledger.work)


def standings(ledger: Ledger) -> list[Standing]:
    """All accounts, most vested credit first, ties by peer id (the same order on every node)."""
    rows = [Standing(p, a.vested, sum(x for x, _ in a.pending)) for p, a in ledger.accounts.items()]
    return sorted(rows, key=lambda s: (-s.vested, -s.pending, s.peer))
