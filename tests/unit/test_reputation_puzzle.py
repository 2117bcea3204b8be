"""The identity puzzle: solutions verify, wrong ones do not, the cost doubles per bit, and the solution is kept
beside the identity file (never beside a temporary one)."""

from __future__ import annotations

import hashlib

import pytest
from hivemind.utils.crypto import RSAPrivateKey

from reputation import identity_puzzle
from reputation.identity_puzzle import leading_zero_bits, load_or_solve, sidecar_path, solve, solve_in_background, verify
from swarm.network import load_identity


@pytest.fixture(scope="module")
def public_key() -> bytes:
    return RSAPrivateKey().get_public_key().to_bytes()


def test_a_solution_verifies_and_others_do_not(public_key) -> None:
    nonce = solve(public_key, 12)
    assert verify(public_key, nonce, 12) and verify(public_key, nonce, 0)
    assert leading_zero_bits(hashlib.sha256(public_key + nonce).digest()) >= 12
    tries = [i.to_bytes(8, "big") for i in range(int.from_bytes(nonce, "big"))]
    assert not any(verify(public_key, t, 12) for t in tries)  # solve returns the first solution
    assert not verify(public_key, b"x" * 33, 0) and not verify(public_key, "nonce", 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        verify(public_key, nonce, 65)


def test_leading_zero_bits() -> None:
    assert leading_zero_bits(b"\x00\x00\x01") == 23 and leading_zero_bits(b"\x80") == 0 and leading_zero_bits(b"\x00") == 8


def test_the_cost_grows_as_two_to_the_bits(public_key) -> None:
    keys = [RSAPrivateKey().get_public_key().to_bytes() for _ in range(8)]
    mean = {bits: sum(int.from_bytes(solve(k, bits), "big") + 1 for k in keys) / len(keys) for bits in (4, 10)}
    assert mean[10] > 8 * mean[4]  # 64x on average; loose, eight samples


def test_the_solution_is_kept_beside_the_identity_file(tmp_path, monkeypatch) -> None:
    identity = load_identity(tmp_path / "me.key")
    nonce = load_or_solve(identity, 10)
    path = sidecar_path(identity.path)
    assert path == tmp_path / "me.key.puzzle" and path.read_text().split() == ["10", nonce.hex()]
    monkeypatch.setattr(identity_puzzle, "solve_cached", lambda *a: pytest.fail("solved again"))
    assert load_or_solve(load_identity(tmp_path / "me.key"), 10) == nonce  # read back, not solved again
    monkeypatch.undo()
    path.write_text("garbage")
    assert load_or_solve(identity, 10) == nonce and path.read_text().split() == ["10", nonce.hex()]
    harder = load_or_solve(identity, 14)  # a stored nonce for fewer bits than asked is solved again
    assert verify(identity.private_key.get_public_key().to_bytes(), harder, 14)


def test_a_temporary_identity_solves_in_memory(tmp_path) -> None:
    identity = load_identity(None)
    try:
        future = solve_in_background(identity, 10)
        assert verify(identity.private_key.get_public_key().to_bytes(), future.result(timeout=60), 10)
        assert not sidecar_path(identity.path).exists()
    finally:
        identity.path.unlink(missing_ok=True)



def test_a_swarm_may_set_its_puzzle_difficulty_and_a_bad_value_is_one_clear_error(monkeypatch):
    from reputation.node import ReputationConfig
    from swarm.errors import ConfigError

    monkeypatch.setenv("SWARM_PUZZLE_BITS", "14")
    assert ReputationConfig().puzzle_bits == 14
    monkeypatch.delenv("SWARM_PUZZLE_BITS")
    assert ReputationConfig().puzzle_bits == identity_puzzle.DEFAULT_BITS
    for bad in ("lots", "-3", "65"):
        monkeypatch.setenv("SWARM_PUZZLE_BITS", bad)
        with pytest.raises(ConfigError, match="SWARM_PUZZLE_BITS must be a whole number of bits from 0 to 64"):
            ReputationConfig()
