"""Tests of swarm.network's pure parts: multiaddr parsing, initial peers, identity files (no DHT started)."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2

from swarm.errors import ConfigError
from swarm.network import INITIAL_PEERS_ENV, create_dht, initial_peers_from, load_identity, signer_for, split_multiaddrs


def peer_id(name: str) -> str:
    return PeerID(b"\x12\x20" + hashlib.sha256(name.encode()).digest()).to_base58()


A = f"/ip4/127.0.0.1/tcp/31337/p2p/{peer_id('a')}"
B = f"/ip4/10.0.0.2/tcp/4001/p2p/{peer_id('b')}"
C = f"/ip6/::1/tcp/5000/p2p/{peer_id('c')}"


# --- multiaddrs ---


@pytest.mark.parametrize(
    "values, expected",
    [
        ([A], [A]),
        ([f"{A},{B}"], [A, B]),
        ([f"{A}, {B}"], [A, B]),
        ([f"{A} {B}"], [A, B]),
        ([f"  {A}\t{B}\n"], [A, B]),
        ([A, f"{B},{C}"], [A, B, C]),
        ([""], []),
        ([], []),
        ([" , "], []),
    ],
)
def test_split_multiaddrs(values, expected):
    assert split_multiaddrs(values) == expected


@pytest.mark.parametrize("bad", ["not-a-multiaddr", "/ip4/999.1.1.1/tcp/1/p2p/x", "/ip4/127.0.0.1/tcp/notaport", "/nonsense/1"])
def test_invalid_multiaddr_is_one_line_config_error(bad):
    with pytest.raises(ConfigError, match="invalid multiaddr") as info:
        split_multiaddrs([f"{A},{bad}"])
    assert bad in str(info.value)
    assert "\n" not in str(info.value)


def test_multiaddr_without_peer_id_is_config_error():
    with pytest.raises(ConfigError, match="/p2p/") as info:
        split_multiaddrs(["/ip4/127.0.0.1/tcp/31337"])
    assert "\n" not in str(info.value)


# --- initial peers ---


def test_cli_values_win_over_the_environment():
    assert initial_peers_from([A], environ={INITIAL_PEERS_ENV: B}) == [A]


def test_environment_is_used_without_cli_values():
    assert initial_peers_from([], environ={INITIAL_PEERS_ENV: f"{A},{B}"}) == [A, B]


def test_no_initial_peers_anywhere():
    assert initial_peers_from([], environ={}) == []


def test_bad_environment_value_is_config_error():
    with pytest.raises(ConfigError):
        initial_peers_from([], environ={INITIAL_PEERS_ENV: "garbage"})


def test_process_environment_is_read_when_none_is_given(monkeypatch):
    monkeypatch.setenv(INITIAL_PEERS_ENV, C)
    assert initial_peers_from([]) == [C]


# --- identity ---


def public_key(identity) -> bytes:
    return identity.private_key.get_public_key().to_bytes()


def test_identity_is_created_then_reloaded(tmp_path):
    path = tmp_path / "peer.id"
    created = load_identity(path)
    assert path.exists() and not created.temporary and created.path == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    proto = crypto_pb2.PrivateKey.FromString(path.read_bytes())  # libp2p's format, which p2pd reads
    assert proto.key_type == crypto_pb2.KeyType.RSA

    reloaded = load_identity(path)
    assert reloaded.private_key.to_bytes() == created.private_key.to_bytes()
    assert public_key(reloaded) == public_key(created)
    assert signer_for(reloaded).local_public_key == signer_for(created).local_public_key
    # the reloaded key really signs: the original public key verifies its signature
    assert created.private_key.get_public_key().verify(b"hello", reloaded.private_key.sign(b"hello"))


def test_identity_file_gives_a_stable_libp2p_peer_id(tmp_path):
    path = tmp_path / "peer.id"
    load_identity(path)
    first = PeerID.from_identity(path.read_bytes())  # how p2pd reads the file
    load_identity(path)
    assert PeerID.from_identity(path.read_bytes()) == first
    assert first.to_base58().startswith("Qm")  # sha256 multihash of an RSA public key


def test_different_files_are_different_identities(tmp_path):
    assert public_key(load_identity(tmp_path / "one")) != public_key(load_identity(tmp_path / "two"))


def test_temporary_identity(tmp_path):
    identity = load_identity(None)
    try:
        assert identity.temporary and identity.path.exists()
        assert crypto_pb2.PrivateKey.FromString(identity.path.read_bytes()).key_type == crypto_pb2.KeyType.RSA
    finally:
        identity.path.unlink(missing_ok=True)


@pytest.mark.parametrize(
    "content",
    [
        b"this is not a protobuf \xff\xfe",
        b"",
        crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=b"not DER").SerializeToString(),
        crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.Ed25519, data=b"\x01" * 64).SerializeToString(),
    ],
    ids=["garbage", "empty", "bad-der", "not-rsa"],
)
def test_corrupt_identity_file_is_one_line_config_error(tmp_path, content):
    path = tmp_path / "peer.id"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="not a valid RSA identity") as info:
        load_identity(path)
    assert str(path) in str(info.value)
    assert path.read_bytes() == content  # never overwritten


def test_identity_in_a_missing_directory_is_config_error(tmp_path):
    path = tmp_path / "no" / "such" / "dir" / "peer.id"
    with pytest.raises(ConfigError, match="does not exist"):
        load_identity(path)
    assert not path.parent.exists()


def test_identity_path_is_kept_as_given(tmp_path):
    path = Path(tmp_path) / "id.key"
    assert load_identity(path).path == path


def test_create_dht_announces_only_the_given_addresses(monkeypatch):
    """p2pd tells others to dial announce_maddrs instead of its listening addresses (a relay, a forwarded port)."""
    started: list[dict] = []
    monkeypatch.setattr("swarm.network.DHT", lambda **kwargs: started.append(kwargs))
    create_dht(initial_peers=[], port=4000, announce_maddrs=("/ip4/127.0.0.1/tcp/5000",))
    create_dht(initial_peers=[], port=4000)
    assert started[0]["host_maddrs"] == ["/ip4/127.0.0.1/tcp/4000"]
    assert started[0]["announce_maddrs"] == ["/ip4/127.0.0.1/tcp/5000"]
    assert "announce_maddrs" not in started[1]
