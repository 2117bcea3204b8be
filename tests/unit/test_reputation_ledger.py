"""Ledger: credit for countersigned work, capped at what the client sent and weighted by the client's trust and
the server's; vesting, forfeiture, sorted standings."""

from __future__ import annotations

import pytest
from hivemind.utils.crypto import RSAPrivateKey

from reputation.attest import Countersigned, Receipt
from reputation.ledger import (
    Ledger,
    countersigner_weight,
    credit,
    credit_receipts,
    forfeit,
    standings,
    trust_weight,
    vest,
    work_units,
)
from swarm.records import peer_id_of_public_key


def _peer(key: RSAPrivateKey) -> str:
    return peer_id_of_public_key(key.get_public_key().to_bytes()).to_base58()


@pytest.fixture(scope="module")
def keys() -> tuple[RSAPrivateKey, RSAPrivateKey]:
    return RSAPrivateKey(), RSAPrivateKey()


def _receipt(server: RSAPrivateKey, step: int, tokens: int = 8, blocks: int = 4, session: str = "s") -> Receipt:
    return Receipt(
        session_id=session, step=step, dht_prefix="m", block_start=2, block_end=2 + blocks, tokens=tokens, dtype="bfloat16",
        compression="none", input_digest="1" * 64, output_digest="2" * 64, signer=_peer(server), signed_at=0.0,
    ).sign(server)


def test_work_units_and_trust_weight(keys) -> None:
    assert work_units(_receipt(keys[0], 0, tokens=8, blocks=4)) == 32.0
    assert work_units(_receipt(keys[0], 0, tokens=8, blocks=4), tokens=3) == 12.0  # capped at what was sent
    assert work_units(_receipt(keys[0], 0, tokens=8, blocks=4), tokens=30) == 32.0
    assert trust_weight(2.0) == 1.0 and trust_weight(0.25) == 0.25 and trust_weight(-1.0) == 0.0
    assert countersigner_weight("me", {}, {"me"}) == 1.0 and countersigner_weight("c", {"c": 0.3}, {"me"}) == 0.3
    assert countersigner_weight("sybil", {}, {"me"}) == 0.0


def test_countersigned_receipts_are_credited_once_by_trust(keys) -> None:
    server, client = keys
    sid, cid = _peer(server), _peer(client)
    # one session, tokens cumulative: 8, 16, 24 -> 24 tokens x 4 blocks of work in all
    good = [Countersigned.make(_receipt(server, step, tokens=8 * (step + 1)), cid, client, 8 * (step + 1)) for step in range(3)]
    forged = Countersigned.make(_receipt(server, 9), cid, client, 8).model_copy(update={"signature": b"AAAA"})
    self_signed = Countersigned.make(_receipt(server, 10), sid, server, 8)  # a server cannot vouch for itself
    ledger = credit_receipts(Ledger(), [*good, good[0], forged, self_signed], {sid: 0.5}, now=0.0, vesting_s=10.0,
                             anchors={cid})
    assert standings(ledger)[0].pending == pytest.approx(24 * 4 * 0.5)
    again = credit_receipts(ledger, good, {sid: 0.5}, now=1.0, vesting_s=10.0, anchors={cid})
    assert standings(again) == standings(ledger)  # replayed receipts earn nothing
    decoded = Countersigned.decode(good[1].encode())
    assert decoded == good[1] and decoded.verify().value == "ok"


def test_credit_is_capped_at_what_the_client_sent_and_weighted_by_the_client(keys) -> None:
    server, client = keys
    sid, cid = _peer(server), _peer(client)
    inflated = Countersigned.make(_receipt(server, 0, tokens=10**6), cid, client, tokens=10)
    ledger = credit_receipts(Ledger(), [inflated], {sid: 1.0}, now=0.0, vesting_s=10.0, anchors={cid})
    assert standings(ledger)[0].pending == pytest.approx(10 * 4)  # the claim is capped at the client's count
    # the same work countersigned by a client nobody trusts earns nothing; by a half-trusted one, half (within
    # its allowance: "me", the anchor, used 40 units itself)
    assert credit_receipts(Ledger(), [inflated], {sid: 1.0}, now=0.0, vesting_s=10.0).accounts == {}
    mine = Ledger(used={"me": 40.0})
    half = credit_receipts(mine, [inflated], {sid: 1.0, cid: 0.5}, now=0.0, vesting_s=10.0, anchors={"me"})
    assert standings(half)[0].pending == pytest.approx(10 * 4 * 0.5)
    # ... and a better-weighted countersignature of the same hop later pays only the difference
    better = Countersigned.make(_receipt(server, 1, tokens=10**6), cid, client, tokens=10)
    both = credit_receipts(half, [better], {sid: 1.0}, now=1.0, vesting_s=10.0, anchors={cid})
    assert sum(a for a, _ in both.accounts[sid].pending) == pytest.approx(10 * 4)


def test_a_trusted_client_vouches_for_no_more_than_the_busiest_anchor_used(keys) -> None:
    server, client = keys
    sid, cid = _peer(server), _peer(client)
    other = RSAPrivateKey()
    oid = _peer(other)
    colluding = [Countersigned.make(_receipt(server, 0, tokens=10**6, session=f"fake{i}"), oid, other, tokens=10**6)
                 for i in range(3)]
    own = Countersigned.make(_receipt(server, 9, tokens=25), cid, client, tokens=25)  # the anchor used 25 x 4 units
    ledger = credit_receipts(Ledger(), [*colluding, own], {sid: 1.0, oid: 1.0}, now=0.0, vesting_s=10.0, anchors={cid})
    assert standings(ledger)[0].pending == pytest.approx(100 + 100)  # its own 100, and an allowance of 100 for "other"
    assert ledger.used == {cid: 100.0, oid: 100.0}
    later = [Countersigned.make(_receipt(server, 0, tokens=10**6, session=f"late{i}"), oid, other, tokens=10**6)
             for i in range(2)]
    assert credit_receipts(ledger, later, {sid: 1.0, oid: 1.0}, now=1.0, vesting_s=10.0, anchors={cid}).accounts == ledger.accounts


def test_vesting_and_forfeiture() -> None:
    ledger = credit(Ledger(), {"a": 10.0, "b": 5.0}, now=0.0, vesting_s=10.0)
    ledger = credit(ledger, {"a": 1.0, "b": 2.0}, now=5.0, vesting_s=10.0)
    ledger = vest(ledger, now=10.0)
    assert {s.peer: (s.vested, s.pending) for s in standings(ledger)} == {"a": (10.0, 1.0), "b": (5.0, 2.0)}
    banned = forfeit(ledger, "b")
    assert banned.forfeited == 2.0 and banned.accounts["b"].vested == 5.0 and ledger.accounts["b"].pending
    assert vest(banned, now=100.0).accounts["b"].vested == 5.0
    assert forfeit(banned, "nobody") is banned


def test_standings_sorted_deterministically() -> None:
    ledger = credit(Ledger(), {"c": 1.0}, 0.0, 0.0)
    ledger = vest(credit(ledger, {"b": 3.0, "a": 3.0, "d": 0.0}, 0.0, 0.0), 0.0)
    assert [s.peer for s in standings(ledger)] == ["a", "b", "c"]
