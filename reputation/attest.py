"""Signed receipts of work and signed spot-check attestations (issue 4, part 1).

A `Receipt` is a serving peer's signed statement "I computed blocks [start, end) of step `step` of session
`session_id`, from the input whose digest is X, and returned the output whose digest is Y". An `Attestation` is
a checker's signed verdict about such a receipt, carrying the receipt itself as evidence (TRUST.md: a negative
verdict must carry evidence anyone can re-check).

Wire form: msgpack of a list of [field, value] pairs sorted by field name, with a "version" pair; the signature
and the body digest travel beside the body. Unknown fields or versions are rejected (decided explicitly: a
verdict we cannot fully read is a verdict we must not count). Signatures are hivemind RSA (PSS, SHA-256); the
signer's public key travels in the signed body and must hash to the signer's libp2p peer id.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
from collections.abc import Set
from dataclasses import dataclass

import msgpack
import torch
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from reputation.errors import (
    AlteredError,
    AttestationError,
    ExpiredError,
    ForgedError,
    MalformedMessageError,
    ReplayedError,
)
from swarm.records import peer_id_of_public_key

logger = logging.getLogger(__name__)

WIRE_VERSION = 1
VERDICTS = ("pass", "fail", "inconclusive")
_UNSIGNED = ("signature", "digest")  # travel beside the signed body


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 hex over dtype, shape and raw bytes, so equal digests mean bit-identical tensors."""
    h = hashlib.sha256()
    h.update(str(t.dtype).encode())
    h.update(repr(tuple(t.shape)).encode())
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


def _canonical(fields: dict[str, object]) -> bytes:
    pairs = sorted([name, value] for name, value in fields.items() if name not in _UNSIGNED)
    return msgpack.packb([["version", WIRE_VERSION], *pairs], use_bin_type=True)


def _body_fields(message: object) -> dict[str, object]:
    out: dict[str, object] = {}
    for f in dataclasses.fields(message):  # type: ignore[arg-type]
        value = getattr(message, f.name)
        out[f.name] = value.encode() if isinstance(value, Receipt) else value
    return out


def _peer_id_of(public_key: bytes) -> str | None:
    try:
        return peer_id_of_public_key(public_key).to_base58()
    except Exception:  # any unparsable key simply belongs to nobody
        return None


class Check(enum.Enum):
    """Outcome of verifying a receipt or attestation; everything but OK means drop it."""

    OK = "ok"
    FORGED = "forged"  # signature invalid
    IMPERSONATED = "impersonated"  # valid signature, but the key is not the claimed signer's
    ALTERED = "altered"  # body does not match its signed digest
    EXPIRED = "expired"  # now is outside [issued_at, expires_at]
    REPLAYED = "replayed"  # nonce seen before
    BAD_EVIDENCE = "bad_evidence"  # the embedded receipt is invalid or is not the subject's


_ERRORS: dict[Check, type[AttestationError]] = {
    Check.FORGED: ForgedError,
    Check.IMPERSONATED: ForgedError,
    Check.ALTERED: AlteredError,
    Check.EXPIRED: ExpiredError,
    Check.REPLAYED: ReplayedError,
    Check.BAD_EVIDENCE: ForgedError,
}


def _check_signature(message: Receipt | Attestation, signer: str) -> Check:
    body = _canonical(_body_fields(message))
    if hashlib.sha256(body).hexdigest() != message.digest:
        return Check.ALTERED
    try:
        key = RSAPublicKey.from_bytes(message.public_key)
    except Exception:  # unparsable key: nothing it signed can verify
        return Check.FORGED
    if not key.verify(body, message.signature):
        return Check.FORGED
    if _peer_id_of(message.public_key) != signer:
        return Check.IMPERSONATED
    return Check.OK


def _signed(message: Receipt | Attestation, private_key: RSAPrivateKey):
    unsigned = dataclasses.replace(message, public_key=private_key.get_public_key().to_bytes())
    body = _canonical(_body_fields(unsigned))
    return dataclasses.replace(unsigned, digest=hashlib.sha256(body).hexdigest(), signature=private_key.sign(body))


@dataclass(frozen=True)
class Receipt:
    """A serving peer's signed statement of the work it returned for one step."""

    session_id: str  # client's inference session
    step: int  # position of the step within the session
    dht_prefix: str  # model the blocks belong to
    block_start: int  # first block served (inclusive)
    block_end: int  # last block served (exclusive)
    tokens: int  # batch x tokens processed for the session so far, this step included (the unit of reward, x blocks)
    dtype: str  # declared compute dtype, e.g. "bfloat16"
    compression: str  # declared wire/weight compression, e.g. "none", "int8"
    input_digest: str  # tensor_digest of the hidden states received
    output_digest: str  # tensor_digest of the hidden states returned
    signer: str  # base58 peer id of the serving peer
    signed_at: float  # unix seconds
    public_key: bytes = b""  # signer's RSA key (OpenSSH form); set by sign()
    digest: str = ""  # sha256 hex of the canonical body; set by sign()
    signature: bytes = b""  # over the canonical body; set by sign()

    def sign(self, private_key: RSAPrivateKey) -> Receipt:
        return _signed(self, private_key)

    def verify(self) -> Check:
        return _check_signature(self, self.signer)

    def encode(self) -> bytes:
        return _encode(_body_fields(self))

    @classmethod
    def decode(cls, data: bytes) -> Receipt:
        return cls(**_decode(data, cls))


