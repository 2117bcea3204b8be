"""One node's reputation state: the attestations and countersigned receipts it holds, its trust view,
its blacklist and its ledger (the live counterpart of the pure functions in trust, ledger and spotcheck).

Every node (client or peer) keeps one. Messages arrive from its own checks or by gossip; each is verified
before it is stored, duplicates and replays are dropped, and the store is bounded and expires old messages.
Trust is computed from a viewpoint anchored in pre-trusted seeds (the bootstrap operators, `--trusted-peers`)
and in the node itself, so that its own checks always count and nobody can buy weight with fake identities.
A "fail" verdict (the signer's referees confirmed it) blacklists the subject here when the node signed it, or
when its signer is a seed or trusted at least `vouch_level`; otherwise it is an accusation that this node
verifies with its own checks, and a refuted accusation costs the accuser its weight.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal, get_args

from hivemind.utils.crypto import RSAPrivateKey

from reputation.attest import Attestation, Check, Countersigned, Receipt, verify_attestation
from reputation.errors import MalformedMessageError
from reputation.ledger import Ledger, credit_receipts, forfeit, standings, vest
from reputation.spotcheck import check_probability
from reputation.tolerance import Agreement
from reputation.trust import (
    AccuserRecord,
    BlacklistPolicy,
    BlacklistState,
    FaultConfirmed,
    Opinion,
    TrustObserved,
    TrustSummary,
    apply,
    compute_trust,
    is_blacklisted,
)
from swarm.records import peer_id_of_public_key

logger = logging.getLogger(__name__)

Kind = Literal["attestation", "work"]  # what a stored or gossiped message is
KINDS: tuple[str, ...] = get_args(Kind)


@dataclass(frozen=True)
class ReputationConfig:
    seeds: tuple[str, ...] = ()  # pre-trusted peer ids (bootstrap operators)
    attestation_ttl: float = 24 * 3600.0  # how long an attestation counts
    work_ttl: float = 24 * 3600.0  # how long a countersigned receipt is kept for gossip
    vesting_s: float = 600.0  # credit vests this long after it is earned
    vouch_level: float = 1.0  # relative trust from which another node's confirmed fault bans here too
    base_check_rate: float = 0.05  # spot-check rate of established, trusted peers
    newcomer_check_rate: float = 0.3  # ... of newcomers and untrusted peers
    newcomer_checks: int = 10  # checks after which a peer is established
    trusted_level: float = 0.5  # relative trust at which the base rate applies
    blacklist: BlacklistPolicy = field(default_factory=BlacklistPolicy)
    max_messages: int = 20_000  # store bound; the oldest go first
    recompute_period: float = 1.0  # seconds between trust recomputations
    seeds_confirm_faults: bool = True  # a seed's "fail" blacklists here at once (off for views without real seeds)


@dataclass(frozen=True)
class StoredMessage:
    kind: Kind
    data: bytes
    expires_at: float
    parsed: Attestation | Countersigned | None = None  # decoded once, on arrival


@dataclass(frozen=True)
class PeerStanding:
    """One row of `swarm-peer status` / `swarm-peer rewards`."""

    peer_id: str
    trust: float  # relative trust (1.0 = average)
    passes: int  # pass verdicts about it by this view's anchors (the node itself and its seeds)
    fails: int  # confirmed faults, by the same anchors
    blacklisted: bool
    vested: float
    pending: float


def message_id(kind: str, data: bytes) -> str:
    return hashlib.sha256(kind.encode() + b"\0" + data).hexdigest()[:32]


def peer_id_of_key(private_key: RSAPrivateKey) -> str:
    return peer_id_of_public_key(private_key.get_public_key().to_bytes()).to_base58()


class ReputationNode:
    def __init__(self, private_key: RSAPrivateKey, cfg: ReputationConfig = ReputationConfig(), clock=time.time):
        self.private_key = private_key
        self.peer_id = peer_id_of_key(private_key)
        self.cfg = cfg
        self.clock = clock
        self._lock = threading.RLock()
        self._messages: OrderedDict[str, StoredMessage] = OrderedDict()
        self._nonces: set[bytes] = set()
        self._accusers: dict[str, list[int]] = {}  # peer -> [accusations, refuted]
        self._pending: dict[str, list[str]] = {}  # subject -> accusers awaiting this node's own verdict
        self._blacklist = BlacklistState()
        self._ledger = Ledger()
        self._work: list[Countersigned] = []  # countersigned receipts not yet credited
        self._trust: dict[str, float] = {}
        self._relative_trust: dict[str, float] = {}  # trust / mean trust of the non-anchor peers (1.0 = average)
        self._counts: dict[str, tuple[int, int]] = {}  # subject -> (passes, fails), all signers
        self._trusted_checks: dict[str, int] = {}  # subject -> verdicts by this node and its seeds
        self._computed_at = float("-inf")
        self.known_peers: set[str] = set()  # peers seen serving; scored even before anyone checks them

    # ---- messages ------------------------------------------------------------------------------------

    def ingest(self, kind: Kind, data: bytes) -> bool:
        """Verify and store one message (own or gossiped); False if it is a duplicate or invalid.

        Decoding validates every field's type and size (reputation.attest), so a message that reaches the store,
        and from there `refresh`, is well-formed; anything else is dropped here and logged at DEBUG.
        """
        if kind not in KINDS or not isinstance(data, bytes):
            logger.debug(f"Dropped a message of unknown kind {kind!r:.40}")
            return False
        mid = message_id(kind, data)
        with self._lock:
            if mid in self._messages:
                return False
            now = self.clock()
            try:
                message = (Attestation if kind == "attestation" else Countersigned).decode(data)
            except MalformedMessageError as e:
                logger.debug(f"Dropped a malformed {kind} message: {e}")
                return False
            if isinstance(message, Attestation):
                result = verify_attestation(message, now, self._nonces)
                if result is not Check.OK:
                    logger.debug(f"Dropped an attestation by {message.checker}: {result.value}")
                    return False
                self._nonces.add(message.nonce)
                self._store(mid, StoredMessage(kind, data, message.expires_at, message))
                self._absorb(message)
            else:
                result = message.verify()
                if result is not Check.OK or message.client == message.receipt.signer:
                    reason = result.value if result is not Check.OK else "a peer cannot countersign its own work"
                    logger.debug(f"Dropped work countersigned by {message.client}: {reason}")
                    return False
                self._store(mid, StoredMessage(kind, data, now + self.cfg.work_ttl, message))
                self._work.append(message)
            return True

    def _store(self, mid: str, message: StoredMessage) -> None:
        self._messages[mid] = message
        while len(self._messages) > self.cfg.max_messages:
            self._messages.popitem(last=False)

    def inventory(self) -> list[str]:
        with self._lock:
            self._prune()
            return list(self._messages)

    def messages(self, ids: list[str] | None = None, limit: int = 2000) -> list[tuple[Kind, bytes]]:
        """Stored messages by id (all when ids is None), newest last, at most `limit`."""
        with self._lock:
            self._prune()
            chosen = self._messages.keys() if ids is None else [i for i in ids if i in self._messages]
            return [(self._messages[i].kind, self._messages[i].data) for i in list(chosen)[:limit]]

    def _prune(self) -> None:
        now = self.clock()
        for mid in [mid for mid, m in self._messages.items() if m.expires_at < now]:
            del self._messages[mid]

    # ---- own statements ------------------------------------------------------------------------------

    def attest(self, receipt: Receipt, agreement: Agreement, verdict: str, profile: str) -> Attestation:
        """Sign this node's verdict on `receipt`'s signer and store it for gossip."""
        now = self.clock()
        att = Attestation(
            checker=self.peer_id,
            subject=receipt.signer,
            receipt=receipt,
            cosine=float(agreement.min_token_cosine),
            rel_l2=float(agreement.rel_l2),
            verdict=verdict,
            profile=profile,
            issued_at=now,
            expires_at=now + self.cfg.attestation_ttl,
            nonce=os.urandom(16),
        ).sign(self.private_key)
        self.ingest("attestation", att.encode())
        return att

    def countersign(self, receipt: Receipt) -> Countersigned | None:
        """Accept a peer's work (the ledger's input); None for a receipt that does not verify."""
        if receipt.verify() is not Check.OK or receipt.signer == self.peer_id:
            return None
        work = Countersigned.make(receipt, self.peer_id, self.private_key)
        self.ingest("work", work.encode())
        return work

    # ---- verdicts --------------------------------------------------------------------------------------

    def _absorb(self, att: Attestation) -> None:
        subject, signer = att.subject, att.checker
        if att.verdict == "fail":
            vouched = self.cfg.seeds_confirm_faults and (
                signer in self.cfg.seeds or self._relative(signer) >= self.cfg.vouch_level
            )
            if signer == self.peer_id or vouched:
                self._fault(subject, f"fault confirmed by {signer}")
                self._pending.pop(subject, None)  # accusations against it stand
            else:
                self._pending.setdefault(subject, []).append(signer)
                self._accusers.setdefault(signer, [0, 0])[0] += 1
                logger.debug(f"{signer} accuses {subject}: checking it more often to verify")
        elif att.verdict == "pass" and signer == self.peer_id:
            for accuser in self._pending.pop(subject, []):
                self._accusers.setdefault(accuser, [1, 0])[1] += 1
                logger.debug(f"Refuted {accuser}'s accusation against {subject}: it passed this node's check")

    def _fault(self, peer: str, reason: str) -> None:
        was = is_blacklisted(self._blacklist, peer, self.clock())
        self._blacklist = apply(self._blacklist, FaultConfirmed(peer, self.clock()), self.cfg.blacklist)
        if not was and is_blacklisted(self._blacklist, peer, self.clock()):
            logger.warning(f"Blacklisted {peer} ({reason})")
            self._ledger = forfeit(self._ledger, peer)

    # ---- trust view ----------------------------------------------------------------------------------

    def _relative(self, peer: str) -> float:
        return self._relative_trust.get(peer, 0.0)

    def _tallies(self) -> dict[tuple[str, str], list[int]]:
        """[passes, fails] per (checker, subject) over the stored, unexpired attestations (caller holds the lock)."""
        tallies: dict[tuple[str, str], list[int]] = {}
        for m in self._messages.values():
            if m.kind == "attestation" and m.parsed.verdict != "inconclusive":
                tally = tallies.setdefault((m.parsed.checker, m.parsed.subject), [0, 0])
                tally[m.parsed.verdict == "fail"] += 1
        return tallies

    def refresh(self, force: bool = False) -> None:
        """Recompute trust, apply low-trust bans, credit and vest rewards (at most every recompute_period)."""
        with self._lock:
            now = self.clock()
            if not force and now - self._computed_at < self.cfg.recompute_period:
                return
            self._prune()
            anchors = {self.peer_id, *self.cfg.seeds}
            tallies = self._tallies()
            counts: dict[str, list[int]] = {}
            for (checker, subject), (passes, fails) in tallies.items():
                if checker in anchors:
                    count = counts.setdefault(subject, [0, 0])
                    count[0], count[1] = count[0] + passes, count[1] + fails
            trusted_checks = {peer: p + f for peer, (p, f) in counts.items()}
            summary = TrustSummary(
                opinions=tuple(Opinion(t, s, p, f) for (t, s), (p, f) in tallies.items()),
                accusers=tuple(AccuserRecord(p, a, r) for p, (a, r) in self._accusers.items()),
                peers=tuple(sorted(self.known_peers)),
            )
            self._trust = compute_trust(summary, anchors)
            others = [t for peer, t in self._trust.items() if peer not in anchors]
            mean = sum(others) / len(others) if others else 0.0
            self._relative_trust = {peer: (t / mean if mean > 0 else 0.0) for peer, t in self._trust.items()}
            self._counts = {peer: (p, f) for peer, (p, f) in counts.items()}
            self._trusted_checks = trusted_checks
            for peer, checks in trusted_checks.items():
                if peer in anchors:
                    continue
                was = is_blacklisted(self._blacklist, peer, now)
                event = TrustObserved(peer, self._relative(peer), checks, now)
                self._blacklist = apply(self._blacklist, event, self.cfg.blacklist)
                if not was and is_blacklisted(self._blacklist, peer, now):
                    logger.warning(f"Blacklisted {peer} (relative trust {self._relative(peer):.3f})")
                    self._ledger = forfeit(self._ledger, peer)
            relative = {peer: self._relative(peer) for peer in self._trust}
            work, self._work = self._work, []
            work = [w for w in work if not is_blacklisted(self._blacklist, w.receipt.signer, now)]
            self._ledger = vest(credit_receipts(self._ledger, work, relative, now, self.cfg.vesting_s), now)
            self._computed_at = now

    def trust_from_seeds(self, peer: str) -> float | None:
        """Relative trust of `peer` in a view anchored only in the seeds (how the swarm's operators see it);
        None without seeds. Used for a peer's own standing, where its own view would anchor in itself."""
        if not self.cfg.seeds:
            return None
        with self._lock:
            self._prune()
            summary = TrustSummary(
                opinions=tuple(Opinion(t, s, p, f) for (t, s), (p, f) in self._tallies().items()),
                peers=tuple(sorted(self.known_peers | {peer})),
            )
            trust = compute_trust(summary, self.cfg.seeds)
        others = [t for p, t in trust.items() if p not in self.cfg.seeds]
        mean = sum(others) / len(others) if others else 0.0
        return trust.get(peer, 0.0) / mean if mean > 0 else 0.0

    def score(self, peer: str) -> float:
        """Relative trust of `peer` in this node's view (1.0 = average; newcomers start near 0)."""
        self.refresh()
        with self._lock:
            return self._relative(peer)

    def is_blacklisted(self, peer: str) -> bool:
        self.refresh()
        with self._lock:
            return is_blacklisted(self._blacklist, peer, self.clock())

    def blacklisted(self) -> frozenset[str]:
        self.refresh()
        with self._lock:
            now = self.clock()
            return frozenset(p for p in self._blacklist.bans if is_blacklisted(self._blacklist, p, now))

    def check_rate(self, peer: str) -> float:
        """How likely this node spot-checks one response of `peer`: always while an accusation is open."""
        self.refresh()
        with self._lock:
            if self._pending.get(peer):
                return 1.0
            return check_probability(
                self._relative(peer),
                self._trusted_checks.get(peer, 0),
                base=self.cfg.base_check_rate,
                newcomer=self.cfg.newcomer_check_rate,
                newcomer_checks=self.cfg.newcomer_checks,
                trusted_level=self.cfg.trusted_level,
            )

    def accuser_record(self, peer: str) -> AccuserRecord:
        with self._lock:
            accusations, refuted = self._accusers.get(peer, [0, 0])
            return AccuserRecord(peer, accusations, refuted)

    def standings(self) -> list[PeerStanding]:
        """Every peer this node knows of: trust, verdicts, blacklist, rewards (most vested first)."""
        self.refresh(force=True)
        with self._lock:
            now = self.clock()
            accounts = {s.peer: s for s in standings(self._ledger)}
            peers = (set(self._trust) | set(accounts) | self.known_peers) - {self.peer_id, *self.cfg.seeds}
            rows = []
            for peer in peers:
                passes, fails = self._counts.get(peer, (0, 0))
                account = accounts.get(peer)
                rows.append(PeerStanding(
                    peer, self._relative(peer), passes, fails, is_blacklisted(self._blacklist, peer, now),
                    account.vested if account else 0.0, account.pending if account else 0.0,
                ))
            return sorted(rows, key=lambda r: (-r.vested, -r.pending, -r.trust, r.peer_id))
