"""ReputationNode: verified, deduplicated, bounded store; own and seeds' faults blacklist; accusations by
strangers are verified by own checks and refuted accusers lose weight; countersigned work is credited."""

from __future__ import annotations

import hashlib
import logging

import msgpack
import pytest
from hivemind.utils.crypto import RSAPrivateKey

from reputation.attest import Receipt
from reputation.node import ReputationConfig, ReputationNode, message_id, peer_id_of_key
from reputation.tolerance import Agreement

GOOD, BAD = Agreement(1.0, 0.0), Agreement(0.0, 1.0)


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def keys() -> list[RSAPrivateKey]:
    return [RSAPrivateKey() for _ in range(5)]


def receipt(server: RSAPrivateKey, session: str = "s", tokens: int = 10) -> Receipt:
    return Receipt(
        session_id=session, step=0, dht_prefix="m", block_start=0, block_end=4, tokens=tokens, dtype="float32",
        compression="none", input_digest="1" * 64, output_digest="2" * 64, signer=peer_id_of_key(server), signed_at=0.0,
    ).sign(server)


def node(key: RSAPrivateKey, clock: Clock, **cfg) -> ReputationNode:
    return ReputationNode(key, ReputationConfig(**cfg), clock=clock)


def test_messages_are_verified_deduplicated_and_expire(keys) -> None:
    clock = Clock()
    me, other = node(keys[0], clock), node(keys[1], clock)
    att = other.attest(receipt(keys[2]), GOOD, "pass", "fp32")
    data = att.encode()
    assert me.ingest("attestation", data)
    assert not me.ingest("attestation", data)  # duplicate
    assert not me.ingest("attestation", att.model_copy(update={"verdict": "fail"}).encode())  # altered
    assert not me.ingest("attestation", b"\x00garbage")
    assert not me.ingest("rumour", data)
    assert me.inventory() == [message_id("attestation", data)]
    clock.now += 25 * 3600  # past the attestation's expiry
    assert me.inventory() == []


def test_store_is_bounded(keys) -> None:
    clock = Clock()
    me, other = node(keys[0], clock, max_messages=3), node(keys[1], clock)
    for i in range(5):
        me.ingest("attestation", other.attest(receipt(keys[2], session=f"s{i}"), GOOD, "pass", "fp32").encode())
    assert len(me.inventory()) == 3


def test_own_fail_blacklists_and_forfeits_pending_credit(keys) -> None:
    clock = Clock()
    me = node(keys[0], clock)
    cheater = peer_id_of_key(keys[2])
    me.countersign(receipt(keys[2], tokens=100))
    me.refresh(force=True)
    me.attest(receipt(keys[2], session="t"), BAD, "fail", "fp32")
    assert me.is_blacklisted(cheater)
    row = next(r for r in me.standings() if r.peer_id == cheater)
    assert row.blacklisted and row.fails == 1 and row.pending == 0.0
    clock.now += 2 * 3600  # first ban: one hour
    assert not me.is_blacklisted(cheater)


def test_seed_fail_counts_but_a_strangers_is_an_accusation_to_verify(keys) -> None:
    clock = Clock()
    seed, stranger = node(keys[1], clock), node(keys[3], clock)
    me = node(keys[0], clock, seeds=(seed.peer_id,))
    target_a, target_b = peer_id_of_key(keys[2]), peer_id_of_key(keys[4])
    me.ingest("attestation", seed.attest(receipt(keys[2]), BAD, "fail", "fp32").encode())
    assert me.is_blacklisted(target_a)
    me.ingest("attestation", stranger.attest(receipt(keys[4]), BAD, "fail", "fp32").encode())
    assert not me.is_blacklisted(target_b)
    assert me.check_rate(target_b) == 1.0  # verify the accusation with own checks
    assert me.accuser_record(stranger.peer_id).accusations == 1
    me.attest(receipt(keys[4], session="mine"), GOOD, "pass", "fp32")  # own check passes: refuted
    record = me.accuser_record(stranger.peer_id)
    assert (record.accusations, record.refuted) == (1, 1)
    assert me.check_rate(target_b) < 1.0


def test_without_confirming_seeds_nobody_blacklists(keys) -> None:
    clock = Clock()
    signer = node(keys[1], clock)
    view = node(keys[0], clock, seeds=(signer.peer_id,), seeds_confirm_faults=False)
    view.ingest("attestation", signer.attest(receipt(keys[2]), BAD, "fail", "fp32").encode())
    assert not view.is_blacklisted(peer_id_of_key(keys[2]))


