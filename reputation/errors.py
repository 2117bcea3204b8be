"""Exceptions raised by the reputation package.

    ReputationError
    ├── AttestationError            a receipt or attestation must not be believed
    │   ├── MalformedMessageError   bytes that do not decode to a known, versioned message
    │   ├── ForgedError             the signature does not verify, or the key is not the signer's
    │   ├── AlteredError            a field changed after signing (content does not match its signed digest)
    │   ├── ExpiredError            outside its validity window
    │   └── ReplayedError           its nonce was seen before
    └── UnknownProfileError         no tolerance profile for a declared (dtype, quantisation, SVD rank)

Every message is one line that says what went wrong.
"""

from __future__ import annotations


class ReputationError(Exception):
    """Base class of every error the reputation package raises on purpose."""


class AttestationError(ReputationError):
    """A receipt or attestation failed verification and must be dropped."""


class MalformedMessageError(AttestationError):
    """The bytes are not a receipt/attestation of a version this code understands."""


class ForgedError(AttestationError):
    """The signature is invalid or made with a key that does not belong to the claimed signer."""


class AlteredError(AttestationError):
    """The signed content was changed after signing."""


class ExpiredError(AttestationError):
    """The attestation is expired (or not yet valid)."""


class ReplayedError(AttestationError):
    """The attestation's nonce was already accepted once."""


class UnknownProfileError(ReputationError):
    """No tolerance profile matches the declared configuration; calibrate one before checking it."""
