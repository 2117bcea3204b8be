"""Joining the DHT: multiaddr parsing, identity keys, and starting a hivemind node with clear errors."""

from __future__ import annotations

import logging
import os
import re
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.multiaddr import Multiaddr

from swarm.errors import ConfigError, SwarmConnectionError

logger = logging.getLogger(__name__)

INITIAL_PEERS_ENV = "SWARM_INITIAL_PEERS"


def split_multiaddrs(values: Iterable[str]) -> list[str]:
    """Accept several multiaddrs per value, comma- or space-separated; validate each."""
    addresses: list[str] = []
    for value in values:
        for part in value.replace(",", " ").split():
            try:
                maddr = Multiaddr(part)
            except Exception as e:  # multiaddr raises several error types for bad input
                raise ConfigError(f"invalid multiaddr {part!r}: {e}") from None
            if "p2p" not in [protocol.name for protocol in maddr.protocols()]:
                raise ConfigError(f"multiaddr {part!r} lacks the peer id (/p2p/...)")
            addresses.append(part)
    return addresses


def initial_peers_from(cli_values: Sequence[str], environ: dict[str, str] | None = None) -> list[str]:
    """--initial-peers if given, else $SWARM_INITIAL_PEERS, else none."""
    environ = os.environ if environ is None else environ
    if cli_values:
        return split_multiaddrs(cli_values)
    return split_multiaddrs([environ.get(INITIAL_PEERS_ENV, "")])


@dataclass(frozen=True)
class Identity:
    """A peer's long-lived RSA key: p2pd derives the peer id from it, and it signs DHT records."""

    path: Path
    private_key: RSAPrivateKey
    temporary: bool  # generated for this run only; deleted on shutdown


def trusted_peers_from(values: Sequence[str]) -> tuple[str, ...]:
    """--trusted-peers values, else $SWARM_TRUSTED_PEERS: peer ids, comma- or space-separated."""
    text = " ".join(values) if values else os.environ.get("SWARM_TRUSTED_PEERS", "")
    return tuple(part for part in text.replace(",", " ").split() if part)


def load_identity(path: Path | None) -> Identity:
    """Read (or create) an identity file in libp2p's protobuf format; a fresh throwaway one if no path."""
    temporary = path is None
    if path is None:
        fd, name = tempfile.mkstemp(prefix="efedllm-identity-")
        os.close(fd)
        path = Path(name)
        path.unlink()
    if not path.exists():
        if not path.parent.is_dir():
            raise ConfigError(f"cannot create identity file {path}: directory {path.parent} does not exist")
        key = RSAPrivateKey()
        proto = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=key.to_bytes())
        path.write_bytes(proto.SerializeToString())
        path.chmod(0o600)
        if not temporary:
            logger.info(f"Generated a new identity in {path}")
        return Identity(path, key, temporary)
    try:
        proto = crypto_pb2.PrivateKey.FromString(path.read_bytes())
        if proto.key_type != crypto_pb2.KeyType.RSA:
            raise ValueError("not an RSA key")
        key = RSAPrivateKey.__new__(RSAPrivateKey)
        key.__setstate__({"_private_key": proto.data})  # hivemind's own DER loader
    except Exception as e:  # protobuf and cryptography raise many types on a corrupt file
        raise ConfigError(f"identity file {path} is not a valid RSA identity: {e}") from None
    return Identity(path, key, temporary)


def create_dht(
    *,
    initial_peers: Sequence[str],
    host: str = "127.0.0.1",
    port: int = 0,
    identity: Identity | None = None,
    validators: Sequence = (),
    client_mode: bool = False,
    announce_host: str | None = None,
    announce_maddrs: Sequence[str] = (),
    check_identity: bool = True,
) -> DHT:
    """Start a hivemind DHT node; any failure becomes one SwarmConnectionError line.

    `announce_maddrs` (e.g. `/ip4/203.0.113.5/tcp/31337`) are the only addresses the node tells others to dial
    (p2pd's -announceAddrs replaces its listening addresses in what it announces); so is `announce_host` with the
    listening port.

    `check_identity=False` skips hivemind's check that no other node uses this identity (for a restart of this
    very node, which is known to be gone).
    """
    kwargs = dict(
        initial_peers=list(initial_peers),
        host_maddrs=[f"/ip4/{host}/tcp/{port}"],
        record_validators=list(validators),
        client_mode=client_mode,
        start=True,
        await_ready=True,
        startup_timeout=30,
        num_workers=4,
    )
    if identity is not None:
        kwargs["identity_path"] = str(identity.path)
    announce = list(announce_maddrs)
    if announce_host is not None and port:
        announce.append(f"/ip4/{announce_host}/tcp/{port}")
    if announce:
        kwargs["announce_maddrs"] = announce
    if not check_identity:
        kwargs["check_if_identity_free"] = False
    # The DHT process and its p2pd inherit an ignored SIGINT, so Ctrl+C in a terminal (sent to the whole
    # process group) reaches only the main process, which can still say goodbye through the DHT.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if threading.current_thread() is threading.main_thread() else None
    try:
        return DHT(**kwargs)
    except P2PDaemonError as e:
        reason = str(e).splitlines()[-1] if str(e) else type(e).__name__
        reason = re.sub(r"^Daemon failed to start: (\d{4}/\d\d/\d\d \d\d:\d\d:\d\d )?", "", reason)
        if "bootstrap" in reason:
            raise SwarmConnectionError(f"cannot reach any initial peer {list(initial_peers)}: {reason}") from None
        raise SwarmConnectionError(f"cannot start the DHT node on {host}:{port}: {reason}") from None
    except (RuntimeError, OSError, TimeoutError) as e:
        raise SwarmConnectionError(f"cannot join the swarm via {list(initial_peers)}: {e}") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def signer_for(identity: Identity) -> RSASignatureValidator:
    return RSASignatureValidator(identity.private_key)


def create_client_dht(
    initial_peers: Sequence[str], dht_prefix: str, num_blocks: int, identity: Identity | None = None
) -> DHT:
    """A client-mode DHT node (stores nothing for others) that checks this model's records.

    `identity` (default: a throwaway one) is the key the client signs its spot-check verdicts with.
    """
    from swarm.records import make_validators  # records builds on this module's primitives

    identity = identity or load_identity(None)
    try:
        validators = make_validators(dht_prefix, num_blocks, signer_for(identity))
        return create_dht(initial_peers=initial_peers, validators=validators, client_mode=True)
    finally:
        if identity.temporary:
            identity.path.unlink(missing_ok=True)
