"""Signed receipts of work and signed spot-check attestations (issue 4, part 1).

A `Receipt` is a serving peer's signed statement "I computed blocks [start, end) of step `step` of session
`session_id`, from the input whose digest is X, and returned the output whose digest is Y". An `Attestation` is
a checker's signed verdict about such a receipt, carrying the receipt itself as evidence (TRUST.md: a negative
verdict must carry evidence anyone can re-check).

All three messages are strict, frozen pydantic models (swarm.schema): every field typed and capped, so decoding
either yields a message whose every field is usable as is, or raises MalformedMessageError.

Wire form: msgpack of a list of [field, value] pairs sorted by field name, with a "version" pair; an embedded
receipt travels as its own encoding (bytes). The signature and the body digest travel beside the body, which is
signed in the same canonical form. Unknown or missing fields and unknown versions are rejected (decided
explicitly: a verdict we cannot fully read is a verdict we must not count). Signatures are hivemind RSA (PSS,
SHA-256); the signer's public key travels in the signed body and must hash to the signer's libp2p peer id.
"""

from __future__ import annotations

import enum
import hashlib
import logging
from collections.abc import Set
from typing import Annotated, Any, Literal, NamedTuple, Self

import msgpack
import torch
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey
from pydantic import Field, StrictInt, TypeAdapter, ValidationError, ValidationInfo, field_validator, model_validator

from reputation.errors import MalformedMessageError
from swarm.records import peer_id_of_public_key
from swarm.schema import Count, FiniteFloat, Float, StrictModel, check_span, first_error, load_msgpack

logger = logging.getLogger(__name__)

WIRE_VERSION = 1
MAX_MESSAGE_BYTES = 16 * 1024  # an attestation with its receipt is about 2 KiB
_UNSIGNED = ("signature", "digest")  # travel beside the signed body

