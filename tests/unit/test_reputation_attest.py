"""Receipts and attestations: real RSA keys; forged, altered, impersonated, expired and replayed are rejected,
and so is anything that does not decode to a message whose every field has its type and size."""

from __future__ import annotations

import hashlib

import msgpack
import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import ValidationError

from reputation.attest import (
    MAX_EVIDENCE_BYTES,
    MAX_MESSAGE_BYTES,
    WIRE_VERSION,
    Attestation,
    Check,
    Countersigned,
    Evidence,
    Receipt,
    _canonical,
    _receipt_key,
    tensor_digest,
    verify_attestation,
)
from reputation.errors import MalformedMessageError
from signing_kit import sign_fields
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
    assert receipt.model_copy(update={"tokens": 400}).verify() is Check.ALTERED


def test_valid_attestation_is_accepted_and_round_trips(attestation) -> None:
    assert verify_attestation(attestation, NOW + 10, frozenset()) is Check.OK
    decoded = Attestation.decode(attestation.encode())
    assert decoded == attestation
    assert verify_attestation(decoded, NOW + 10, frozenset()) is Check.OK


@pytest.mark.parametrize(
    "change", [{"verdict": "fail"}, {"cosine": 0.5}, {"expires_at": NOW + 10**9}, {"nonce": b"x" * 16}, {"profile": "int4"}]
)
def test_altered_attestation_is_rejected(attestation, change) -> None:
    altered = attestation.model_copy(update=change)
    assert verify_attestation(altered, NOW + 10, frozenset()) is Check.ALTERED
    assert verify_attestation(Attestation.decode(altered.encode()), NOW + 10, frozenset()) is Check.ALTERED


def test_altered_evidence_is_rejected(attestation) -> None:
    receipt = attestation.receipt.model_copy(update={"output_digest": "0" * 64})
    assert verify_attestation(attestation.model_copy(update={"receipt": receipt}), NOW, frozenset()) is Check.ALTERED


def test_forged_signature_is_rejected(keys, attestation) -> None:
    body_signed_by_other = Attestation.sign(attestation, keys["other"]).signature  # a valid signature, wrong key
    for signature in (body_signed_by_other, b"AAAA", b""):
        forged = attestation.model_copy(update={"signature": signature})
        assert verify_attestation(forged, NOW, frozenset()) is Check.FORGED


def test_impersonation_is_rejected(keys, receipt) -> None:
    # signed correctly, but by "other" while claiming to be the checker
    att = Attestation(
        checker=_peer(keys["checker"]), subject=receipt.signer, receipt=receipt, cosine=0.1, rel_l2=1.0,
        verdict="fail", profile="bf16", issued_at=NOW, expires_at=NOW + 60, nonce=b"i" * 16,
    ).sign(keys["other"])
    assert verify_attestation(att, NOW, frozenset()) is Check.IMPERSONATED


def test_evidence_must_be_the_subjects_receipt(keys, attestation) -> None:
    wrong_subject = attestation.model_copy(update={"subject": _peer(keys["other"])}).sign(keys["checker"])
    assert verify_attestation(wrong_subject, NOW, frozenset()) is Check.BAD_EVIDENCE


def test_expired_and_not_yet_valid_are_rejected(attestation) -> None:
    assert verify_attestation(attestation, NOW + 3601, frozenset()) is Check.EXPIRED
    assert verify_attestation(attestation, NOW - 1, frozenset()) is Check.EXPIRED


def test_replay_is_rejected(attestation) -> None:
    seen = frozenset({attestation.nonce})
    assert verify_attestation(attestation, NOW, seen) is Check.REPLAYED


def _pairs(message: Receipt | Attestation | Countersigned) -> list:
    return msgpack.unpackb(message.encode(), raw=False)


def _pack(pairs: list) -> bytes:
    return msgpack.packb(pairs, use_bin_type=True)


def test_unknown_version_or_fields_are_malformed(attestation) -> None:
    pairs = _pairs(attestation)
    for version in (99, True, 1.0, "1"):
        with pytest.raises(MalformedMessageError):
            Attestation.decode(_pack([["version", version] if p[0] == "version" else p for p in pairs]))
    with pytest.raises(MalformedMessageError):
        Attestation.decode(_pack([p for p in pairs if p[0] != "version"]))
    with pytest.raises(MalformedMessageError):
        Attestation.decode(_pack([*pairs, ["extra", 1]]))
    with pytest.raises(MalformedMessageError):
        Attestation.decode(_pack([p for p in pairs if p[0] != "signature"]))  # a missing field, even one with a default
    with pytest.raises(MalformedMessageError):
        Attestation.decode(_pack([*pairs, ["verdict", "fail"]]))  # a field twice
    for garbage in (b"\xc1 not msgpack", b"", _pack({"verdict": "pass"}), _pack([["version"]]), _pack(42)):
        with pytest.raises(MalformedMessageError):
            Attestation.decode(garbage)


