"""The closed set of configurations a peer may declare: its compute dtype and its compression tag.

A spot check compares two executions under a tolerance calibrated for that pair of configurations, so a peer
may announce only configurations somebody can check. The grammar lives here, in the core, so the DHT record
validator (`swarm.records.ServerInfo`) refuses a peer announcing anything else when it announces; the peer's
own code (`peers.compression.options.compression_tag`) produces exactly these tags.

Compression tags:
    none | int8 | nf4                                   plain weights, or bitsandbytes int8 / nf4
    svd-<amount>-<method>[+int8|+nf4]                   low-rank factors (optionally quantised), where
        amount = rank<N> (N >= 1) | energy<F> (0 < F <= 1) | params<F> (0 < F < 1), F written as Python's
        format(F, "g") writes it (the canonical spelling, so one configuration has one tag)
        method = plain | aa (activation-aware)
"""

from __future__ import annotations

import re

DTYPES = ("float32", "bfloat16", "float16")
QUANT_KINDS = ("none", "int8", "nf4")
SVD_METHOD_TAGS = ("plain", "aa")

_SVD = re.compile(r"svd-(rank|energy|params)([0-9][0-9.e+-]*)-(plain|aa)")


def known_dtype(dtype: str) -> bool:
    return dtype in DTYPES


def _svd_amount_ok(kind: str, text: str) -> bool:
    if kind == "rank":
        return text.isdigit() and text == str(int(text)) and 1 <= int(text) <= 1_000_000
    try:
        value = float(text)
    except ValueError:
        return False
    if format(value, "g") != text:
        return False
    return 0.0 < value <= 1.0 if kind == "energy" else 0.0 < value < 1.0


def split_compression(tag: str) -> tuple[str | None, str] | None:
    """(SVD part or None, quantisation) of a known tag, or None for a tag outside the grammar."""
    if not isinstance(tag, str) or len(tag) > 64:
        return None
    if tag in QUANT_KINDS:
        return None, tag
    svd, plus, quant = tag.partition("+")
    if plus and quant not in ("int8", "nf4"):
        return None
    match = _SVD.fullmatch(svd)
    if match is None or not _svd_amount_ok(match.group(1), match.group(2)):
        return None
    return svd, quant if plus else "none"


def comparable(a: str, b: str) -> bool:
    """Whether peers declaring compressions `a` and `b` can check each other: both known, with the same SVD factors
    (or none); every dtype and quantisation pair has a calibrated tolerance (reputation.tolerance)."""
    split_a, split_b = split_compression(a), split_compression(b)
    return split_a is not None and split_b is not None and split_a[0] == split_b[0]


def known_compression(tag: str) -> bool:
    """Whether `tag` is a compression a peer may declare (see the module docstring)."""
    return split_compression(tag) is not None
