"""Exceptions raised by the reputation package.

    ReputationError
    ├── AttestationError            a receipt or attestation must not be believed
    │   └── MalformedMessageError   bytes that do not decode to a known, versioned, well-typed message
    └── UnknownProfileError         no tolerance profile for a declared (dtype, quantisation, SVD rank)

Every message is one line that says what went wrong. A message that decodes but does not verify (forged, altered,
expired, replayed) is not an exception: `verify()` and `verify_attestation` return a `Check` saying which.
"""

from __future__ import annotations


class ReputationError(Exception):
    """Base class of every error the reputation package raises on purpose."""


class AttestationError(ReputationError):
    """A receipt or attestation failed verification and must be dropped."""


class MalformedMessageError(AttestationError):
    """The bytes are not a receipt/attestation of a version this code understands, with every field well-typed."""


class UnknownProfileError(ReputationError):
    """No tolerance profile matches the declared configuration; calibrate one before checking it."""