def _resigned(receipt: Receipt, signer: Ed25519PrivateKey, **fields) -> Receipt:
    """`receipt` with `fields` changed, digested and signed anew by the Ed25519 key `signer`."""
    changed = receipt.model_copy(update=fields)
    body = _canonical(changed._fields())
    return changed.model_copy(update={"digest": hashlib.sha256(body).hexdigest(), "signature": signer.sign(body)})


def test_a_receipt_verifies_only_with_a_receipt_key_its_signers_identity_key_certified(keys, receipt) -> None:
    assert receipt.verify() is Check.OK and len(receipt.receipt_key) == 32
    assert receipt.model_copy().sign(keys["server"]).receipt_key == receipt.receipt_key  # one per identity key
    # another identity's certified receipt key cannot sign for the server
    other = _receipt_key(keys["checker"])
    assert _resigned(receipt, other.private, receipt_key=other.public, key_certificate=other.certificate).verify() \
        is Check.FORGED
    # nor can a key nobody certified, with or without the server's certificate of its own key beside it
    rogue = Ed25519PrivateKey.generate()
    rogue_public = rogue.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert _resigned(receipt, rogue, receipt_key=rogue_public).verify() is Check.FORGED
    # the server's own receipt key with a certificate of another key, or no key at all
    assert _resigned(receipt, _receipt_key(keys["server"]).private, key_certificate=other.certificate).verify() \
        is Check.FORGED
    assert _resigned(receipt, rogue, receipt_key=b"").verify() is Check.FORGED
    # the certificate is a signature over the domain and the key: the identity key's signature of the bare key is not
    bare = keys["server"].sign(_receipt_key(keys["server"]).public)
    assert _resigned(receipt, _receipt_key(keys["server"]).private, key_certificate=bare).verify() is Check.FORGED


def test_signing_by_hand_matches_sign(keys, receipt) -> None:
    """The test forger below signs exactly as Receipt.sign does (compare decoded digests: RSA-PSS is randomised)."""
    forged = Receipt.decode(sign_fields(dict(receipt._fields()), keys["server"]))
    assert forged.verify() is Check.OK and forged.digest == receipt.digest


@pytest.mark.parametrize(
    "change",
    [
        {"tokens": "x"},
        {"tokens": -1},
        {"tokens": 4.0},
        {"tokens": True},
        {"step": None},
        {"signed_at": 1},  # an int where a float belongs
        {"signed_at": float("inf")},
        {"input_digest": "i"},
        {"input_digest": "A" * 64},
        {"dtype": b"bfloat16"},
        {"signer": "0OIl"},  # not base58
        {"block_start": 4},  # block_start == block_end: an empty span
    ],
    ids=str,
)
def test_a_properly_signed_receipt_with_a_wrong_typed_field_is_malformed(keys, receipt, change) -> None:
    data = sign_fields({**receipt._fields(), **change}, keys["server"])
    with pytest.raises(MalformedMessageError):
        Receipt.decode(data)


@pytest.mark.parametrize(
    "change",
    [
        {"cosine": "0.99"},
        {"cosine": 1},
        {"verdict": "maybe"},
        {"verdict": b"pass"},
        {"nonce": "n" * 16},
        {"nonce": b""},
        {"expires_at": float("nan")},
        {"receipt": b"\xc1"},
        {"receipt": "not bytes"},
        {"checker": 5},
    ],
    ids=str,
)
def test_a_properly_signed_attestation_with_a_wrong_typed_field_is_malformed(keys, attestation, change) -> None:
    data = sign_fields({**attestation._fields(), **change}, keys["checker"])
    with pytest.raises(MalformedMessageError):
        Attestation.decode(data)


def test_an_attestation_whose_evidence_has_a_wrong_typed_field_is_malformed(keys, attestation) -> None:
    bad_receipt = sign_fields({**attestation.receipt._fields(), "tokens": "x"}, keys["server"])
    with pytest.raises(MalformedMessageError, match="tokens"):
        Attestation.decode(sign_fields({**attestation._fields(), "receipt": bad_receipt}, keys["checker"]))


@pytest.mark.parametrize(
    "change",
    [
        {"profile": "p" * 65},
        {"nonce": b"n" * 65},
        {"subject": "Q" * 129},
    ],
    ids=lambda change: next(iter(change)),
)
def test_oversized_fields_are_malformed(keys, attestation, change) -> None:
    with pytest.raises(MalformedMessageError):
        Attestation.decode(sign_fields({**attestation._fields(), **change}, keys["checker"]))


