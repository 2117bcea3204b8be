"""Circuit relays (libp2p circuit relay v2): the relay options of a node's p2p daemon, and a DHT that passes them.

Every node's p2pd can relay for others: a node that cannot be dialled (behind NAT, no inbound ports) holds a
reservation on a few relays and announces `<relay multiaddr>/p2p-circuit` addresses; a client dials one of them,
and the relay splices the client's connection to the one the hidden node keeps open to it.

hivemind 1.1.12's `P2P.create` passes some of the daemon's relay flags (`use_relay`, `use_auto_relay`,
`force_reachability`, `announce_maddrs`) but not the relay service's switch, its limits, or `-relayDiscovery`
(`p2pd -h` of the bundled daemon lists them). `RelayDHT` starts its p2pd with those as well: in its own child
process, which hosts nothing but this DHT node, hivemind's DHT module is handed a `P2P` subclass that appends them
to the daemon's command line (Go's flag package lets the last value of a repeated flag win).

Relayed traffic is limited by the relay (the daemon's `-relay*` flags, `RelayLimits`), so one relay cannot be
drowned: a bounded number of reservations and of circuits per hidden node, a buffer per circuit, and a cap on the
bytes and the duration of each relayed connection. A connection that reaches a cap is reset, and the client fails
over as from any dropped peer (it reconnects through a relay, which opens a fresh circuit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from hivemind import DHT
from hivemind.p2p import P2P

CIRCUIT = "p2p-circuit"


@dataclass(frozen=True)
class RelayLimits:
    """What a relay grants the nodes behind it (p2pd `-relay*` flags; a connection past a cap is reset)."""

    max_reservations: int = 128  # nodes that may hold a slot on this relay at once (also the cap per IP address)
    max_circuits: int = 16  # relayed connections open at once to one node behind this relay
    buffer_bytes: int = 64 * 1024  # per relayed connection: at most 128 x 16 x 64 KiB = 128 MiB of buffers
    data_bytes: int = 4 * 2**30  # bytes one relayed connection may carry in each direction
    seconds: int = 30 * 60  # how long one relayed connection may last

    def flags(self) -> dict[str, object]:
        return {
            "relayMaxReservations": self.max_reservations,
            "relayMaxCircuits": self.max_circuits,
            "relayBufferSize": self.buffer_bytes,
            "relayDataLimit": self.data_bytes,
            "relayTimeLimit": f"{self.seconds}s",
        }


@dataclass(frozen=True)
class Relaying:
    """How one node takes part in relaying."""

    service: bool = True  # relay for nodes that cannot be dialled (off: --no-relay-service)
    through: tuple[str, ...] = ()  # multiaddrs (with /p2p/<id>) of the relays this node is reachable through;
    # empty: it is dialled directly
    limits: RelayLimits = field(default_factory=RelayLimits)

    @property
    def relayed(self) -> bool:
        return bool(self.through)


def circuit_address(relay: str) -> str:
    """The address a node announces when it is reachable through `relay` (a multiaddr ending in /p2p/<id>)."""
    return f"{relay.rstrip('/')}/{CIRCUIT}"


def relay_id(address: str) -> str | None:
    """The relay's peer id in a circuit address (.../p2p/<relay>/p2p-circuit[/p2p/<node>]), else None."""
    parts = address.strip("/").split("/")
    if CIRCUIT not in parts:
        return None
    before = parts[: parts.index(CIRCUIT)]
    return before[-1] if len(before) >= 2 and before[-2] == "p2p" else None


def is_circuit(address: str) -> bool:
    return CIRCUIT in address.strip("/").split("/")


def daemon_flags(relaying: Relaying) -> dict[str, object]:
    """The p2pd flags hivemind's `P2P.create` does not pass itself (see the module docstring)."""
    flags: dict[str, object] = {"relayService": relaying.service and not relaying.relayed}
    if flags["relayService"]:
        flags.update(relaying.limits.flags())
    if relaying.relayed:
        # Reserve on exactly these relays, now: with discovery on, autorelay waits for 4 candidates or 3 minutes.
        flags["relayDiscovery"] = False
        flags["trustedRelays"] = ",".join(relaying.through)
    return flags


def p2p_options(relaying: Relaying) -> dict[str, object]:
    """Keyword arguments of hivemind's `P2P.create` (through `DHT`) for this node's relaying."""
    if not relaying.relayed:
        return {}
    return {
        "use_auto_relay": True,  # keep reservations on the relays (the daemon's autorelay)
        "force_reachability": "private",  # reserve at once rather than after AutoNAT has made up its mind
        # Announce the circuits explicitly: autorelay announces only relays at public IP addresses.
        "announce_maddrs": [circuit_address(relay) for relay in relaying.through],
    }


def _p2p_with_flags(flags: Mapping[str, object]) -> type[P2P]:
    class FlaggedP2P(P2P):
        @staticmethod
        def _make_process_args(*args, **kwargs) -> list[str]:
            return P2P._make_process_args(*args, **{**kwargs, **flags})

    return FlaggedP2P


class RelayDHT(DHT):
    """A hivemind DHT whose p2pd also gets `daemon_flags` (relay service, limits, static relays)."""

    def __init__(self, *args, daemon_flags: Mapping[str, object], **kwargs):
        self._daemon_flags = dict(daemon_flags)
        super().__init__(*args, **kwargs)

    def run(self) -> None:
        import hivemind.dht.node as node_module

        # This runs in the DHT's child process only, before its node (and so its p2pd) is created.
        node_module.P2P = _p2p_with_flags(self._daemon_flags)
        super().run()