@dataclass(frozen=True)
class Attestation:
    """A checker's signed verdict on a subject's receipt (the receipt is the evidence)."""

    checker: str  # base58 peer id of the signer
    subject: str  # base58 peer id of the peer whose work was checked
    receipt: Receipt  # the subject's own signed receipt
    cosine: float  # minimum per-token cosine of the block update
    rel_l2: float  # relative L2 of the span's block update
    verdict: str  # "pass" | "fail" | "inconclusive"
    profile: str  # tolerance profile name used to judge
    issued_at: float  # unix seconds
    expires_at: float  # unix seconds; dropped after this
    nonce: bytes  # random, unique per attestation (replay protection)
    public_key: bytes = b""
    digest: str = ""
    signature: bytes = b""

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

    def sign(self, private_key: RSAPrivateKey) -> Attestation:
        return _signed(self, private_key)

    def verify(self) -> Check:
        """Signature, integrity and signer binding only; see verify_attestation for time and replay."""
        return _check_signature(self, self.checker)

    def encode(self) -> bytes:
        return _encode(_body_fields(self))

    @classmethod
    def decode(cls, data: bytes) -> Attestation:
        fields = _decode(data, cls)
        fields["receipt"] = Receipt.decode(fields["receipt"])
        return cls(**fields)


def _encode(fields: dict[str, object]) -> bytes:
    return msgpack.packb([["version", WIRE_VERSION], *sorted([k, v] for k, v in fields.items())], use_bin_type=True)


def _decode(data: bytes, cls: type) -> dict:
    try:
        pairs = msgpack.unpackb(data, raw=False)
        fields = {name: value for name, value in pairs}
    except Exception as e:  # anything undecodable is malformed by definition
        raise MalformedMessageError(f"cannot decode {cls.__name__}: {e}") from e
    if fields.pop("version", None) != WIRE_VERSION:
        raise MalformedMessageError(f"{cls.__name__} has an unknown version; upgrade this peer")
    expected = {f.name for f in dataclasses.fields(cls)}
    if set(fields) != expected:
        raise MalformedMessageError(f"{cls.__name__} fields differ from version {WIRE_VERSION}: {sorted(fields)}")
    return fields


def verify_attestation(att: Attestation, now: float, seen_nonces: Set[bytes]) -> Check:
    """Pure check of one attestation; the caller adds att.nonce to its seen set when this returns OK.

    Order: integrity and signature first (a forged message says nothing true, not even its times), then the
    evidence, then the validity window, then replay.
    """
    result = att.verify()
    if result is Check.OK:
        if att.receipt.signer != att.subject or att.receipt.verify() is not Check.OK:
            result = Check.BAD_EVIDENCE
        elif not att.issued_at <= now <= att.expires_at:
            result = Check.EXPIRED
        elif att.nonce in seen_nonces:
            result = Check.REPLAYED
    if result is not Check.OK:
        logger.debug("dropping attestation by %s about %s: %s", att.checker, att.subject, result.value)
    return result


def require_valid(att: Attestation, now: float, seen_nonces: Set[bytes]) -> None:
    """verify_attestation, raising the matching AttestationError subclass instead of returning it."""
    result = verify_attestation(att, now, seen_nonces)
    if result is not Check.OK:
        raise _ERRORS[result](f"attestation by {att.checker} about {att.subject} rejected: {result.value}")


@dataclass(frozen=True)
class Countersigned:
    """A client's signature over a receipt's digest: the client accepted this work (the ledger's input)."""

    receipt: Receipt
    client: str  # base58 peer id of the client
    public_key: bytes  # client's RSA key (OpenSSH form)
    signature: bytes  # over the receipt's digest

    @classmethod
    def make(cls, receipt: Receipt, client: str, private_key: RSAPrivateKey) -> Countersigned:
        key = private_key.get_public_key().to_bytes()
        return cls(receipt, client, key, private_key.sign(receipt.digest.encode()))

    def verify(self) -> Check:
        if self.receipt.verify() is not Check.OK:
            return Check.BAD_EVIDENCE
        try:
            ok = RSAPublicKey.from_bytes(self.public_key).verify(self.receipt.digest.encode(), self.signature)
        except Exception:  # unparsable key
            ok = False
        if not ok:
            return Check.FORGED
        return Check.OK if _peer_id_of(self.public_key) == self.client else Check.IMPERSONATED

    def encode(self) -> bytes:
        return _encode({"receipt": self.receipt.encode(), "client": self.client,
                        "public_key": self.public_key, "signature": self.signature})

    @classmethod
    def decode(cls, data: bytes) -> Countersigned:
        fields = _decode(data, cls)
        fields["receipt"] = Receipt.decode(fields["receipt"])
        return cls(**fields)