@pytest.mark.parametrize("name, value", [("signature", b"s" * 1025), ("public_key", b"k" * 2049), ("digest", "0" * 65)])
def test_oversized_signatures_and_keys_are_malformed(attestation, name, value) -> None:
    with pytest.raises(MalformedMessageError):
        Attestation.decode(_pack([[n, value if n == name else v] for n, v in _pairs(attestation)]))


def test_an_embedded_receipt_travels_only_as_its_encoding(keys, attestation) -> None:
    as_map = sign_fields({**attestation._fields(), "receipt": attestation.receipt._fields()}, keys["checker"])
    with pytest.raises(MalformedMessageError, match="bytes"):
        Attestation.decode(as_map)


def test_an_oversized_message_is_malformed(keys, attestation) -> None:
    data = sign_fields({**attestation._fields(), "profile": "p" * MAX_MESSAGE_BYTES}, keys["checker"])
    with pytest.raises(MalformedMessageError, match="more than"):
        Attestation.decode(data)


def test_bad_verdict_and_wrong_types_are_refused_in_code_too(receipt) -> None:
    fields = dict(
        checker="a", subject="b", receipt=receipt, cosine=1.0, rel_l2=0.0, verdict="pass", profile="bf16",
        issued_at=NOW, expires_at=NOW, nonce=b"n" * 16,
    )
    Attestation(**fields)
    for change in ({"verdict": "maybe"}, {"cosine": 1}, {"issued_at": "now"}, {"receipt": b"x"}):
        with pytest.raises(ValidationError):
            Attestation(**{**fields, **change})
    with pytest.raises(ValidationError):
        receipt.tokens = 5  # frozen


def test_a_fail_verdict_on_nan_output_still_signs_and_round_trips(keys, receipt) -> None:
    """A cheater returning NaN or infinities is caught with a NaN cosine; that verdict must still travel."""
    att = Attestation(
        checker=_peer(keys["checker"]), subject=receipt.signer, receipt=receipt, cosine=float("nan"),
        rel_l2=float("inf"), verdict="fail", profile="bf16", issued_at=NOW, expires_at=NOW + 60, nonce=b"f" * 16,
    ).sign(keys["checker"])
    decoded = Attestation.decode(att.encode())
    assert decoded.encode() == att.encode()
    assert verify_attestation(decoded, NOW, frozenset()) is Check.OK


def test_countersigned_receipt(keys, receipt) -> None:
    client = _peer(keys["checker"])
    signed = Countersigned.make(receipt, client, keys["checker"], tokens=4, puzzle_nonce=b"p" * 8)
    assert signed.verify() is Check.OK
    assert signed.model_copy(update={"client": _peer(keys["other"])}).verify() is Check.FORGED  # the client is signed
    assert signed.model_copy(update={"signature": b"AAAA"}).verify() is Check.FORGED
    assert signed.model_copy(update={"tokens": 400}).verify() is Check.FORGED  # the client's count is signed
    assert signed.model_copy(update={"puzzle_nonce": b"q" * 8}).verify() is Check.FORGED
    altered = receipt.model_copy(update={"tokens": 999})
    assert signed.model_copy(update={"receipt": altered}).verify() is Check.BAD_EVIDENCE
    assert Countersigned.decode(signed.encode()) == signed
    impostor = Countersigned.make(receipt, client, keys["other"], tokens=4)  # signed by "other" in the checker's name
    assert impostor.verify() is Check.IMPERSONATED


def _countersigned_bytes(receipt_bytes: bytes, client: RSAPrivateKey, tokens: object = 4) -> bytes:
    """A countersignature over `receipt_bytes` signed by hand, so only the types can be wrong."""
    digest = dict(msgpack.unpackb(receipt_bytes, raw=False))["digest"]
    key = client.get_public_key().to_bytes()
    body = {"receipt": digest, "client": _peer(client), "tokens": tokens, "puzzle_nonce": b"", "public_key": key}
    signature = client.sign(_pack([["version", WIRE_VERSION], *sorted([k, v] for k, v in body.items())]))
    return _pack([
        ["version", WIRE_VERSION], ["client", _peer(client)], ["public_key", key], ["puzzle_nonce", b""],
        ["receipt", receipt_bytes], ["signature", signature], ["tokens", tokens],
    ])


