"""Signed receipts of work, signed spot-check attestations and countersigned receipts (issue 4, part 1; issue 12).

A `Receipt` is a serving peer's signed statement "I computed blocks [start, end) of step `step` of session
`session_id`, from the input whose digest is X, and returned the output whose digest is Y". An `Attestation` is
a checker's signed verdict about such a receipt, carrying the receipt itself as evidence (TRUST.md: a negative
verdict must carry evidence anyone can re-check); a "fail" verdict may also carry `Evidence`, enough of the
step to re-run it without the subject's cooperation. A `Countersigned` receipt is a client's signed statement
"I received this work, and I sent this many tokens through that hop": the ledger pays at most that count.
Attestations and countersignatures carry their signer's identity-puzzle nonce (reputation.identity_puzzle)
in the signed body.

All four messages are strict, frozen pydantic models (swarm.schema): every field typed and capped, so decoding
either yields a message whose every field is usable as is, or raises MalformedMessageError.

Wire form: msgpack of a list of [field, value] pairs sorted by field name, with a "version" pair; an embedded
receipt travels as its own encoding (bytes). The signature and the body digest travel beside the body, which is
signed in the same canonical form. Unknown or missing fields and unknown versions are rejected (decided
explicitly: a verdict we cannot fully read is a verdict we must not count). Signatures are hivemind RSA (PSS,
SHA-256); the signer's public key travels in the signed body and must hash to the signer's libp2p peer id.
Receipts, one per reply on the token path, are signed with an Ed25519 key instead (about 20 us against RSA's 200-350
us): each peer makes one per identity key, and the identity key certifies it (an RSA signature over
`RECEIPT_KEY_DOMAIN` + the Ed25519 public key), so the key and its certificate travel in every receipt's signed body
and anyone who verifies a receipt checks both (the certificate once per key).
"""

from __future__ import annotations

import enum
import functools
import hashlib
import logging
from collections.abc import Sequence, Set
from typing import Annotated, Any, Literal, NamedTuple, Self

import msgpack
import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey
from pydantic import Field, StrictInt, TypeAdapter, ValidationError, ValidationInfo, field_validator, model_validator

from reputation.errors import MalformedMessageError
from swarm.protocol import tensor_digest  # noqa: F401  (part of this module's API: receipts digest tensors with it)
from swarm.records import peer_id_of_public_key
from swarm.schema import Count, FiniteFloat, Float, StrictModel, check_span, first_error, load_msgpack

logger = logging.getLogger(__name__)

WIRE_VERSION = 3  # 2: puzzle nonces, evidence, the client's token count in countersignatures; 3: Ed25519 receipts
RECEIPT_KEY_DOMAIN = b"efedllm-swarm receipt key v1:"  # what an identity key signs to certify its receipt key
MAX_EVIDENCE_BYTES = 1024 * 1024  # the tensors of one verdict's evidence, in all; more and it travels without
MAX_MESSAGE_BYTES = 16 * 1024 + MAX_EVIDENCE_BYTES  # an attestation with its receipt is about 2 KiB, plus evidence
_UNSIGNED = ("signature", "digest")  # travel beside the signed body

Verdict = Literal["pass", "fail", "inconclusive"]
Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]  # sha256 hex
BodyDigest = Annotated[str, Field(pattern=r"^([0-9a-f]{64})?$")]  # "" until signed
PeerIdText = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[1-9A-HJ-NP-Za-km-z]+$")]  # base58
Name = Annotated[str, Field(max_length=64)]  # a dtype, compression or tolerance profile
PublicKey = Annotated[bytes, Field(max_length=2048)]  # RSA, OpenSSH form (a 4096-bit key is about 720 bytes)
Signature = Annotated[bytes, Field(max_length=1024)]
Nonce = Annotated[bytes, Field(min_length=8, max_length=64)]
PuzzleNonce = Annotated[bytes, Field(max_length=32)]  # solves the signer's identity puzzle (reputation.identity_puzzle)
EvidenceBytes = Annotated[bytes, Field(max_length=MAX_EVIDENCE_BYTES)]
EVIDENCE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


