"""ReputationNode: verified, deduplicated, bounded store; only own faults blacklist, anyone else's (a seed's
too) is an accusation verified by own checks or its evidence, and refuted accusers lose weight; signers without
an identity puzzle are ignored; the token path reads a snapshot refreshed in the background; countersigned work
is credited at most for what the client sent, weighted by the countersigner's trust, and inflation is a fault."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future

import msgpack
import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey

from reputation import identity_puzzle
from reputation.attest import WIRE_VERSION, Evidence, Receipt, tensor_digest
from reputation.node import ReputationConfig, ReputationNode, message_id, peer_id_of_key
from reputation.tolerance import Agreement
from signing_kit import sign_fields

GOOD, BAD = Agreement(1.0, 0.0), Agreement(0.0, 1.0)


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def keys() -> list[RSAPrivateKey]:
    return [RSAPrivateKey() for _ in range(5)]


def receipt(server: RSAPrivateKey, session: str = "s", tokens: int = 10, inputs: torch.Tensor | None = None,
            output: torch.Tensor | None = None) -> Receipt:
    return Receipt(
        session_id=session, step=0, dht_prefix="m", block_start=0, block_end=4, tokens=tokens, dtype="float32",
        compression="none", input_digest="1" * 64 if inputs is None else tensor_digest(inputs),
        output_digest="2" * 64 if output is None else tensor_digest(output), signer=peer_id_of_key(server),
        signed_at=0.0,
    ).sign(server)


def node(key: RSAPrivateKey, clock: Clock, **cfg) -> ReputationNode:
    return ReputationNode(key, ReputationConfig(**cfg), clock=clock)  # unit tests solve 8-bit puzzles (conftest)


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


def test_own_fail_blacklists_at_once_and_forfeits_pending_credit(keys) -> None:
    clock = Clock()
    me = node(keys[0], clock)
    cheater = peer_id_of_key(keys[2])
    me.countersign(receipt(keys[2], tokens=100), tokens=100)
    me.refresh(force=True)
    me.attest(receipt(keys[2], session="t"), BAD, "fail", "fp32")
    assert me.is_blacklisted(cheater)  # no refresh needed: own verdicts take effect at once
    row = next(r for r in me.standings() if r.peer_id == cheater)
    assert row.blacklisted and row.fails == 1 and row.pending == 0.0
    clock.now += 2 * 3600  # first ban: one hour
    assert not me.is_blacklisted(cheater)


def test_nobodys_fail_convicts_not_even_a_seeds_it_is_an_accusation_to_verify(keys) -> None:
    clock = Clock()
    seed, stranger = node(keys[1], clock), node(keys[3], clock)
    me = node(keys[0], clock, seeds=(seed.peer_id,))
    target_a, target_b = peer_id_of_key(keys[2]), peer_id_of_key(keys[4])
    me.ingest("attestation", seed.attest(receipt(keys[2]), BAD, "fail", "fp32").encode())
    me.ingest("attestation", stranger.attest(receipt(keys[4]), BAD, "fail", "fp32").encode())
    me.refresh(force=True)
    for target in (target_a, target_b):
        assert not me.is_blacklisted(target) and me.is_accused(target)
        assert me.check_rate(target) == 1.0  # checked on every reply until this node's own checks decide
    assert me.accuser_record(seed.peer_id).accusations == 1
    # own checks confirm the seed's accusation: blacklisted, and the accusation is closed
    me.attest(receipt(keys[2], session="mine"), BAD, "fail", "fp32")
    assert me.is_blacklisted(target_a) and not me.is_accused(target_a)
    # ... and refute the stranger's, after refute_passes passes
    for i in range(me.cfg.refute_passes):
        assert me.check_rate(target_b) == 1.0
        me.attest(receipt(keys[4], session=f"mine{i}"), GOOD, "pass", "fp32")
    record = me.accuser_record(stranger.peer_id)
    assert (record.accusations, record.refuted) == (1, 1)
    assert not me.is_accused(target_b) and me.check_rate(target_b) < 1.0
    assert not me.is_blacklisted(target_b)


def test_many_fails_by_a_seed_do_not_ban_for_low_trust_without_own_checks(keys) -> None:
    clock = Clock()
    seed = node(keys[1], clock)
    me = node(keys[0], clock, seeds=(seed.peer_id,))
    target = peer_id_of_key(keys[2])
    me.learn_peers({target, peer_id_of_key(keys[4])})
    for i in range(25):
        me.ingest("attestation", seed.attest(receipt(keys[2], session=f"f{i}"), BAD, "fail", "fp32").encode())
    me.refresh(force=True)
    assert me.score(target) < me.cfg.blacklist.trust_threshold and not me.is_blacklisted(target)
    for i in range(me.cfg.blacklist.min_checks):  # this node's own checks pass it: its trust recovers
        me.attest(receipt(keys[2], session=f"o{i}"), GOOD, "pass", "fp32")
    me.refresh(force=True)
    assert me.score(target) > me.cfg.blacklist.trust_threshold and not me.is_blacklisted(target)


def test_messages_signed_before_the_puzzle_is_solved_count_only_at_home(keys) -> None:
    clock = Clock()
    pending: Future = Future()
    me = ReputationNode(keys[1], ReputationConfig(), clock=clock, puzzle_nonce=pending)
    other = node(keys[0], clock)
    early = me.attest(receipt(keys[2]), BAD, "fail", "fp32")  # does not wait for the solve
    assert early.puzzle_nonce == b"" and me.is_blacklisted(peer_id_of_key(keys[2]))
    assert not other.ingest("attestation", early.encode())
    pending.set_result(identity_puzzle.solve_cached(keys[1].get_public_key().to_bytes(), me.cfg.puzzle_bits))
    assert other.ingest("attestation", me.attest(receipt(keys[4]), BAD, "fail", "fp32").encode())


def test_an_accuser_mostly_refuted_is_no_longer_heard(keys) -> None:
    clock = Clock()
    liar = node(keys[3], clock)
    me = node(keys[0], clock, refute_passes=1)
    honest = peer_id_of_key(keys[2])
    for i in range(3):  # its first accusations are heard, and refuted
        me.ingest("attestation", liar.attest(receipt(keys[2], session=f"l{i}"), BAD, "fail", "fp32").encode())
        assert me.check_rate(honest) == 1.0
        me.attest(receipt(keys[2], session=f"m{i}"), GOOD, "pass", "fp32")
    me.ingest("attestation", liar.attest(receipt(keys[2], session="l9"), BAD, "fail", "fp32").encode())
    assert not me.is_accused(honest) and me.accuser_record(liar.peer_id).accusations == 3  # the 4th was not heard


def test_accusations_carry_evidence_the_checker_can_verify(keys) -> None:
    clock = Clock()
    accuser, me = node(keys[1], clock), node(keys[0], clock)
    history = (torch.randn(1, 3, 8), torch.randn(1, 1, 8))
    inputs, output = history[-1], history[-1] * 2
    step = receipt(keys[2], inputs=inputs, output=output)
    evidence = Evidence.of_step(history, inputs, output)
    att = accuser.attest(step, BAD, "fail", "fp32", evidence=evidence)
    assert att.evidence == evidence
    assert accuser.attest(step, GOOD, "pass", "fp32", evidence=evidence).evidence is None  # only a fail carries it
    assert me.ingest("attestation", att.encode())
    subject = peer_id_of_key(keys[2])
    (pending,) = me.pending_evidence(subject)
    prefix, again_inputs, claimed = pending.evidence.tensors()
    assert prefix.shape == (1, 3, 8) and torch.equal(again_inputs, inputs) and torch.equal(claimed, output)
    # the checker re-ran it on other peers and the subject's output was right: refuted at once
    assert me.verify_evidence(pending, GOOD, "pass", "fp32") is not None
    assert not me.is_accused(subject) and me.accuser_record(accuser.peer_id).refuted == 1
    # a second accusation whose evidence re-runs wrong: this node's own fail, which carries the evidence on
    me.ingest("attestation", accuser.attest(step, BAD, "fail", "fp32", evidence=evidence).encode())
    own = me.verify_evidence(me.pending_evidence(subject)[0], BAD, "fail", "fp32")
    assert own.checker == me.peer_id and own.evidence == evidence
    assert me.is_blacklisted(subject) and me.pending_evidence(subject) == []


def test_signers_without_a_valid_identity_puzzle_are_ignored(keys) -> None:
    clock = Clock()
    me = node(keys[0], clock, puzzle_bits=12)
    cheap = ReputationNode(keys[1], ReputationConfig(puzzle_bits=12), clock=clock, puzzle_nonce=b"\x00" * 8)
    assert not identity_puzzle.verify(keys[1].get_public_key().to_bytes(), b"\x00" * 8, 12)
    assert not me.ingest("work", cheap.countersign(receipt(keys[2]), tokens=10).encode())
    assert not me.ingest("attestation", cheap.attest(receipt(keys[2]), BAD, "fail", "fp32").encode())
    assert me.inventory() == [] and not me.is_accused(peer_id_of_key(keys[2]))
    solved = node(keys[1], clock, puzzle_bits=12)  # the same key, with its puzzle solved
    assert me.ingest("work", solved.countersign(receipt(keys[2], session="w"), tokens=10).encode())
    assert me.ingest("attestation", solved.attest(receipt(keys[2]), BAD, "fail", "fp32").encode())


def test_checked_peers_gain_trust_and_newcomers_are_checked_more(keys) -> None:
    clock = Clock()
    me = node(keys[0], clock)
    honest, newcomer = peer_id_of_key(keys[2]), peer_id_of_key(keys[4])
    me.learn_peers({honest, newcomer})
    for i in range(12):
        me.attest(receipt(keys[2], session=f"s{i}"), GOOD, "pass", "fp32")
    assert me.score(honest) == 0.0  # the token path reads the last snapshot: nothing yet
    me.refresh(force=True)
    assert me.score(honest) > 1.0 and me.score(newcomer) == pytest.approx(0.0)
    assert me.check_rate(newcomer) == me.cfg.newcomer_check_rate
    assert me.check_rate(honest) == me.cfg.base_check_rate


def test_the_token_path_reads_a_snapshot_without_the_lock(keys) -> None:
    clock = Clock()
    me = node(keys[0], clock)
    me.attest(receipt(keys[2]), BAD, "fail", "fp32")
    cheater = peer_id_of_key(keys[2])
    held, release = threading.Event(), threading.Event()

    def hold_the_lock() -> None:
        with me._lock:
            held.set()
            release.wait(10)

    thread = threading.Thread(target=hold_the_lock)
    thread.start()
    held.wait(10)
    try:
        began = time.perf_counter()
        assert me.is_blacklisted(cheater) and me.check_rate(cheater) > 0 and me.score(cheater) == 0.0
        assert time.perf_counter() - began < 1.0
    finally:
        release.set()
        thread.join()


def test_trust_is_refreshed_in_the_background(keys) -> None:
    clock = Clock()
    me = node(keys[0], clock, recompute_period=0.01)
    honest = peer_id_of_key(keys[2])
    me.learn_peers({honest, peer_id_of_key(keys[4])})
    for i in range(12):
        me.attest(receipt(keys[2], session=f"s{i}"), GOOD, "pass", "fp32")

    async def run() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(me.refresh_periodically(stop))
        for _ in range(200):
            if me.score(honest) > 1.0:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await task

    asyncio.run(run())
    assert me.score(honest) > 1.0 and me.snapshot.computed_at == clock.now


# --- credit that cannot be minted ---


def _trusted(me: ReputationNode, key: RSAPrivateKey, checks: int = 12) -> None:
    for i in range(checks):
        me.attest(receipt(key, session=f"c{i}"), GOOD, "pass", "fp32")


def test_countersigned_work_is_credited_by_trust_capped_at_what_was_sent_and_vests(keys) -> None:
    clock = Clock()
    me = node(keys[0], clock, vesting_s=60.0)
    server = peer_id_of_key(keys[2])
    _trusted(me, keys[2])
    assert me.countersign(receipt(keys[2], tokens=50), tokens=50) is not None
    assert me.countersign(receipt(keys[0]), tokens=10) is None  # a node does not pay itself
    row = next(r for r in me.standings() if r.peer_id == server)
    assert row.pending == pytest.approx(50 * 4)  # trust above average: full weight
    clock.now += 61
    row = next(r for r in me.standings() if r.peer_id == server)
    assert (row.vested, row.pending) == (pytest.approx(200.0), 0.0)


def test_a_receipt_claiming_more_than_was_sent_is_an_inflation_fault(keys) -> None:
    clock = Clock()
    me = node(keys[0], clock)
    inflater = peer_id_of_key(keys[2])
    _trusted(me, keys[2])
    assert me.countersign(receipt(keys[2], tokens=1000), tokens=10) is None
    assert me.is_blacklisted(inflater) and me.inflations(inflater) == 1
    row = next(r for r in me.standings() if r.peer_id == inflater)
    assert row.fails == 1 and row.pending == 0.0 and row.vested == 0.0
    # a receipt claiming no more than was sent is paid what was sent
    other = peer_id_of_key(keys[4])
    _trusted(me, keys[4])
    assert me.countersign(receipt(keys[4], tokens=20), tokens=20) is not None
    assert not me.is_blacklisted(other)
    row = next(r for r in me.standings() if r.peer_id == other)
    assert row.pending == pytest.approx(20 * 4)


def test_unverifiable_work_earns_nothing(keys) -> None:
    clock = Clock()
    me = node(keys[0], clock)
    server = peer_id_of_key(keys[2])
    _trusted(me, keys[2])
    assert me.countersign(receipt(keys[2], tokens=50), tokens=50, verified=False) is None
    assert all(r.pending == 0.0 for r in me.standings() if r.peer_id == server)
    assert me.countersign(receipt(keys[2], tokens=500), tokens=50, verified=False) is None  # inflation still counts
    assert me.is_blacklisted(server)


def test_a_countersignature_weighs_by_its_signers_trust_so_sybils_mint_nothing(keys) -> None:
    clock = Clock()
    seed, sybil, trusted_client = node(keys[1], clock), node(keys[3], clock), node(keys[4], clock)
    me = node(keys[0], clock, seeds=(seed.peer_id,))
    server = peer_id_of_key(keys[2])
    _trusted(me, keys[2])
    for i in range(12):  # this node's checks also established the third client (it serves blocks too)
        me.attest(receipt(keys[4], session=f"t{i}"), GOOD, "pass", "fp32")
    me.refresh(force=True)
    # the Sybil client countersigns a huge claim: it has no trust here, so it mints nothing
    assert me.ingest("work", sybil.countersign(receipt(keys[2], session="sy", tokens=10**9), tokens=10**9).encode())
    me.refresh(force=True)
    assert all(r.pending == 0.0 for r in me.standings() if r.peer_id == server)
    # a seed's countersignature weighs 1; another client's weighs by its relative trust (capped at 1)
    me.ingest("work", seed.countersign(receipt(keys[2], session="a", tokens=10), tokens=10).encode())
    me.ingest("work", trusted_client.countersign(receipt(keys[2], session="b", tokens=5), tokens=5).encode())
    row = next(r for r in me.standings() if r.peer_id == server)
    weight = min(me.score(trusted_client.peer_id), 1.0)
    assert weight > 0.5 and row.pending == pytest.approx(10 * 4 + 5 * 4 * weight)
    # the same receipt countersigned again earns nothing more
    me.ingest("work", seed.countersign(receipt(keys[2], session="a", tokens=10), tokens=10).encode())
    assert next(r for r in me.standings() if r.peer_id == server).pending == pytest.approx(row.pending)


def test_the_store_is_bounded_in_bytes(keys) -> None:
    clock = Clock()
    accuser = node(keys[1], clock)
    hidden = 4096
    history = (torch.randn(1, 16, hidden), torch.randn(1, 1, hidden))
    inputs, output = history[-1], history[-1] + 1
    att = accuser.attest(receipt(keys[2], inputs=inputs, output=output), BAD, "fail", "fp32",
                         evidence=Evidence.of_step(history, inputs, output))
    size = len(att.encode())
    assert size > 100_000
    me = node(keys[0], clock, max_bytes=3 * size + 1000)
    for i in range(5):
        step = receipt(keys[2], session=f"b{i}", inputs=inputs, output=output)
        me.ingest("attestation", accuser.attest(step, BAD, "fail", "fp32", evidence=Evidence.of_step(history, inputs, output)).encode())
    assert len(me.inventory()) == 3
    assert len(me.messages(max_bytes=2 * size + 500)) == 2 and len(me.messages(max_bytes=1)) == 1  # one always travels


# --- malformed messages never reach the store (nor refresh, nor is_blacklisted) ---


def _pack(pairs: list) -> bytes:
    return msgpack.packb(pairs, use_bin_type=True)


def _countersigned(receipt_bytes: bytes, client: RSAPrivateKey) -> bytes:
    digest = dict(msgpack.unpackb(receipt_bytes, raw=False))["digest"]
    key, nonce = client.get_public_key().to_bytes(), identity_puzzle.solve_cached(client.get_public_key().to_bytes(), ReputationConfig().puzzle_bits)
    body = {"receipt": digest, "client": peer_id_of_key(client), "tokens": 10, "puzzle_nonce": nonce, "public_key": key}
    signature = client.sign(_pack([["version", WIRE_VERSION], *sorted([k, v] for k, v in body.items())]))
    return _pack([
        ["version", WIRE_VERSION], ["client", peer_id_of_key(client)], ["public_key", key], ["puzzle_nonce", nonce],
        ["receipt", receipt_bytes], ["signature", signature], ["tokens", 10],
    ])


def test_work_with_a_wrong_typed_field_is_dropped_and_the_blacklist_keeps_working(keys, caplog) -> None:
    """A countersigned receipt with tokens="x": server and client signatures are genuine, only the type is wrong.
    It used to pass verification and then raise inside refresh, so inside every client's is_blacklisted()."""
    clock = Clock()
    me = node(keys[0], clock)
    server, client = keys[2], keys[1]
    fields = receipt(server)._fields()
    good = _countersigned(sign_fields(fields, server), client)
    bad = _countersigned(sign_fields({**fields, "tokens": "x"}, server), client)
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
    assert me.ingest("attestation", sign_fields(dict(fields), keys[1]))  # signed by hand, well-formed: accepted
    for change in ({"cosine": "1.0"}, {"expires_at": 10**12}, {"verdict": "PASS"}, {"profile": "p" * 1000}, {"nonce": b"n" * 100}):
        data = sign_fields({**fields, **change, "nonce": change.get("nonce", bytes(16))}, keys[1])
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


