"""Receipts and attestations: real RSA keys; forged, altered, impersonated, expired and replayed are rejected."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey

from reputation.attest import Attestation, Check, Countersigned, Receipt, require_valid, tensor_digest, verify_attestation
from reputation.errors import AlteredError, ExpiredError, ForgedError, MalformedMessageError, ReplayedError
from swarm.records import peer_id_of_public_key

NOW = 1_700_000_000.0


def _peer(key: RSAPrivateKey) -> str:
    return peer_id_of_public_key(key.get_public_key().to_bytes()).to_base58()


@pytest.fixture(scope="module")
def keys() -> dict[str, RSAPrivateKey]:
    return {name: RSAPrivateKey() for name in ("server", "checker", "other")}


@pytest.fixture(scope="module")
def receipt(keys) -> Receipt:
    x = torch.randn(1, 4, 8)
    return Receipt(
        session_id="s1", step=3, dht_prefix="llama-test", block_start=0, block_end=4, tokens=4, dtype="bfloat16",
        compression="none", input_digest=tensor_digest(x), output_digest=tensor_digest(x + 1),
        signer=_peer(keys["server"]), signed_at=NOW,
    ).sign(keys["server"])


@pytest.fixture(scope="module")
def attestation(keys, receipt) -> Attestation:
    return Attestation(
        checker=_peer(keys["checker"]), subject=receipt.signer, receipt=receipt, cosine=0.9995, rel_l2=0.02,
        verdict="pass", profile="bf16", issued_at=NOW, expires_at=NOW + 3600, nonce=b"n" * 16,
    ).sign(keys["checker"])


def test_tensor_digest_covers_values_dtype_and_shape() -> None:
    t = torch.arange(6, dtype=torch.float32)
    assert tensor_digest(t) == tensor_digest(t.clone())
    assert tensor_digest(t) != tensor_digest(t + 1e-6 * (t == 5))
    assert tensor_digest(t) != tensor_digest(t.reshape(2, 3))
    assert tensor_digest(t) != tensor_digest(t.to(torch.bfloat16))
    assert tensor_digest(t) != tensor_digest(t.view(torch.int32))  # same bytes and shape, other dtype
    assert len(tensor_digest(torch.zeros(0))) == 64


def test_receipt_signs_verifies_and_round_trips(receipt) -> None:
    assert receipt.verify() is Check.OK
    decoded = Receipt.decode(receipt.encode())
    assert decoded == receipt and decoded.verify() is Check.OK
    assert dataclasses.replace(receipt, tokens=400).verify() is Check.ALTERED


def test_valid_attestation_is_accepted_and_round_trips(attestation) -> None:
    assert verify_attestation(attestation, NOW + 10, frozenset()) is Check.OK
    decoded = Attestation.decode(attestation.encode())
    assert decoded == attestation
    assert verify_attestation(decoded, NOW + 10, frozenset()) is Check.OK


@pytest.mark.parametrize(
    "change", [{"verdict": "fail"}, {"cosine": 0.5}, {"expires_at": NOW + 10**9}, {"nonce": b"x" * 16}, {"profile": "int4"}]
)
def test_altered_attestation_is_rejected(attestation, change) -> None:
    altered = dataclasses.replace(attestation, **change)
    assert verify_attestation(altered, NOW + 10, frozenset()) is Check.ALTERED
    with pytest.raises(AlteredError):
        require_valid(altered, NOW + 10, frozenset())


def test_altered_evidence_is_rejected(attestation) -> None:
    receipt = dataclasses.replace(attestation.receipt, output_digest="0" * 64)
    assert verify_attestation(dataclasses.replace(attestation, receipt=receipt), NOW, frozenset()) is Check.ALTERED


def test_forged_signature_is_rejected(keys, attestation) -> None:
    body_signed_by_other = Attestation.sign(attestation, keys["other"]).signature  # a valid signature, wrong key
    for signature in (body_signed_by_other, b"AAAA", b""):
        forged = dataclasses.replace(attestation, signature=signature)
        assert verify_attestation(forged, NOW, frozenset()) is Check.FORGED
        with pytest.raises(ForgedError):
            require_valid(forged, NOW, frozenset())


def test_impersonation_is_rejected(keys, receipt) -> None:
    # signed correctly, but by "other" while claiming to be the checker
    att = Attestation(
        checker=_peer(keys["checker"]), subject=receipt.signer, receipt=receipt, cosine=0.1, rel_l2=1.0,
        verdict="fail", profile="bf16", issued_at=NOW, expires_at=NOW + 60, nonce=b"i" * 16,
    ).sign(keys["other"])
    assert verify_attestation(att, NOW, frozenset()) is Check.IMPERSONATED


def test_evidence_must_be_the_subjects_receipt(keys, attestation) -> None:
    wrong_subject = dataclasses.replace(attestation, subject=_peer(keys["other"])).sign(keys["checker"])
    assert verify_attestation(wrong_subject, NOW, frozenset()) is Check.BAD_EVIDENCE


def test_expired_and_not_yet_valid_are_rejected(attestation) -> None:
    assert verify_attestation(attestation, NOW + 3601, frozenset()) is Check.EXPIRED
    assert verify_attestation(attestation, NOW - 1, frozenset()) is Check.EXPIRED
    with pytest.raises(ExpiredError):
        require_valid(attestation, NOW + 3601, frozenset())


def test_replay_is_rejected(attestation) -> None:
    seen = frozenset({attestation.nonce})
    assert verify_attestation(attestation, NOW, seen) is Check.REPLAYED
    with pytest.raises(ReplayedError):
        require_valid(attestation, NOW, seen)


def test_unknown_version_or_fields_are_malformed(attestation) -> None:
    import msgpack

    pairs = msgpack.unpackb(attestation.encode(), raw=False)
    with pytest.raises(MalformedMessageError):
        Attestation.decode(msgpack.packb([["version", 99] if p[0] == "version" else p for p in pairs], use_bin_type=True))
    with pytest.raises(MalformedMessageError):
        Attestation.decode(msgpack.packb([*pairs, ["extra", 1]], use_bin_type=True))
    with pytest.raises(MalformedMessageError):
        Attestation.decode(b"\xc1 not msgpack")


def test_bad_verdict_is_refused() -> None:
    with pytest.raises(ValueError):
        Attestation("a", "b", Receipt("s", 0, "m", 0, 1, 1, "bfloat16", "none", "", "", "b", NOW), 1, 0, "maybe", "bf16", NOW, NOW, b"")


def test_countersigned_receipt(keys, receipt) -> None:
    client = _peer(keys["checker"])
    signed = Countersigned.make(receipt, client, keys["checker"])
    assert signed.verify() is Check.OK
    assert dataclasses.replace(signed, client=_peer(keys["other"])).verify() is Check.IMPERSONATED
    assert dataclasses.replace(signed, signature=b"AAAA").verify() is Check.FORGED
    assert dataclasses.replace(signed, receipt=dataclasses.replace(receipt, tokens=999)).verify() is Check.BAD_EVIDENCE