@functools.lru_cache(maxsize=4096)  # a client verifies every reply of a few peers: parse each key once
def _public_key(public_key: bytes) -> RSAPublicKey:
    return RSAPublicKey.from_bytes(public_key)


@functools.lru_cache(maxsize=64)  # a peer signs every reply with its one key: encode the public half once
def _public_key_bytes(private_key: RSAPrivateKey) -> bytes:
    return private_key.get_public_key().to_bytes()


class _ReceiptKey(NamedTuple):
    private: Ed25519PrivateKey
    public: bytes  # raw, 32 bytes
    certificate: bytes  # the identity key's signature over RECEIPT_KEY_DOMAIN + public


@functools.lru_cache(maxsize=64)  # one receipt key per identity key, for the life of the process
def _receipt_key(private_key: RSAPrivateKey) -> _ReceiptKey:
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return _ReceiptKey(key, public, private_key.sign(RECEIPT_KEY_DOMAIN + public))


@functools.lru_cache(maxsize=4096)  # a client verifies every reply of a few peers: check each certificate once
def _certified_receipt_key(public_key: bytes, receipt_key: bytes, certificate: bytes) -> Ed25519PublicKey | None:
    """The receipt key, if the identity key `public_key` certified it; else None."""
    if len(receipt_key) != 32:
        return None
    try:
        if not _public_key(public_key).verify(RECEIPT_KEY_DOMAIN + receipt_key, certificate):
            return None
        return Ed25519PublicKey.from_public_bytes(receipt_key)
    except Exception:  # an unparsable identity key certifies nothing
        return None


@functools.lru_cache(maxsize=4096)
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
        """Every field as it travels: an embedded message (a receipt, evidence) as its own encoding."""
        out: dict[str, object] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            out[name] = value.encode() if isinstance(value, _Message) else value
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

    @field_validator("receipt", "evidence", mode="before", check_fields=False)
    @classmethod
    def _embedded_from_wire(cls, value: object, info: ValidationInfo) -> object:
        if not (info.context and info.context.get("wire")) or (value is None and info.field_name == "evidence"):
            return value
        embedded = Receipt if info.field_name == "receipt" else Evidence
        if not isinstance(value, bytes):  # on the wire an embedded message is its own encoding, nothing else
            raise ValueError(f"an embedded {info.field_name} must be bytes, not {type(value).__name__}")
        try:
            return embedded.decode(value)
        except MalformedMessageError as e:
            raise ValueError(str(e)) from None


class _SignedMessage(_Message):
    """A message its signer signs over the canonical body (everything but the digest and signature)."""

    def _signer(self) -> str:
        raise NotImplementedError

    def sign(self, private_key: RSAPrivateKey) -> Self:
        unsigned = self.model_copy(update={"public_key": _public_key_bytes(private_key)})
        body = _canonical(unsigned._fields())
        return unsigned.model_copy(update={"digest": hashlib.sha256(body).hexdigest(), "signature": private_key.sign(body)})

    def verify(self) -> Check:
        """Signature, integrity and signer binding."""
        body = _canonical(self._fields())
        if hashlib.sha256(body).hexdigest() != self.digest:
            return Check.ALTERED
        try:
            key = _public_key(self.public_key)
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
    public_key: PublicKey = b""  # signer's RSA identity key (OpenSSH form); set by sign()
    receipt_key: Annotated[bytes, Field(max_length=32)] = b""  # signer's Ed25519 receipt key (raw); set by sign()
    key_certificate: Signature = b""  # the identity key's signature over the receipt key; set by sign()
    digest: BodyDigest = ""  # sha256 hex of the canonical body; set by sign()
    signature: Signature = b""  # Ed25519, by the receipt key, over the canonical body; set by sign()

    @model_validator(mode="after")
    def _span_not_empty(self) -> Receipt:
        check_span(self.block_start, self.block_end)
        return self

    def _signer(self) -> str:
        return self.signer

    def sign(self, private_key: RSAPrivateKey) -> Self:
        """Signed with the receipt key of the identity key `private_key` (made and certified on first use)."""
        delegate = _receipt_key(private_key)
        unsigned = self.model_copy(update={"public_key": _public_key_bytes(private_key),
                                           "receipt_key": delegate.public, "key_certificate": delegate.certificate})
        body = _canonical(unsigned._fields())
        return unsigned.model_copy(update={"digest": hashlib.sha256(body).hexdigest(),
                                           "signature": delegate.private.sign(body)})

    def verify(self) -> Check:
        """Integrity, the receipt key's certificate by the identity key, the signature, and signer binding."""
        body = _canonical(self._fields())
        if hashlib.sha256(body).hexdigest() != self.digest:
            return Check.ALTERED
        key = _certified_receipt_key(self.public_key, self.receipt_key, self.key_certificate)
        if key is None:
            return Check.FORGED
        try:
            key.verify(self.signature, body)
        except InvalidSignature:
            return Check.FORGED
        if _peer_id_of(self.public_key) != self._signer():
            return Check.IMPERSONATED
        return Check.OK