def test_a_countersigned_receipt_with_a_wrong_typed_field_is_malformed(keys, receipt) -> None:
    """tokens="x", signed by the server and countersigned by the client: every signature holds, only the type is
    wrong. It used to verify and then break the ledger; now it does not decode."""
    client = keys["checker"]
    bad = sign_fields({**receipt._fields(), "tokens": "x"}, keys["server"])
    with pytest.raises(MalformedMessageError, match="tokens"):
        Countersigned.decode(_countersigned_bytes(bad, client))
    good = sign_fields(dict(receipt._fields()), keys["server"])
    for wrong in ("4", -1, 4.0):  # the client's own count, wrongly typed
        with pytest.raises(MalformedMessageError, match="tokens"):
            Countersigned.decode(_countersigned_bytes(good, client, tokens=wrong))
    assert Countersigned.decode(_countersigned_bytes(good, client)).verify() is Check.OK  # the right types are fine


# --- evidence: enough of a failed step to re-run it without the subject ---


def _step(batch: int = 1, position: int = 5, new: int = 2, hidden: int = 8) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    earlier = torch.randn(batch, position, hidden, generator=g)
    inputs = torch.randn(batch, new, hidden, generator=g)
    return (earlier[:, :3], earlier[:, 3:], inputs), inputs, inputs * 2


def _signed_receipt(key: RSAPrivateKey, inputs: torch.Tensor, output: torch.Tensor) -> Receipt:
    return Receipt(
        session_id="s1", step=3, dht_prefix="llama-test", block_start=0, block_end=4, tokens=7, dtype="float32",
        compression="none", input_digest=tensor_digest(inputs), output_digest=tensor_digest(output),
        signer=_peer(key), signed_at=NOW,
    ).sign(key)


def test_evidence_of_a_step_round_trips_and_matches_the_receipt(keys) -> None:
    history, inputs, output = _step()
    evidence = Evidence.of_step(history, inputs, output)
    assert evidence is not None and (evidence.position, evidence.new, evidence.dtype) == (5, 2, "float32")
    prefix, got_inputs, got_output = Evidence.decode(evidence.encode()).tensors()
    assert prefix.dtype == torch.float16 and torch.allclose(prefix.float(), torch.cat(history, 1)[:, :5], atol=1e-2)
    assert torch.equal(got_inputs, inputs) and torch.equal(got_output, output)
    receipt = _signed_receipt(keys["server"], inputs, output)
    assert evidence.matches(receipt)
    assert not Evidence.of_step(history, inputs, output + 1).matches(receipt)
    att = Attestation(
        checker=_peer(keys["checker"]), subject=receipt.signer, receipt=receipt, cosine=0.1, rel_l2=1.0,
        verdict="fail", profile="fp32", issued_at=NOW, expires_at=NOW + 60, nonce=b"e" * 16, evidence=evidence,
    ).sign(keys["checker"])
    decoded = Attestation.decode(att.encode())
    assert decoded == att and verify_attestation(decoded, NOW, frozenset()) is Check.OK
    lying = att.model_copy(update={"evidence": Evidence.of_step(history, inputs, output + 1)}).sign(keys["checker"])
    assert verify_attestation(lying, NOW, frozenset()) is Check.BAD_EVIDENCE  # evidence that is not the receipt's
    assert att.model_copy(update={"evidence": None}).verify() is Check.ALTERED  # the evidence is signed


def test_evidence_over_the_cap_is_left_out_and_only_fail_verdicts_carry_it(keys, attestation) -> None:
    history, inputs, output = _step(position=5)
    assert Evidence.of_step(history, inputs, output, cap=100) is None
    assert Evidence.of_step(history, inputs.to(torch.int32), output.to(torch.int32)) is None
    hidden = MAX_EVIDENCE_BYTES // 2  # one float16 token of prefix alone is the whole cap
    assert Evidence.of_step((torch.zeros(1, 2, hidden), torch.zeros(1, 1, hidden)), torch.zeros(1, 1, hidden),
                            torch.zeros(1, 1, hidden)) is None
    with pytest.raises(ValidationError, match="only a fail"):
        attestation.model_copy(update={"evidence": None}).model_validate(
            {**attestation.model_dump(), "evidence": Evidence.of_step(history, inputs, output)})


@pytest.mark.parametrize(
    "change",
    [{"dtype": "int8"}, {"position": 4}, {"new": 0}, {"inputs": b"x"}, {"prefix": b"p" * (MAX_EVIDENCE_BYTES + 1)}],
    ids=lambda change: next(iter(change)),
)
def test_evidence_that_does_not_add_up_is_malformed(change) -> None:
    history, inputs, output = _step()
    evidence = Evidence.of_step(history, inputs, output)
    with pytest.raises(MalformedMessageError):
        Evidence.decode(_pack([["version", WIRE_VERSION], *sorted([k, v] for k, v in {**evidence._fields(), **change}.items())]))