def test_what_was_signed_before_the_puzzle_was_solved_is_signed_again_for_gossip(keys) -> None:
    clock = Clock()
    pending: Future = Future()
    me = ReputationNode(keys[1], ReputationConfig(), clock=clock, puzzle_nonce=pending)
    subject = peer_id_of_key(keys[2])
    me.attest(receipt(keys[2]), BAD, "fail", "fp32")  # a verdict in the client's first second
    me.countersign(receipt(keys[3], tokens=5), tokens=5)
    assert me.is_blacklisted(subject)
    assert me.inventory() == [] and me.messages() == []  # nothing others would drop goes out
    me.refresh(force=True)
    tallies_before = me._tallies()
    pending.set_result(identity_puzzle.solve_cached(keys[1].get_public_key().to_bytes(), me.cfg.puzzle_bits))
    other = node(keys[0], clock)
    assert sorted(kind for kind, _ in me.messages()) == ["attestation", "work"]
    assert all(other.ingest(kind, data) for kind, data in me.messages())
    other.refresh(force=True)
    assert other.is_accused(subject)  # the early verdict reached the other node
    assert me._tallies() == tallies_before and len(me.inventory()) == 2  # replaced, not counted twice
    assert me.prove_unproven() == 0


def test_a_disputed_peer_is_avoided_here_for_a_while_and_nothing_spreads(keys) -> None:
    clock = Clock()
    me = node(keys[0], clock, dispute_avoid_s=600.0)
    peer = peer_id_of_key(keys[1])
    me.dispute_seen(peer, "contradicted by 3 other executions")
    assert me.avoids(peer) and not me.is_blacklisted(peer)
    assert me.messages() == []  # a dispute this node could not settle is not a verdict: nothing to gossip
    clock.now += 601
    assert not me.avoids(peer)