class Evidence(_Message):
    """Enough of a checked step to re-run it without the subject: the hop's earlier inputs (float16, to fit),
    and the step's own input and the subject's output exactly as received, so their digests match the
    subject's receipt. Any node can re-run `prefix + inputs` on other peers serving those blocks and compare
    the result with `output`. Travels inside a "fail" attestation, signed with it; over MAX_EVIDENCE_BYTES,
    the attestation travels without it (an accusation only)."""

    position: Count  # tokens the hop held before the step: the prefix's length
    batch: Count
    new: Count  # the step's tokens
    hidden: Count
    dtype: Name  # of `inputs` and `output`, one of EVIDENCE_DTYPES
    prefix: EvidenceBytes  # float16, (batch, position, hidden), row-major
    inputs: EvidenceBytes  # dtype, (batch, new, hidden)
    output: EvidenceBytes  # dtype, (batch, new, hidden)

    @model_validator(mode="after")
    def _sizes_agree(self) -> Evidence:
        if self.dtype not in EVIDENCE_DTYPES:
            raise ValueError(f"evidence dtype must be one of {sorted(EVIDENCE_DTYPES)}, not {self.dtype!r}")
        if self.batch < 1 or self.new < 1 or self.hidden < 1:
            raise ValueError("evidence needs at least one row, one token and one channel")
        itemsize = EVIDENCE_DTYPES[self.dtype].itemsize
        expected = (self.batch * self.position * self.hidden * 2, self.batch * self.new * self.hidden * itemsize)
        if (len(self.prefix), len(self.inputs), len(self.output)) != (expected[0], expected[1], expected[1]):
            raise ValueError("evidence tensors do not match their declared shapes")
        if len(self.prefix) + len(self.inputs) + len(self.output) > MAX_EVIDENCE_BYTES:
            raise ValueError(f"evidence is over {MAX_EVIDENCE_BYTES} bytes")
        return self

    @classmethod
    def of_step(
        cls, history: Sequence[torch.Tensor], inputs: torch.Tensor, output: torch.Tensor, cap: int = MAX_EVIDENCE_BYTES
    ) -> Evidence | None:
        """Evidence of one step: `history` is every input the hop received so far, this step's last (a
        StepRecord's); None when it would be over `cap` bytes or the tensors are of an unsupported dtype."""
        dtype = str(inputs.dtype).removeprefix("torch.")
        if dtype not in EVIDENCE_DTYPES or output.dtype != inputs.dtype or output.shape != inputs.shape or inputs.ndim != 3:
            return None
        batch, new, hidden = inputs.shape
        held = sum(int(chunk.shape[1]) for chunk in history)
        position = max(held - new, 0)
        size = batch * hidden * (2 * position + 2 * new * inputs.element_size())
        if size > cap or batch < 1 or new < 1:
            return None
        if position:
            prefix = torch.cat([chunk.detach().to("cpu") for chunk in history], dim=1)[:, :position]
            prefix_bytes = _raw(prefix.to(torch.float16))
        else:
            prefix_bytes = b""
        return cls(position=position, batch=batch, new=new, hidden=hidden, dtype=dtype, prefix=prefix_bytes,
                   inputs=_raw(inputs), output=_raw(output))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prefix as float16, inputs, output), each (batch, tokens, hidden)."""
        dtype = EVIDENCE_DTYPES[self.dtype]

        def load(data: bytes, dt: torch.dtype, tokens: int) -> torch.Tensor:
            if not data:
                return torch.zeros(self.batch, tokens, self.hidden, dtype=dt)
            return torch.frombuffer(bytearray(data), dtype=dt).reshape(self.batch, tokens, self.hidden)

        return load(self.prefix, torch.float16, self.position), load(self.inputs, dtype, self.new), load(self.output, dtype, self.new)

    def matches(self, receipt: Receipt) -> bool:
        """Whether the step's input and output are exactly those the subject signed for."""
        _, inputs, output = self.tensors()
        return tensor_digest(inputs) == receipt.input_digest and tensor_digest(output) == receipt.output_digest


