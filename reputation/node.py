"""One node's reputation state: the attestations and countersigned receipts it holds, its trust view,
its blacklist and its ledger (the live counterpart of the pure functions in trust, ledger and spotcheck).

Every node (client or peer) keeps one. Messages arrive from its own checks or by gossip; each is verified
before it is stored (signatures, and the signer's identity puzzle: a signer without a valid solution is
ignored), duplicates and replays are dropped, and the store is bounded in messages and bytes and expires old
messages. Trust is computed from a viewpoint anchored in pre-trusted seeds (the bootstrap operators,
`--trusted-peers`) and in the node itself, so that its own checks always count and nobody can buy weight with
fake identities.

No signer's word alone convicts anyone, not even a seed's. Only this node's own "fail" verdict blacklists
(at once). A "fail" signed by anyone else is an accusation: while it is open, this node checks the accused on
every reply, until its own checks confirm it (a blacklist) or refute it (`refute_passes` passes; a pass on
the accusation's evidence would too, `pending_evidence` / `verify_evidence`, but no checker re-runs evidence
yet: it lacks the padding mask, which receipts do not commit to); a refuted
accuser loses its weight, and one mostly refuted is no longer heard. Low trust bans too, but only a peer this
node has itself checked `min_checks` times. A receipt claiming more tokens than this
node sent through that hop (which only the node itself knows) is a fault too.

The token path only reads: EigenTrust and the ledger are refreshed in the background (`refresh_periodically`,
started by the node's owner), which publishes an immutable `TrustSnapshot`; `is_blacklisted`, `score` and
`check_rate` read the snapshot, without locks. This node's own verdicts and accusations update the
snapshot's blacklist and accused set at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal, get_args

from hivemind.utils.crypto import RSAPrivateKey

from reputation import identity_puzzle
from reputation.attest import Attestation, Check, Countersigned, Evidence, Receipt, verify_attestation
from reputation.errors import MalformedMessageError
from reputation.ledger import Ledger, credit_receipts, forfeit, standings, vest
from reputation.spotcheck import check_probability, should_referee
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
from swarm.errors import ConfigError
from swarm.periodic import run_periodically
from swarm.records import peer_id_of_public_key

logger = logging.getLogger(__name__)

Kind = Literal["attestation", "work"]  # what a stored or gossiped message is
KINDS: tuple[str, ...] = get_args(Kind)


PUZZLE_BITS_ENV = "SWARM_PUZZLE_BITS"  # a swarm-wide difficulty: every node of a swarm must use the same


def _default_puzzle_bits() -> int:
    """$SWARM_PUZZLE_BITS if set (a private or test swarm may choose cheaper identities), else the default; read
    when a config is made."""
    value = os.environ.get(PUZZLE_BITS_ENV, "").strip()
    if not value:
        return identity_puzzle.DEFAULT_BITS
    if not value.isdigit() or not 0 <= int(value) <= identity_puzzle.MAX_BITS:
        raise ConfigError(f"${PUZZLE_BITS_ENV} must be a whole number of bits from 0 to {identity_puzzle.MAX_BITS}, "
                          f"not {value!r}")
    return int(value)


@dataclass(frozen=True)
class ReputationConfig:
    seeds: tuple[str, ...] = ()  # pre-trusted peer ids (bootstrap operators)
    attestation_ttl: float = 24 * 3600.0  # how long an attestation counts
    work_ttl: float = 24 * 3600.0  # how long a countersigned receipt is kept for gossip
    vesting_s: float = 600.0  # credit vests this long after it is earned
    base_check_rate: float = 0.05  # spot-check rate of established, trusted peers
    newcomer_check_rate: float = 0.3  # ... of newcomers and untrusted peers
    newcomer_checks: int = 10  # checks after which a peer is established
    trusted_level: float = 0.5  # relative trust at which the base rate applies
    blacklist: BlacklistPolicy = field(default_factory=BlacklistPolicy)
    max_messages: int = 20_000  # store bound; the oldest go first
    max_bytes: int = 256 * 2**20  # store bound in bytes (a "fail" with evidence may be 1 MiB)
    recompute_period: float = 1.0  # seconds between background refreshes of trust and the ledger
    refute_passes: int = 3  # own passes of the accused that refute an open accusation
    max_accusations_per_peer: int = 16  # open accusations kept per accused peer (the newest)
    puzzle_bits: int = field(default_factory=_default_puzzle_bits)  # identity puzzle every signer must solve
    dispute_avoid_s: float = 600.0  # how long this node's routes avoid a peer it saw contradicted and could not judge


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
    fails: int  # confirmed faults, by the same anchors, and inflated receipts this node countersigned
    blacklisted: bool
    vested: float
    pending: float
    accused: bool = False  # an accusation against it is open in this view (not yet confirmed or refuted)


@dataclass(frozen=True)
class TrustSnapshot:
    """What the token path reads: published whole by `refresh` (and by own verdicts), never mutated."""

    computed_at: float = float("-inf")
    relative: Mapping[str, float] = field(default_factory=dict)  # trust / mean trust of non-anchors (1.0 = average)
    trusted_checks: Mapping[str, int] = field(default_factory=dict)  # subject -> verdicts by this node and its seeds
    counts: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # subject -> (passes, fails) by the anchors
    blacklist: BlacklistState = field(default_factory=BlacklistState)
    accused: frozenset[str] = frozenset()  # peers with an open accusation: checked on every reply


@dataclass
class _Accusation:
    accuser: str
    expires_at: float
    passes: int = 0  # own passes of the accused since it was made


def message_id(kind: str, data: bytes) -> str:
    return hashlib.sha256(kind.encode() + b"\0" + data).hexdigest()[:32]


def peer_id_of_key(private_key: RSAPrivateKey) -> str:
    return peer_id_of_public_key(private_key.get_public_key().to_bytes()).to_base58()


class ReputationNode:
    def __init__(
        self,
        private_key: RSAPrivateKey,
        cfg: ReputationConfig | None = None,
        clock=time.time,
        puzzle_nonce: bytes | Future | None = None,  # None: solved on first use (cached per key in this process)
    ):
        self.private_key = private_key
        self.peer_id = peer_id_of_key(private_key)
        self.cfg = ReputationConfig() if cfg is None else cfg
        self.clock = clock
        self._puzzle = puzzle_nonce
        self._lock = threading.RLock()  # the store and everything below; never held by the token path
        self._refreshing = threading.Lock()  # one refresh at a time (the only writer of the ledger)
        self._messages: OrderedDict[str, StoredMessage] = OrderedDict()
        self._bytes = 0
        self._nonces: set[bytes] = set()
        self._accusers: dict[str, list[int]] = {}  # peer -> [accusations, refuted]
        self._pending: dict[str, dict[str, _Accusation]] = {}  # accused -> message id -> open accusation
        self._inflations: dict[str, int] = {}  # peer -> receipts of it this node caught claiming too much
        self._blacklist = BlacklistState()
        self._ledger = Ledger()
        self._work: list[Countersigned] = []  # countersigned receipts not yet credited
        self._snapshot = TrustSnapshot()
        self.known_peers: set[str] = set()  # peers seen serving; scored even before anyone checks them
        self._unproven: dict[str, Attestation | Countersigned] = {}  # own, signed before the puzzle was solved
        self._disputed: dict[str, float] = {}  # peer -> until when this node's routes avoid it (`dispute_seen`)

    @property
    def puzzle_nonce(self) -> bytes:
        """This node's identity-puzzle solution; b"" while a background solve is still running, so that signing
        never waits on the client's loop (what it signs meanwhile counts here, and other nodes ignore it)."""
        if isinstance(self._puzzle, Future):
            if not self._puzzle.done():
                return b""
            self._puzzle = self._puzzle.result()
        if self._puzzle is None:
            public_key = self.private_key.get_public_key().to_bytes()
            self._puzzle = identity_puzzle.solve_cached(public_key, self.cfg.puzzle_bits)
        return self._puzzle

    def learn_peers(self, peers: Iterable[str]) -> None:
        """Peers seen serving: scored (and so checked as newcomers) even before anyone checks them."""
        with self._lock:
            self.known_peers.update(peers)

    @property
    def snapshot(self) -> TrustSnapshot:
        return self._snapshot

    def _publish(self, **changes) -> None:
        """Replace the snapshot (caller holds the lock); readers see the old or the new one, whole."""
        self._snapshot = dataclasses.replace(self._snapshot, **changes)

    # ---- messages ------------------------------------------------------------------------------------

    def _puzzle_ok(self, signer: str, public_key: bytes, nonce: bytes) -> bool:
        return signer == self.peer_id or identity_puzzle.verify(public_key, nonce, self.cfg.puzzle_bits)

    def ingest(self, kind: Kind, data: bytes) -> bool:
        """Verify and store one message (own or gossiped); False if it is a duplicate or invalid.

        Decoding validates every field's type and size (reputation.attest), so a message that reaches the store,
        and from there `refresh`, is well-formed; anything else is dropped here and logged at DEBUG. Signatures
        are verified outside the lock; only the store itself is updated under it.
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
            result = verify_attestation(message, now, frozenset())
            if result is Check.OK and not self._puzzle_ok(message.checker, message.public_key, message.puzzle_nonce):
                result = "no valid identity puzzle"
            if result is not Check.OK:
                logger.debug(f"Dropped an attestation by {message.checker}: {getattr(result, 'value', result)}")
                return False
            with self._lock:
                if mid in self._messages or message.nonce in self._nonces:
                    return False
                self._nonces.add(message.nonce)
                self._store(mid, StoredMessage(kind, data, message.expires_at, message))
                self._absorb(message, mid)
            return True
        result = message.verify()
        reason = result.value if result is not Check.OK else None
        if reason is None and message.client == message.receipt.signer:
            reason = "a peer cannot countersign its own work"
        if reason is None and not self._puzzle_ok(message.client, message.public_key, message.puzzle_nonce):
            reason = "no valid identity puzzle"
        if reason is not None:
            logger.debug(f"Dropped work countersigned by {message.client}: {reason}")
            return False
        with self._lock:
            if mid in self._messages:
                return False
            self._store(mid, StoredMessage(kind, data, now + self.cfg.work_ttl, message))
            self._work.append(message)
        return True

    def _store(self, mid: str, message: StoredMessage) -> None:
        self._messages[mid] = message
        self._bytes += len(message.data)
        while len(self._messages) > self.cfg.max_messages or (self._bytes > self.cfg.max_bytes and len(self._messages) > 1):
            _, old = self._messages.popitem(last=False)
            self._bytes -= len(old.data)

    def inventory(self) -> list[str]:
        """Ids of the stored messages other nodes can accept (never own ones still lacking the puzzle's solution)."""
        self.prove_unproven()
        with self._lock:
            self._prune()
            return [mid for mid in self._messages if mid not in self._unproven]

    def messages(self, ids: list[str] | None = None, limit: int = 2000, max_bytes: int | None = None) -> list[tuple[Kind, bytes]]:
        """Stored messages by id (all when ids is None), oldest first, at most `limit` of them and `max_bytes`
        of data in all (at least one, whatever its size, so that every message can travel)."""
        self.prove_unproven()
        with self._lock:
            self._prune()
            chosen = [i for i in (self._messages if ids is None else ids) if i in self._messages and i not in self._unproven]
            out: list[tuple[Kind, bytes]] = []
            size = 0
            for mid in chosen:
                message = self._messages[mid]
                if len(out) >= limit or (max_bytes is not None and out and size + len(message.data) > max_bytes):
                    break
                out.append((message.kind, message.data))
                size += len(message.data)
            return out

    def _prune(self) -> None:
        now = self.clock()
        for mid in [mid for mid, m in self._messages.items() if m.expires_at < now]:
            self._bytes -= len(self._messages.pop(mid).data)
        changed = False
        for subject in list(self._pending):
            open_ = {mid: a for mid, a in self._pending[subject].items() if a.expires_at >= now}
            if len(open_) != len(self._pending[subject]):
                changed = True
                if open_:
                    self._pending[subject] = open_
                else:
                    del self._pending[subject]
        if changed:
            self._publish(accused=frozenset(self._pending))

    # ---- own statements ------------------------------------------------------------------------------

    def attest(
        self, receipt: Receipt, agreement: Agreement, verdict: str, profile: str, evidence: Evidence | None = None
    ) -> Attestation:
        """Sign this node's verdict on `receipt`'s signer and store it for gossip. A "fail" may carry
        `evidence` (Evidence.of_step) so that other nodes can re-run the step themselves."""
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
            puzzle_nonce=self.puzzle_nonce,
            evidence=evidence if verdict == "fail" and evidence is not None and evidence.matches(receipt) else None,
        ).sign(self.private_key)
        self._store_own("attestation", att)
        return att

    def countersign(self, receipt: Receipt, tokens: int, verified: bool = True) -> Countersigned | None:
        """Accept a peer's work: "I received it in my session and sent `tokens` through that hop" (the ledger's
        input); None when there is nothing to pay.

        `tokens` is this node's own count of what it sent on the hop's stream (batch x tokens, cumulative, like
        the receipt's, replays included). A receipt claiming more is an inflation fault of its signer, recorded here
        only (nobody else knows what this node sent): no credit, and a blacklist. `verified=False` says nobody
        else serves the hop's blocks, so its work could not be verified: it earns nothing.
        """
        if receipt.verify() is not Check.OK or receipt.signer == self.peer_id:
            return None
        if receipt.tokens > tokens:
            with self._lock:
                self._inflations[receipt.signer] = self._inflations.get(receipt.signer, 0) + 1
                self._fault(receipt.signer, f"its receipt claims {receipt.tokens} tokens; this node sent {tokens}")
            return None
        if not verified or is_blacklisted(self._snapshot.blacklist, receipt.signer, self.clock()):
            return None
        work = Countersigned.make(receipt, self.peer_id, self.private_key, tokens, self.puzzle_nonce)
        self._store_own("work", work)
        return work

    def _store_own(self, kind: Kind, message: Attestation | Countersigned) -> None:
        """Store one of this node's own messages. Signed before the identity puzzle was solved, it counts here at
        once but stays out of gossip (other nodes would drop it) until `prove_unproven` signs it again."""
        data = message.encode()
        if self.ingest(kind, data) and not message.puzzle_nonce:
            with self._lock:
                self._unproven[message_id(kind, data)] = message

    def prove_unproven(self) -> int:
        """Once the puzzle is solved, sign again with its solution what this node signed before (same content;
        the copy replaces the original in the store, without counting twice); returns how many were replaced."""
        if not self._unproven or not self.puzzle_nonce:
            return 0
        with self._lock:
            held, self._unproven = self._unproven, {}
        nonce, replaced = self.puzzle_nonce, 0
        for old_mid, message in held.items():
            if isinstance(message, Attestation):
                kind: Kind = "attestation"
                proven = message.model_copy(update={"puzzle_nonce": nonce, "nonce": os.urandom(16)}).sign(self.private_key)
            else:
                kind = "work"
                proven = Countersigned.make(message.receipt, self.peer_id, self.private_key, message.tokens, nonce)
            data = proven.encode()
            with self._lock:
                old = self._messages.pop(old_mid, None)
                if old is None:  # expired or evicted meanwhile
                    continue
                self._bytes -= len(old.data)
                if isinstance(proven, Attestation):
                    self._nonces.add(proven.nonce)
                self._store(message_id(kind, data), StoredMessage(kind, data, old.expires_at, proven))
                replaced += 1
        if replaced:
            logger.info(f"Signed {replaced} earlier statement(s) again with this identity's puzzle solution, for gossip")
        return replaced

    # ---- verdicts --------------------------------------------------------------------------------------

    def _absorb(self, att: Attestation, mid: str) -> None:
        """Take one stored attestation into account (caller holds the lock)."""
        subject, signer = att.subject, att.checker
        if att.verdict == "fail":
            if signer == self.peer_id:
                self._fault(subject, "its fault was confirmed by this node's own check")
                confirmed = self._pending.pop(subject, {})  # the accusers were right
                if confirmed:
                    self._publish(accused=frozenset(self._pending))
                return
            record = self._accusers.setdefault(signer, [0, 0])
            heard = should_referee(record[0], record[1]) and not is_blacklisted(self._blacklist, signer, self.clock())
            if not heard or is_blacklisted(self._blacklist, subject, self.clock()):
                logger.debug(f"{signer} accuses {subject}: not heard (refuted before, or moot)")
                return
            record[0] += 1  # only accusations put to the test count, so ignored ones cannot dilute the refuted
            open_ = self._pending.setdefault(subject, {})
            open_[mid] = _Accusation(signer, att.expires_at)
            while len(open_) > self.cfg.max_accusations_per_peer:
                del open_[next(iter(open_))]
            self._publish(accused=frozenset(self._pending))
            logger.info(f"{signer} accuses {subject}: checking it on every reply until this node's checks decide")
        elif att.verdict == "pass" and signer == self.peer_id:
            open_ = self._pending.get(subject, {})
            for accusation_id, accusation in list(open_.items()):
                accusation.passes += 1
                if accusation.passes >= self.cfg.refute_passes:
                    self._refute(subject, accusation_id)

    def _refute(self, subject: str, accusation_id: str) -> None:
        accusation = self._pending.get(subject, {}).pop(accusation_id, None)
        if accusation is None:
            return
        if not self._pending.get(subject):
            self._pending.pop(subject, None)
        self._accusers.setdefault(accusation.accuser, [1, 0])[1] += 1
        self._publish(accused=frozenset(self._pending))
        logger.info(f"Refuted {accusation.accuser}'s accusation against {subject}: it passed this node's checks")

    def fault_seen(self, peer: str, reason: str) -> None:
        """A fault this node saw itself but cannot prove to others (a reply without a valid receipt): the peer
        is blacklisted here, and forfeits its unvested credit here, but nothing is gossiped."""
        with self._lock:
            self._fault(peer, reason)

    def dispute_seen(self, peer: str, reason: str) -> None:
        """A step of `peer`, untrusted here, that every other execution contradicted while no trusted weight could
        settle it (a cold start): this node's routes avoid the peer for `dispute_avoid_s` and its sessions move off
        it, so its output is not used, but it is not blacklisted and nothing is gossiped (the contradicting peers
        may be one cheater's identities)."""
        with self._lock:
            until = self.clock() + self.cfg.dispute_avoid_s
            if self._disputed.get(peer, float("-inf")) <= self.clock():
                logger.warning(f"Avoiding {peer} for {self.cfg.dispute_avoid_s:.0f} s ({reason})")
            self._disputed[peer] = until

    def avoids(self, peer: str) -> bool:
        """Whether this node's routes leave `peer` out: blacklisted, or recently disputed (`dispute_seen`)."""
        return self.is_blacklisted(peer) or self._disputed.get(peer, float("-inf")) > self.clock()

    def _fault(self, peer: str, reason: str) -> None:
        """A fault this node proved itself: blacklist at once (caller holds the lock). Unvested credit is
        forfeited at the next refresh."""
        was = is_blacklisted(self._blacklist, peer, self.clock())
        self._blacklist = apply(self._blacklist, FaultConfirmed(peer, self.clock()), self.cfg.blacklist)
        self._publish(blacklist=self._blacklist)
        if not was and is_blacklisted(self._blacklist, peer, self.clock()):
            logger.warning(f"Blacklisted {peer} ({reason})")

    def pending_evidence(self, peer: str) -> list[Attestation]:
        """The open accusations against `peer` that carry evidence, for the checker to re-run (oldest first)."""
        with self._lock:
            self._prune()
            found = [self._messages.get(mid) for mid in self._pending.get(peer, {})]
            return [m.parsed for m in found if m is not None and m.parsed.evidence is not None]

    def verify_evidence(self, accusation: Attestation, agreement: Agreement, verdict: str, profile: str) -> Attestation | None:
        """Record what this node found when it re-ran `accusation`'s evidence on other peers: its own signed
        verdict on the accused (a "fail" blacklists it here, and carries the evidence on), and a "pass" refutes
        that accusation at once. "inconclusive" leaves it open. None when the evidence does not belong to the
        receipt."""
        if accusation.evidence is None or not accusation.evidence.matches(accusation.receipt):
            return None
        own = self.attest(accusation.receipt, agreement, verdict, profile, evidence=accusation.evidence)
        if verdict == "pass":
            with self._lock:
                mid = next((m for m, stored in self._messages.items() if stored.parsed is accusation
                            or (stored.kind == "attestation" and stored.parsed.nonce == accusation.nonce)), None)
                if mid is not None:
                    self._refute(accusation.subject, mid)
        return own

    # ---- trust view ----------------------------------------------------------------------------------

    def _tallies(self) -> dict[tuple[str, str], list[int]]:
        """[passes, fails] per (checker, subject) over the stored, unexpired attestations (caller holds the lock)."""
        tallies: dict[tuple[str, str], list[int]] = {}
        for m in self._messages.values():
            if m.kind == "attestation" and m.parsed.verdict != "inconclusive":
                tally = tallies.setdefault((m.parsed.checker, m.parsed.subject), [0, 0])
                tally[m.parsed.verdict == "fail"] += 1
        return tallies

    def refresh(self, force: bool = False) -> None:
        """Recompute trust, apply low-trust bans, credit, vest and forfeit rewards, and publish the snapshot.
        At most every recompute_period unless forced; runs in the background (`refresh_periodically`), and the
        lock is held only to copy the inputs and to publish, never while computing."""
        if not force and self.clock() - self._snapshot.computed_at < self.cfg.recompute_period:
            return
        with self._refreshing:
            now = self.clock()
            anchors = frozenset({self.peer_id, *self.cfg.seeds})
            with self._lock:
                self._prune()
                tallies = self._tallies()
                accusers = tuple(AccuserRecord(p, a, r) for p, (a, r) in self._accusers.items())
                peers = tuple(sorted(self.known_peers))
                work, self._work = self._work, []
            counts: dict[str, list[int]] = {}
            for (checker, subject), (passes, fails) in tallies.items():
                if checker in anchors:
                    count = counts.setdefault(subject, [0, 0])
                    count[0], count[1] = count[0] + passes, count[1] + fails
            summary = TrustSummary(
                opinions=tuple(Opinion(t, s, p, f) for (t, s), (p, f) in tallies.items()), accusers=accusers, peers=peers
            )
            trust = compute_trust(summary, anchors)
            others = [t for peer, t in trust.items() if peer not in anchors]
            mean = sum(others) / len(others) if others else 0.0
            relative = {peer: (t / mean if mean > 0 else 0.0) for peer, t in trust.items()}
            trusted_checks = {peer: p + f for peer, (p, f) in counts.items()}
            own_checks = {s: p + f for (checker, s), (p, f) in tallies.items() if checker == self.peer_id}
            with self._lock:
                for peer, checks in own_checks.items():  # low trust bans only after this node's own checks
                    if peer in anchors:
                        continue
                    was = is_blacklisted(self._blacklist, peer, now)
                    self._blacklist = apply(self._blacklist, TrustObserved(peer, relative.get(peer, 0.0), checks, now), self.cfg.blacklist)
                    if not was and is_blacklisted(self._blacklist, peer, now):
                        logger.warning(f"Blacklisted {peer} (relative trust {relative.get(peer, 0.0):.3f})")
                blacklist = self._blacklist
            banned = {p for p in blacklist.bans if is_blacklisted(blacklist, p, now)}
            ledger = self._ledger
            for peer in banned:
                ledger = forfeit(ledger, peer)
            work = [w for w in work if w.receipt.signer not in banned]
            ledger = vest(credit_receipts(ledger, work, relative, now, self.cfg.vesting_s, anchors), now)
            with self._lock:
                self._ledger = ledger
                self._publish(
                    computed_at=now, relative=relative, trusted_checks=trusted_checks,
                    counts={peer: (p, f) for peer, (p, f) in counts.items()}, blacklist=self._blacklist,
                )

    async def refresh_periodically(self, stop: asyncio.Event) -> None:
        """Refresh every recompute_period seconds, in a worker thread, until `stop` (the owner runs this)."""
        loop = asyncio.get_running_loop()

        async def once() -> None:
            await loop.run_in_executor(None, self.refresh, True)

        await run_periodically(once, self.cfg.recompute_period, stop, name="Trust refresh")

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

    # ---- the token path: snapshot reads only ---------------------------------------------------------

    def score(self, peer: str) -> float:
        """Relative trust of `peer` in this node's view (1.0 = average; newcomers start near 0)."""
        return self._snapshot.relative.get(peer, 0.0)

    def scores(self, peers: Iterable[str]) -> dict[str, float]:
        """`score` of each of `peers`, all read from one published snapshot."""
        relative = self._snapshot.relative
        return {peer: relative.get(peer, 0.0) for peer in peers}

    def is_blacklisted(self, peer: str) -> bool:
        return is_blacklisted(self._snapshot.blacklist, peer, self.clock())

    def blacklisted(self) -> frozenset[str]:
        snap, now = self._snapshot, self.clock()
        return frozenset(p for p in snap.blacklist.bans if is_blacklisted(snap.blacklist, p, now))

    def is_accused(self, peer: str) -> bool:
        return peer in self._snapshot.accused

    def check_rate(self, peer: str) -> float:
        """How likely this node spot-checks one response of `peer`: always while an accusation is open."""
        snap = self._snapshot
        if peer in snap.accused:
            return 1.0
        return check_probability(
            snap.relative.get(peer, 0.0),
            snap.trusted_checks.get(peer, 0),
            base=self.cfg.base_check_rate,
            newcomer=self.cfg.newcomer_check_rate,
            newcomer_checks=self.cfg.newcomer_checks,
            trusted_level=self.cfg.trusted_level,
        )

    # ---- reports -------------------------------------------------------------------------------------

    def accuser_record(self, peer: str) -> AccuserRecord:
        with self._lock:
            accusations, refuted = self._accusers.get(peer, [0, 0])
            return AccuserRecord(peer, accusations, refuted)

    def inflations(self, peer: str) -> int:
        """Receipts of `peer` this node caught claiming more tokens than it sent."""
        with self._lock:
            return self._inflations.get(peer, 0)

    def standings(self) -> list[PeerStanding]:
        """Every peer this node knows of: trust, verdicts, blacklist, rewards (most vested first)."""
        self.refresh(force=True)
        with self._lock:
            snap, now = self._snapshot, self.clock()
            accounts = {s.peer: s for s in standings(self._ledger)}
            inflations = dict(self._inflations)
            peers = (set(snap.relative) | set(accounts) | self.known_peers | set(inflations)) - {self.peer_id, *self.cfg.seeds}
        rows = []
        for peer in peers:
            passes, fails = snap.counts.get(peer, (0, 0))
            account = accounts.get(peer)
            rows.append(PeerStanding(
                peer, snap.relative.get(peer, 0.0), passes, fails + inflations.get(peer, 0),
                is_blacklisted(snap.blacklist, peer, now), account.vested if account else 0.0,
                account.pending if account else 0.0, peer in snap.accused,
            ))
        return sorted(rows, key=lambda r: (-r.vested, -r.pending, -r.trust, r.peer_id))

