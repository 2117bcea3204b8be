"""The client's configuration: one frozen dataclass, read once, passed down."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ClientConfig:
    initial_peers: tuple[str, ...]  # multiaddrs of any peers in the swarm
    missing_blocks_timeout: float = 60.0  # how long to wait for a peer to serve missing blocks
    request_timeout: float = 60.0  # one step or forward call, per hop
    ping_timeout: float = 3.0  # an info call used as a ping
    spans_ttl: float = 10.0  # seconds before the DHT is read again for a new route
    ping_ttl: float = 30.0  # seconds before a peer is pinged again
    spot_checks: bool = True  # re-run a sample of steps on other peers and keep trust scores (reputation/)
    settle_checks: bool = True  # before an answer is returned, wait for its spot checks and redo what a cheater touched
    check_rate: float | None = None  # a fixed spot-check rate for every peer; None: more for newcomers, less for trusted
    trusted_peers: tuple[str, ...] = ()  # peer ids of pre-trusted seeds whose verdicts count as this client's own
    gossip_period: float = 5.0  # seconds between exchanges of attestations with peers
    identity: Path | None = None  # key file the client signs verdicts with (None: a new one each run)
    route_on_evidence: bool = True  # routes weigh measured step times and trust; False: announced throughput only
    self_verify_bytes: int = 0  # memory for blocks this client loads itself to check hops nobody else serves (0: none)
    train_micro_batches: int = 1  # a training batch goes through the peers in this many pipelined micro-batches
    push: bool = True  # decode steps travel peer to peer (a push chain) on routes of 2+ directly reachable hops
    bundle_steps: bool = True  # concurrent sessions' steps to the same peer go in one message (`swarm.bundles`)

    @property
    def strict(self) -> bool:
        """Every step of every answer is checked, and answers wait for all their checks."""
        return self.spot_checks and self.check_rate is not None and self.check_rate >= 1.0


STRICT = {"check_rate": 1.0, "settle_checks": True}  # the client options of strict mode (`swarm-chat --strict`)