def test_checked_peers_gain_trust_and_newcomers_are_checked_more(keys) -> None:
    clock = Clock()
    me = node(keys[0], clock, recompute_period=0.0)
    honest, newcomer = peer_id_of_key(keys[2]), peer_id_of_key(keys[4])
    me.known_peers.update({honest, newcomer})
    for i in range(12):
        me.attest(receipt(keys[2], session=f"s{i}"), GOOD, "pass", "fp32")
    assert me.score(honest) > 1.0 and me.score(newcomer) == pytest.approx(0.0)
    assert me.check_rate(newcomer) == me.cfg.newcomer_check_rate
    assert me.check_rate(honest) == me.cfg.base_check_rate


def test_countersigned_work_is_credited_by_trust_and_vests(keys) -> None:
    clock = Clock()
    me = node(keys[0], clock, recompute_period=0.0, vesting_s=60.0)
    server = peer_id_of_key(keys[2])
    for i in range(12):
        me.attest(receipt(keys[2], session=f"c{i}"), GOOD, "pass", "fp32")
    assert me.countersign(receipt(keys[2], tokens=50)) is not None
    assert me.countersign(receipt(keys[0])) is None  # a node does not pay itself
    row = next(r for r in me.standings() if r.peer_id == server)
    assert row.pending == pytest.approx(50 * 4)  # trust above average: full weight
    clock.now += 61
    row = next(r for r in me.standings() if r.peer_id == server)
    assert (row.vested, row.pending) == (pytest.approx(200.0), 0.0)


# --- malformed messages never reach the store (nor refresh, nor is_blacklisted) ---


def _pack(pairs: list) -> bytes:
    return msgpack.packb(pairs, use_bin_type=True)


def _signed(fields: dict, key: RSAPrivateKey) -> bytes:
    """A receipt or attestation carrying `fields`, with a genuine signature and digest by `key`."""
    fields = {**fields, "public_key": key.get_public_key().to_bytes()}
    body = _pack([["version", 1], *sorted([k, v] for k, v in fields.items() if k not in ("digest", "signature"))])
    fields.update(digest=hashlib.sha256(body).hexdigest(), signature=key.sign(body))
    return _pack([["version", 1], *sorted([k, v] for k, v in fields.items())])


def _countersigned(receipt_bytes: bytes, client: RSAPrivateKey) -> bytes:
    digest = dict(msgpack.unpackb(receipt_bytes, raw=False))["digest"]
    return _pack([
        ["version", 1], ["client", peer_id_of_key(client)], ["public_key", client.get_public_key().to_bytes()],
        ["receipt", receipt_bytes], ["signature", client.sign(digest.encode())],
    ])


def test_work_with_a_wrong_typed_field_is_dropped_and_the_blacklist_keeps_working(keys, caplog) -> None:
    """A countersigned receipt with tokens="x": server and client signatures are genuine, only the type is wrong.
    It used to pass verification and then raise inside refresh, so inside every client's is_blacklisted()."""
    clock = Clock()
    me = node(keys[0], clock)
    server, client = keys[2], keys[1]
    fields = receipt(server)._fields()
    good = _countersigned(_signed(fields, server), client)
    bad = _countersigned(_signed({**fields, "tokens": "x"}, server), client)
    with caplog.at_level(logging.DEBUG, logger="reputation.node"):
        assert not me.ingest("work", bad)
    assert "tokens" in caplog.text
    assert me.inventory() == []
    assert not me.is_blacklisted(peer_id_of_key(server))  # refresh runs, and does not raise
    assert me.ingest("work", good)  # the same work with the right type is taken
    clock.now += 3600
    me.refresh(force=True)
    assert len(me.inventory()) == 1 and not me.is_blacklisted(peer_id_of_key(server))


def test_an_attestation_with_a_wrong_typed_or_oversized_field_is_dropped(keys) -> None:
    clock = Clock()
    me, other = node(keys[0], clock), node(keys[1], clock)
    att = other.attest(receipt(keys[2]), GOOD, "pass", "fp32")
    fields = att._fields()
    assert me.ingest("attestation", _signed(dict(fields), keys[1]))  # signed by hand, well-formed: accepted
    for change in ({"cosine": "1.0"}, {"expires_at": 10**12}, {"verdict": "PASS"}, {"profile": "p" * 1000}, {"nonce": b"n" * 100}):
        data = _signed({**fields, **change, "nonce": change.get("nonce", bytes(16))}, keys[1])
        assert not me.ingest("attestation", data), change
    assert len(me.inventory()) == 1
    assert not me.is_blacklisted(peer_id_of_key(keys[2]))
    assert me.score(peer_id_of_key(keys[2])) >= 0.0


def test_messages_of_unknown_kinds_or_types_are_dropped(keys) -> None:
    me = node(keys[0], Clock())
    assert not me.ingest("rumour", b"")
    assert not me.ingest("work", "not bytes")  # type: ignore[arg-type]
    assert not me.ingest("work", b"\x00" * 100_000)
    assert me.inventory() == []