Verdict = Literal["pass", "fail", "inconclusive"]
Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]  # sha256 hex
BodyDigest = Annotated[str, Field(pattern=r"^([0-9a-f]{64})?$")]  # "" until signed
PeerIdText = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[1-9A-HJ-NP-Za-km-z]+$")]  # base58
Name = Annotated[str, Field(max_length=64)]  # a dtype, compression or tolerance profile
PublicKey = Annotated[bytes, Field(max_length=2048)]  # RSA, OpenSSH form (a 4096-bit key is about 720 bytes)
Signature = Annotated[bytes, Field(max_length=1024)]
Nonce = Annotated[bytes, Field(min_length=8, max_length=64)]


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 hex over dtype, shape and raw bytes, so equal digests mean bit-identical tensors."""
    h = hashlib.sha256()
    h.update(str(t.dtype).encode())
    h.update(repr(tuple(t.shape)).encode())
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


class _Pair(NamedTuple):
    name: Annotated[str, Field(max_length=64)]
    value: Any


_PAIRS = TypeAdapter(Annotated[list[_Pair], Field(max_length=32)])
_VERSION = TypeAdapter(StrictInt)


def _pack(fields: dict[str, object]) -> bytes:
    return msgpack.packb([["version", WIRE_VERSION], *sorted([k, v] for k, v in fields.items())], use_bin_type=True)


def _canonical(fields: dict[str, object]) -> bytes:
    return _pack({name: value for name, value in fields.items() if name not in _UNSIGNED})


def _unpack(data: object) -> dict[str, object]:
    """The fields of one encoded message, not yet validated; ValueError if it is not one."""
    raw = load_msgpack(data, MAX_MESSAGE_BYTES, "message")
    pairs = _PAIRS.validate_python(raw, strict=True)
    fields = dict(pairs)
    if len(fields) != len(pairs):
        raise ValueError("a field appears twice")
    if _VERSION.validate_python(fields.pop("version", None)) != WIRE_VERSION:
        raise ValueError("unknown version; upgrade this peer")
    return fields


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


class _Message(StrictModel):
    """The wire form shared by receipts, attestations and countersigned receipts."""

    def _fields(self) -> dict[str, object]:
        """Every field as it travels: an embedded receipt as its own encoding."""
        out: dict[str, object] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            out[name] = value.encode() if isinstance(value, Receipt) else value
        return out

    def encode(self) -> bytes:
        return _pack(self._fields())

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """The message `data` encodes; MalformedMessageError for anything else (garbage, a wrong type, a size
        over its cap, a missing or unknown field, another version)."""
        try:
            message = cls.model_validate(_unpack(data), context={"wire": True})
        except ValidationError as e:
            raise MalformedMessageError(f"cannot decode {cls.__name__}: {first_error(e)}") from None
        except ValueError as e:
            raise MalformedMessageError(f"cannot decode {cls.__name__}: {e}") from None
        missing = set(cls.model_fields) - message.model_fields_set
        if missing:
            raise MalformedMessageError(f"{cls.__name__} lacks fields of version {WIRE_VERSION}: {sorted(missing)}")
        return message

    @field_validator("receipt", mode="before", check_fields=False)
    @classmethod
    def _receipt_from_wire(cls, value: object, info: ValidationInfo) -> object:
        if not (info.context and info.context.get("wire")):
            return value
        if not isinstance(value, bytes):  # on the wire a receipt is its own encoding, nothing else
            raise ValueError(f"an embedded receipt must be bytes, not {type(value).__name__}")
        try:
            return Receipt.decode(value)
        except MalformedMessageError as e:
            raise ValueError(str(e)) from None


class _SignedMessage(_Message):
    """A message its signer signs over the canonical body (everything but the digest and signature)."""

    def _signer(self) -> str:
        raise NotImplementedError

    def sign(self, private_key: RSAPrivateKey) -> Self:
        unsigned = self.model_copy(update={"public_key": private_key.get_public_key().to_bytes()})
        body = _canonical(unsigned._fields())
        return unsigned.model_copy(update={"digest": hashlib.sha256(body).hexdigest(), "signature": private_key.sign(body)})

    def verify(self) -> Check:
        """Signature, integrity and signer binding."""
        body = _canonical(self._fields())
        if hashlib.sha256(body).hexdigest() != self.digest:
            return Check.ALTERED
        try:
            key = RSAPublicKey.from_bytes(self.public_key)
        except Exception:  # unparsable key: nothing it signed can verify
            return Check.FORGED
        if not key.verify(body, self.signature):
            return Check.FORGED
        if _peer_id_of(self.public_key) != self._signer():
            return Check.IMPERSONATED
        return Check.OK


class Receipt(_SignedMessage):
    """A serving peer's signed statement of the work it returned for one step."""

    session_id: str = Field(min_length=1, max_length=128)  # client's inference session
    step: Count  # position of the step within the session
    dht_prefix: str = Field(min_length=1, max_length=256)  # model the blocks belong to
    block_start: Count  # first block served (inclusive)
    block_end: Count  # last block served (exclusive)
    tokens: Count  # batch x tokens processed for the session so far, this step included (the unit of reward, x blocks)
    dtype: Name  # declared compute dtype, e.g. "bfloat16"
    compression: Name  # declared wire/weight compression, e.g. "none", "int8"
    input_digest: Digest  # tensor_digest of the hidden states received
    output_digest: Digest  # tensor_digest of the hidden states returned
    signer: PeerIdText  # base58 peer id of the serving peer
    signed_at: FiniteFloat  # unix seconds
    public_key: PublicKey = b""  # signer's RSA key (OpenSSH form); set by sign()
    digest: BodyDigest = ""  # sha256 hex of the canonical body; set by sign()
    signature: Signature = b""  # over the canonical body; set by sign()

    @model_validator(mode="after")
    def _span_not_empty(self) -> Receipt:
        check_span(self.block_start, self.block_end)
        return self

    def _signer(self) -> str:
        return self.signer


class Attestation(_SignedMessage):
    """A checker's signed verdict on a subject's receipt (the receipt is the evidence)."""

    checker: PeerIdText  # base58 peer id of the signer
    subject: PeerIdText  # base58 peer id of the peer whose work was checked
    receipt: Receipt  # the subject's own signed receipt
    cosine: Float  # minimum per-token cosine of the block update (NaN when the output was: evidence too)
    rel_l2: Float  # relative L2 of the span's block update (may be NaN or infinite, as cosine)
    verdict: Verdict
    profile: Name  # tolerance profile name used to judge
    issued_at: FiniteFloat  # unix seconds
    expires_at: FiniteFloat  # unix seconds; dropped after this
    nonce: Nonce  # random, unique per attestation (replay protection)
    public_key: PublicKey = b""
    digest: BodyDigest = ""
    signature: Signature = b""

    def _signer(self) -> str:
        return self.checker

    def verify(self) -> Check:
        """Signature, integrity and signer binding only; see verify_attestation for time and replay."""
        return super().verify()


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


class Countersigned(_Message):
    """A client's signature over a receipt's digest: the client accepted this work (the ledger's input)."""

    receipt: Receipt
    client: PeerIdText  # base58 peer id of the client
    public_key: PublicKey  # client's RSA key (OpenSSH form)
    signature: Signature  # over the receipt's digest

    @classmethod
    def make(cls, receipt: Receipt, client: str, private_key: RSAPrivateKey) -> Countersigned:
        key = private_key.get_public_key().to_bytes()
        return cls(receipt=receipt, client=client, public_key=key, signature=private_key.sign(receipt.digest.encode()))

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
