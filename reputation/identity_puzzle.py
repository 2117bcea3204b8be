"""What a new identity costs: an S/Kademlia-style static crypto puzzle on the identity key.

S/Kademlia (Baumgart and Mies, 2007) makes node ids expensive to mint with a puzzle bound to the key itself.
Here: find a nonce such that sha256(public key bytes || nonce) starts with `bits` zero bits. Solving takes
2**bits hashes on average; checking takes one. Every attestation and countersignature carries its signer's
nonce in the signed body, and a node ignores messages whose signer presents no valid solution, so each
Sybil identity that wants a voice pays the cost once. With the default, one identity costs 1.3 s of one core
here on average, median 0.9 s (`benchmarks/identity_puzzle.py`; results in `benchmarks/results/identity_puzzle.txt`).

A node solves once per identity key and keeps the nonce next to its identity file, in `<identity>.puzzle`
(temporary identities solve in memory).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import count
from pathlib import Path

from swarm.network import Identity

logger = logging.getLogger(__name__)

DEFAULT_BITS = 21  # 2M hashes: 1.3 s of one core here on average, median 0.9 s (see the benchmark)
MAX_BITS = 64
NONCE_BYTES = 8
SIDECAR_SUFFIX = "puzzle"


def _check_bits(bits: int) -> None:
    if not 0 <= bits <= MAX_BITS:
        raise ValueError(f"puzzle bits must be 0..{MAX_BITS}, got {bits}")


def leading_zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def verify(public_key: bytes, nonce: bytes, bits: int) -> bool:
    """Whether `nonce` solves the puzzle of `public_key` at `bits` (one hash)."""
    _check_bits(bits)
    if not isinstance(nonce, bytes) or not isinstance(public_key, bytes) or len(nonce) > 32:
        return False
    return leading_zero_bits(hashlib.sha256(public_key + nonce).digest()) >= bits


def solve(public_key: bytes, bits: int, start: int = 0) -> bytes:
    """The first nonce (8 bytes, counting from `start`) that solves the puzzle of `public_key` at `bits`."""
    _check_bits(bits)
    base = hashlib.sha256(public_key)
    threshold = 1 << (64 - bits)  # the digest's first 8 bytes, read as an integer, must be below this
    pack = struct.Struct(">Q").pack
    for i in count(start):
        nonce = pack(i & 0xFFFFFFFFFFFFFFFF)
        h = base.copy()
        h.update(nonce)
        if int.from_bytes(h.digest()[:8], "big") < threshold:
            return nonce
    raise AssertionError("unreachable")


@functools.lru_cache(maxsize=256)
def solve_cached(public_key: bytes, bits: int) -> bytes:
    """`solve`, remembered per key in this process (tests and tools build many nodes on a few keys)."""
    return solve(public_key, bits)


def sidecar_path(identity_path: Path) -> Path:
    return identity_path.with_name(f"{identity_path.name}.{SIDECAR_SUFFIX}")


def _read_sidecar(path: Path, public_key: bytes, bits: int) -> bytes | None:
    """The nonce stored at `path` if it solves this key's puzzle at `bits` or more; None otherwise."""
    try:
        text = path.read_text().strip()
        nonce = bytes.fromhex(text.split()[-1])
    except (OSError, ValueError, IndexError):
        return None
    return nonce if verify(public_key, nonce, bits) else None


def load_or_solve(identity: Identity, bits: int = DEFAULT_BITS) -> bytes:
    """This identity's puzzle nonce: read from `<identity>.puzzle`, else solved (and saved there unless the
    identity is temporary). A stored nonce for fewer bits than asked is solved again."""
    public_key = identity.private_key.get_public_key().to_bytes()
    path = sidecar_path(identity.path)
    if not identity.temporary:
        nonce = _read_sidecar(path, public_key, bits)
        if nonce is not None:
            return nonce
    nonce = solve_cached(public_key, bits)
    if not identity.temporary:
        try:
            path.write_text(f"{bits} {nonce.hex()}\n")
            logger.info(f"Solved the identity puzzle ({bits} bits); saved in {path}")
        except OSError as e:  # a read-only directory only means solving again next time
            logger.warning(f"Cannot save the identity puzzle's solution in {path}: {e}")
    return nonce


def solve_in_background(identity: Identity, bits: int = DEFAULT_BITS) -> Future[bytes]:
    """`load_or_solve` in a thread, so opening a client or a peer does not wait for it."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="identity-puzzle")
    try:
        return executor.submit(load_or_solve, identity, bits)
    finally:
        executor.shutdown(wait=False)
