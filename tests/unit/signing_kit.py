"""Messages signed by hand, exactly as the real signers sign them, so a test can make every field hold what it likes
(a wrong type, an oversized value) behind a genuine signature and digest."""

from __future__ import annotations

import hashlib

import msgpack
from hivemind.utils.crypto import RSAPrivateKey

from reputation.attest import WIRE_VERSION, _receipt_key


def _pack(pairs: list) -> bytes:
    return msgpack.packb(pairs, use_bin_type=True)


def sign_fields(fields: dict, key: RSAPrivateKey) -> bytes:
    """Encode `fields` as a receipt or attestation signed by `key` (a receipt by its receipt key, certified by `key`):
    valid signature and digest over whatever the fields hold, so only their types or sizes can be wrong."""
    fields = {**fields, "public_key": key.get_public_key().to_bytes()}
    delegate = _receipt_key(key) if "receipt_key" in fields else None
    if delegate is not None:
        fields.update(receipt_key=delegate.public, key_certificate=delegate.certificate)
    body = _pack([["version", WIRE_VERSION], *sorted([k, v] for k, v in fields.items() if k not in ("digest", "signature"))])
    signer = key if delegate is None else delegate.private
    fields.update(digest=hashlib.sha256(body).hexdigest(), signature=signer.sign(body))
    return _pack([["version", WIRE_VERSION], *sorted([k, v] for k, v in fields.items())])
