"""What a new identity costs: the identity puzzle's solve time per difficulty, on one core (reputation.identity_puzzle).

Each row solves the puzzle for several fresh RSA identity keys (the kind peers and clients use) and reports
the median and mean CPU time per identity (the thread's own CPU seconds, so other load on a shared machine does
not inflate it), the hash rate, and what checking one solution costs. Solve times are geometric (each hash
succeeds with probability 2**-bits), so the median is about 0.69x the mean, and "expected" is 2**bits hashes
at the measured rate.

    .venv/bin/python benchmarks/identity_puzzle.py                 # about a minute
    .venv/bin/python benchmarks/identity_puzzle.py --bits 21 --keys 21
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hivemind.utils.crypto import RSAPrivateKey  # noqa: E402

from reputation.identity_puzzle import DEFAULT_BITS, solve, verify  # noqa: E402


def measure(bits: int, keys: int) -> dict[str, float]:
    seconds, hashes = [], 0
    for _ in range(keys):
        public_key = RSAPrivateKey().get_public_key().to_bytes()
        began = time.thread_time()
        nonce = solve(public_key, bits)
        seconds.append(time.thread_time() - began)
        hashes += int.from_bytes(nonce, "big") + 1
        assert verify(public_key, nonce, bits)
    began = time.thread_time()
    for _ in range(1000):
        verify(public_key, nonce, bits)
    return {
        "median": statistics.median(seconds),
        "mean": statistics.fmean(seconds),
        "max": max(seconds),
        "rate": hashes / sum(seconds),
        "verify_us": (time.thread_time() - began) / 1000 * 1e6,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[16, 18, 20, DEFAULT_BITS, 22])
    ap.add_argument("--keys", type=int, default=9, help="identities solved per difficulty")
    args = ap.parse_args(argv)
    print(f"identity puzzle: sha256(public key || nonce) with `bits` leading zero bits; {args.keys} fresh 2048-bit "
          f"RSA keys per row, one core; default {DEFAULT_BITS} bits")
    header = (f"{'bits':>4}  {'median CPU s':>12}  {'mean CPU s':>10}  {'max CPU s':>9}  {'expected s':>10}  "
              f"{'Mhash/s':>7}  {'verify us':>9}")
    print(header)
    for bits in args.bits:
        m = measure(bits, args.keys)
        expected = 2**bits / m["rate"]
        mark = "  <- default" if bits == DEFAULT_BITS else ""
        print(f"{bits:>4}  {m['median']:>12.2f}  {m['mean']:>10.2f}  {m['max']:>9.2f}  {expected:>10.2f}  "
              f"{m['rate'] / 1e6:>7.2f}  {m['verify_us']:>9.1f}{mark}")


if __name__ == "__main__":
    main()