def _raw(t: torch.Tensor) -> bytes:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


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
    puzzle_nonce: PuzzleNonce = b""  # solves the checker's identity puzzle; without it nodes ignore the verdict
    evidence: Evidence | None = None  # "fail" only: enough of the step to re-run it (None when over the cap)
    public_key: PublicKey = b""
    digest: BodyDigest = ""
    signature: Signature = b""

    @model_validator(mode="after")
    def _evidence_only_for_faults(self) -> Attestation:
        if self.evidence is not None and self.verdict != "fail":
            raise ValueError("only a fail verdict carries evidence")
        return self

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
        elif att.evidence is not None and not att.evidence.matches(att.receipt):
            result = Check.BAD_EVIDENCE
        elif not att.issued_at <= now <= att.expires_at:
            result = Check.EXPIRED
        elif att.nonce in seen_nonces:
            result = Check.REPLAYED
    if result is not Check.OK:
        logger.debug("dropping attestation by %s about %s: %s", att.checker, att.subject, result.value)
    return result


class Countersigned(_Message):
    """A client's signature over a receipt: "I received this work in my session, and I sent `tokens` (batch x
    tokens, cumulative) through that hop". The ledger's input: it pays min(receipt.tokens, tokens) x blocks,
    weighted by the client's own trust, so a receipt claiming more than the client sent earns nothing extra and
    a client nobody trusts mints nothing."""

    receipt: Receipt
    client: PeerIdText  # base58 peer id of the client
    tokens: Count  # what the client sent through the hop, by its own count
    puzzle_nonce: PuzzleNonce  # solves the client's identity puzzle
    public_key: PublicKey  # client's RSA key (OpenSSH form)
    signature: Signature  # over _body(): the receipt's digest, the client, its count and its puzzle nonce

    def _body(self) -> bytes:
        return _pack({"receipt": self.receipt.digest, "client": self.client, "tokens": self.tokens,
                      "puzzle_nonce": self.puzzle_nonce, "public_key": self.public_key})

    @classmethod
    def make(cls, receipt: Receipt, client: str, private_key: RSAPrivateKey, tokens: int,
             puzzle_nonce: bytes = b"") -> Countersigned:
        key = private_key.get_public_key().to_bytes()
        unsigned = cls(receipt=receipt, client=client, tokens=tokens, puzzle_nonce=puzzle_nonce, public_key=key,
                       signature=b"")
        return unsigned.model_copy(update={"signature": private_key.sign(unsigned._body())})

    def verify(self) -> Check:
        if self.receipt.verify() is not Check.OK:
            return Check.BAD_EVIDENCE
        try:
            ok = RSAPublicKey.from_bytes(self.public_key).verify(self._body(), self.signature)
        except Exception:  # unparsable key
            ok = False
        if not ok:
            return Check.FORGED
        return Check.OK if _peer_id_of(self.public_key) == self.client else Check.IMPERSONATED
