"""`swarm-peer health`: ask the peer running on this machine whether it serves (a container health check).

The peer is found from what the operator already configured: its port and its identity file (the peer
id is derived from the key), so the check needs no extra state written by the peer.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from hivemind.p2p import P2P, PeerID

from swarm.errors import SwarmError
from swarm.remote import call_info


@dataclass(frozen=True)
class HealthResult:
    healthy: bool
    message: str


def local_multiaddr(host: str, port: int, identity: Path) -> tuple[PeerID, str]:
    """The peer id behind `identity` and the multiaddr of that peer listening on host:port."""
    peer_id = PeerID.from_identity(identity.read_bytes())
    return peer_id, f"/ip4/{host}/tcp/{port}/p2p/{peer_id}"


def check_health(host: str, port: int, identity: Path, dht_only: bool, timeout: float) -> HealthResult:
    """Healthy: the node accepts a connection and (unless `dht_only`, e.g. for a bootstrap node) serves blocks.

    A bare P2P node is enough to ask (no DHT process of our own), which keeps a check cheap.
    """
    if not identity.is_file():
        return HealthResult(False, f"no identity file {identity} yet: the peer has not started")
    try:
        peer_id, maddr = local_multiaddr(host, port, identity)
    except Exception as e:  # protobuf/cryptography raise many types on a corrupt key file
        return HealthResult(False, f"cannot read the peer id from {identity}: {e}")

    async def ask() -> HealthResult:
        try:
            p2p = await asyncio.wait_for(P2P.create(initial_peers=[maddr]), timeout)
        except Exception as e:  # p2pd reports a failed bootstrap with several error types
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            return HealthResult(False, f"node {peer_id} at {maddr} does not answer: {reason}")
        try:
            if dht_only:
                return HealthResult(True, f"node {peer_id} answers")
            try:
                info, rtt = await call_info(p2p, peer_id, timeout=timeout)
            except SwarmError as e:
                return HealthResult(False, f"peer {peer_id} does not serve blocks yet: {e}")
            return HealthResult(
                True,
                f"peer {peer_id} serves blocks {info.start}:{info.end} ({info.sessions} sessions, "
                f"{info.cache_tokens_left} cache tokens left, rtt {rtt * 1000:.1f} ms)",
            )
        finally:
            await p2p.shutdown()

    return asyncio.run(ask())
