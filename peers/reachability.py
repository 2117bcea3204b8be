"""How a peer is reached: dialled directly, through relays, or not at all; found out as it joins.

`join_network` starts the peer's DHT node and asks the initial peers (and a few directly reachable peers) to dial
it back (`peers.dialback`). When none can, it starts the node again, reachable through circuits on up to
`MAX_RELAYS` of the helpers that relay, and has each circuit confirmed by a dial through it. `--relay always`
relays without asking whether it is needed; `--relay never` stays direct and says that clients cannot reach it.
The verdict and the choice are pure functions (`judge`, `needs_relay`, `choose_relays`).
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Callable, Sequence

from hivemind import DHT
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, PeerID

from peers.dialback import DialBackReply, DialBackRequest, call_dial_back
from swarm.errors import SwarmConnectionError
from swarm.records import PeerSpan, online_spans
from swarm.relays import Relaying, is_circuit, relay_id

logger = logging.getLogger(__name__)

RELAY_MODES = ("auto", "always", "never")
MAX_RELAYS = 2  # circuits a relayed peer holds: one may go away while clients still reach it through the other
EXTRA_HELPERS = 2  # directly reachable peers asked besides the initial peers (more relays to choose from)
CONFIRM_ATTEMPTS = 20  # dials through a new circuit before giving up on it (the reservation takes a moment)
CONFIRM_DELAY = 0.5  # seconds between them


@dataclass(frozen=True)
class Reachability:
    """What a peer found out about itself as it joined (announced in its `ServerInfo`)."""

    relays: tuple[str, ...] = ()  # multiaddrs of the relays it is reachable through (empty: none needed or none used)
    reachable: bool = True  # False: nobody can dial it and it uses no relay

    @property
    def relay_ids(self) -> list[str]:
        return [relay_id(f"{address}/p2p-circuit") or address for address in self.relays]


@dataclass(frozen=True)
class HelperAnswer:
    helper: PeerID
    reply: DialBackReply | None  # None: it did not answer
    address: str | None  # where this node reaches the helper directly (multiaddr with /p2p/<id>), if connected


def judge(replies: Sequence[DialBackReply | None]) -> bool | None:
    """Reachable if any helper dialled it back, unreachable if some tried and none could, None if none tried."""
    tried = [r for r in replies if r is not None and r.checked]
    if not tried:
        return None
    return any(r.reachable for r in tried)


def needs_relay(mode: str, reachable: bool | None) -> bool:
    """--relay always: yes; never: no; auto: only when the helpers found the peer unreachable."""
    if mode not in RELAY_MODES:
        raise ValueError(f"unknown relay mode {mode!r}")
    return mode == "always" or (mode == "auto" and reachable is False)


def choose_relays(answers: Sequence[HelperAnswer], limit: int = MAX_RELAYS) -> list[str]:
    """The addresses of up to `limit` helpers that relay and that this node reaches directly, in the order asked."""
    chosen: list[str] = []
    for answer in answers:
        if answer.reply is not None and answer.reply.relays and answer.address and not is_circuit(answer.address):
            if answer.address not in chosen:
                chosen.append(answer.address)
    return chosen[:limit]


def helper_ids(initial_peers: Sequence[str], public_peers: Sequence[PeerID], own: PeerID,
               extra: int = EXTRA_HELPERS, rng: random.Random | None = None) -> list[PeerID]:
    """The initial peers (in order), then up to `extra` of `public_peers` picked at random; never this node."""
    helpers: list[PeerID] = []
    for address in initial_peers:
        peer_id = PeerID.from_base58(address.rstrip("/").split("/p2p/")[-1])
        if peer_id != own and peer_id not in helpers:
            helpers.append(peer_id)
    others = [p for p in public_peers if p != own and p not in helpers]
    rng = rng or random.Random()
    return helpers + rng.sample(others, min(extra, len(others)))


async def _daemon_address(_dht: DHT, node: DHTNode):
    return node.p2p.daemon_listen_maddr


async def own_replica(dht: DHT) -> P2P:
    """A fresh client of the DHT's p2p daemon, for this caller's event loop (shut it down when done).

    Not `dht.replicate_p2p()`: that one is cached and would be tied to this (short-lived) event loop.
    """
    return await P2P.replicate(dht.run_coroutine(_daemon_address))


async def _connection_address(p2p: P2P, peer_id: PeerID) -> str | None:
    for info in await p2p.list_peers():
        if info.peer_id == peer_id:
            for address in map(str, info.addrs):
                if not is_circuit(address):
                    return f"{address}/p2p/{peer_id}"
    return None


async def ask_helpers(dht: DHT, helpers: Sequence[PeerID]) -> list[HelperAnswer]:
    """Every helper's dial-back answer for this node's listening addresses, with where this node reaches it."""
    p2p = await own_replica(dht)
    try:
        listening = [str(a) for a in await p2p.get_visible_maddrs(latest=True) if not is_circuit(str(a))]
        request = DialBackRequest(addresses=listening[:8])
        replies = await asyncio.gather(*(call_dial_back(p2p, helper, request) for helper in helpers))
        return [HelperAnswer(h, r, await _connection_address(p2p, h)) for h, r in zip(helpers, replies)]
    finally:
        await p2p.shutdown()


async def confirm_relays(dht: DHT, relays: Sequence[str]) -> list[str]:
    """The relays through which a fresh node did reach this one (each relay dials through its own circuit)."""
    p2p = await own_replica(dht)
    try:
        async def confirm(relay: str) -> bool:
            helper = PeerID.from_base58(relay.rstrip("/").split("/p2p/")[-1])
            for _ in range(CONFIRM_ATTEMPTS):
                reply = await call_dial_back(p2p, helper, DialBackRequest(via=helper.to_base58()))
                if reply is not None and reply.reachable:
                    return True
                await asyncio.sleep(CONFIRM_DELAY)
            return False

        results = await asyncio.gather(*(confirm(r) for r in relays))
        return [relay for relay, ok in zip(relays, results) if ok]
    finally:
        await p2p.shutdown()


StartNode = Callable[[Relaying, "int | None"], DHT]  # (relaying, port when restarting the node) -> a started DHT node


def listening_port(dht: DHT) -> int | None:
    """The TCP port the node listens on (to restart it on the same one)."""
    for address in map(str, dht.get_visible_maddrs()):
        fields = address.strip("/").split("/")
        if len(fields) >= 4 and fields[2] == "tcp" and not is_circuit(address):
            return int(fields[3])
    return None


def public_peers(spans: Sequence[PeerSpan]) -> list[PeerID]:
    """Online peers that are dialled directly (the ones that may check others and relay for them)."""
    return [s.peer_id for s in online_spans(list(spans)) if s.info.reachable and not s.info.relayed]


def join_network(start: StartNode, *, mode: str, relay_service: bool, initial_peers: Sequence[str],
                 public_peers: Callable[[DHT], list[PeerID]]) -> tuple[DHT, Reachability]:
    """Start the node, find out whether strangers can dial it, and if needed restart it behind relays."""
    dht = start(Relaying(service=relay_service), None)
    if not initial_peers:
        return dht, Reachability()  # the first node of a new swarm: nobody to ask, nobody to relay
    answers = asyncio.run(ask_helpers(dht, helper_ids(initial_peers, _safe(public_peers, dht), dht.peer_id)))
    reachable = judge([a.reply for a in answers])
    if not needs_relay(mode, reachable):
        return dht, _report_direct(mode, reachable, answers)
    relays = choose_relays(answers)
    if not relays:
        if mode == "always":
            dht.shutdown()
            raise SwarmConnectionError("--relay always, but no initial peer answered as a relay; check the "
                                       "initial peers, or start them without --no-relay-service")
        logger.warning("Not reachable: no helper could dial this peer, and none of them relays; clients cannot use "
                       "it. Forward a port to it, or join through a bootstrap node that relays")
        return dht, Reachability(reachable=False)
    port = listening_port(dht)
    dht.shutdown()
    dht = start(Relaying(service=False, through=tuple(relays)), port)
    confirmed = asyncio.run(confirm_relays(dht, relays))
    if not confirmed:
        logger.warning(f"No relay confirmed a dial through its circuit yet; announcing {', '.join(relays)} anyway")
    reach = Reachability(relays=tuple(confirmed or relays))
    why = "--relay always" if mode == "always" else "nobody could dial it directly (NAT or firewall)"
    logger.info(f"Reachable only through relay {', '.join(reach.relay_ids)} ({why}); clients dial "
                f"{' or '.join(f'{r}/p2p-circuit' for r in reach.relays)}")
    return dht, reach


def _safe(public_peers: Callable[[DHT], list[PeerID]], dht: DHT) -> list[PeerID]:
    try:
        return public_peers(dht)
    except Exception as e:  # the DHT read failed: the initial peers alone will have to tell
        logger.debug(f"Reading the swarm's public peers failed: {e!r}")
        return []


def _report_direct(mode: str, reachable: bool | None, answers: Sequence[HelperAnswer]) -> Reachability:
    asked = len(answers)
    if reachable:
        dialled = sum(1 for a in answers if a.reply is not None and a.reply.reachable)
        logger.info(f"Reachable directly: {dialled} of {asked} helper(s) dialled this peer back")
        return Reachability()
    if reachable is None:
        logger.warning(f"Could not check whether this peer can be dialled: none of {asked} helper(s) answered a "
                       "dial-back request; serving directly (if it is behind NAT, start it with --relay always)")
        return Reachability()
    logger.warning("Not reachable: no helper could dial this peer and --relay never is set, so clients cannot "
                   "use it; forward a port to it, or drop --relay never")
    return Reachability(reachable=False)
