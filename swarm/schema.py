"""The one way this project types data that crosses the network: strict, frozen pydantic v2 models.

Every wire message and DHT record is a `StrictModel` (or protocol's `WireModel`, which derives from it): frozen,
strictly typed (no "5" for 5, no 5 for 5.0, no True for 1), unknown fields rejected, and every size capped, so
that whatever validates is safe to use as is. The field types below are the shared building blocks.
"""

from __future__ import annotations

from typing import Annotated

import msgpack
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

MAX_INT = 2**63 - 1  # the largest integer msgpack carries as a signed int


class StrictModel(BaseModel):
    """Base of wire models: frozen, strictly typed, unknown fields rejected."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")


def _exactly_float(value: object) -> object:
    # pydantic's strict float still takes an int; a record that needs any conversion is not well-formed
    if not isinstance(value, float):
        raise ValueError(f"expected a float, got {type(value).__name__}")
    return value


Float = Annotated[float, BeforeValidator(_exactly_float)]  # a float (NaN and infinities allowed)
FiniteFloat = Annotated[float, BeforeValidator(_exactly_float), Field(allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0, le=MAX_INT)]  # a non-negative integer


def first_error(e: ValidationError) -> str:
    """One line naming the first invalid field of a ValidationError."""
    first = e.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "message"
    return f"{where}: {first['msg']}"


def load_msgpack(data: object, limit: int, what: str) -> object:
    """msgpack-decode `data` of at most `limit` bytes; ValueError, one line naming `what`, for anything else."""
    if not isinstance(data, bytes):
        raise ValueError(f"{what} is {type(data).__name__}, not bytes")
    if len(data) > limit:
        raise ValueError(f"{what} is {len(data)} bytes, more than {limit}")
    try:
        return msgpack.unpackb(data, raw=False)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ValueError(f"{what} is not msgpack: {type(e).__name__}") from None


def check_span(start: int, end: int) -> None:
    """Blocks [start, end) must not be empty (a model validator's check)."""
    if not start < end:
        raise ValueError(f"blocks {start}:{end} are an empty span")
