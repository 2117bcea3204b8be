"""How a peer is reached: dialled directly, through relays, or not at all; found out as it joins, kept while it serves.

`join_network` starts the peer's DHT node and asks the initial peers (and a few directly reachable peers) to dial it
back (`peers.dialback`). When none can, it starts the node again as a DHT client (other nodes would wait on a DHT
server they cannot dial) and registers with up to `MAX_RELAYS` of the helpers that relay (`swarm.relays`).
`--relay always` uses relays whatever the answer; `--relay never` uses none and says that clients cannot reach it.
While the peer serves, `RelayKeeper` renews its registrations and replaces a relay that went away.
The verdict and the choices are pure functions (`judge`, `needs_relay`, `relay_candidates`, `keep_relays`).
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

from hivemind import DHT
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, PeerID

from peers.dialback import DialBackReply, DialBackRequest, call_dial_back, is_circuit
from swarm.errors import SwarmConnectionError
from swarm.periodic import run_periodically
from swarm.records import PeerSpan, online_spans
from swarm.relays import RENEW_PERIOD, call_register

logger = logging.getLogger(__name__)

RELAY_MODES = ("auto", "always", "never")
MAX_RELAYS = 2  # relays a hidden peer keeps: one may go away while clients still reach it through the other
EXTRA_HELPERS = 2  # directly reachable peers asked besides the initial peers (more relays to choose from)
MISSED_RENEWALS = 2  # renewals a relay may miss in a row before it is replaced


@dataclass(frozen=True)
class Reachability:
    """What a peer found out about itself as it joined (announced in its `ServerInfo`)."""

    relays: tuple[str, ...] = ()  # peer ids of the relays it is reachable through (empty: dialled directly)
    reachable: bool = True  # False: nobody can dial it and it uses no relay


@dataclass(frozen=True)
class HelperAnswer:
    helper: PeerID
    reply: DialBackReply | None  # None: it did not answer


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


def relay_candidates(answers: Sequence[HelperAnswer]) -> list[PeerID]:
    """The helpers that said they relay, in the order asked."""
    return [a.helper for a in answers if a.reply is not None and a.reply.relays]


def keep_relays(current: Sequence[PeerID], missed: dict[PeerID, int], candidates: Sequence[PeerID],
                limit: int = MAX_RELAYS) -> tuple[list[PeerID], list[PeerID]]:
    """(relays kept, candidates to try next): a relay that missed `MISSED_RENEWALS` renewals in a row is dropped,
    and free places go to candidates not used (and not just dropped), in their order."""
    kept = [r for r in current if missed.get(r, 0) < MISSED_RENEWALS]
    dropped = set(current) - set(kept)
    spare = [c for c in candidates if c not in kept and c not in dropped]
    return kept, spare[: max(limit - len(kept), 0)]


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


def on_this_machine_only(host: str, initial_peers: Sequence[str]) -> bool:
    """A node listening on loopback only, joined through initial peers on loopback: a swarm on one machine, where
    every node can dial every other and nobody else can dial any (no check needed, no relay would help)."""
    def loopback(address: str) -> bool:
        fields = address.strip("/").split("/")
        return len(fields) >= 2 and (fields[:2] == ["ip6", "::1"] or (fields[0] == "ip4" and fields[1].startswith("127.")))

    return (host.startswith("127.") or host == "::1") and all(loopback(a) for a in initial_peers)


def public_peers(spans: Sequence[PeerSpan]) -> list[PeerID]:
    """Online peers that are dialled directly (the ones that may check others and relay for them)."""
    return [s.peer_id for s in online_spans(list(spans)) if s.info.reachable and not s.info.relayed]


def listening_port(dht: DHT) -> int | None:
    """The TCP port the node listens on (to start it again on the same one)."""
    for address in map(str, dht.get_visible_maddrs()):
        fields = address.strip("/").split("/")
        if len(fields) >= 4 and fields[2] == "tcp" and not is_circuit(address):
            return int(fields[3])
    return None


async def _daemon_address(_dht: DHT, node: DHTNode):
    return node.p2p.daemon_listen_maddr


async def own_replica(dht: DHT) -> P2P:
    """A fresh client of the DHT's p2p daemon for this caller's event loop (shut it down when done).

    Not `dht.replicate_p2p()`: that one is cached, and would stay tied to this short-lived event loop.
    """
    return await P2P.replicate(dht.run_coroutine(_daemon_address))


async def ask_helpers(dht: DHT, helpers: Sequence[PeerID]) -> list[HelperAnswer]:
    """Every helper's dial-back answer for this node's listening addresses."""
    p2p = await own_replica(dht)
    try:
        listening = [str(a) for a in await p2p.get_visible_maddrs(latest=True) if not is_circuit(str(a))]
        request = DialBackRequest(addresses=listening[:8])
        replies = await asyncio.gather(*(call_dial_back(p2p, helper, request) for helper in helpers))
        return [HelperAnswer(h, r) for h, r in zip(helpers, replies)]
    finally:
        await p2p.shutdown()


async def register(p2p: P2P, relay: PeerID) -> bool:
    """Whether `relay` took (or renewed) this node's registration."""
    try:
        reply = await call_register(p2p, relay)
    except Exception as e:  # unreachable, no relay service there, junk: not a relay for us
        logger.debug(f"Registering with relay {relay} failed: {e!r}")
        return False
    if not reply.ok:
        logger.debug(f"Relay {relay} refused: {reply.error}")
    return reply.ok


async def register_with_some(p2p: P2P, candidates: Sequence[PeerID], limit: int = MAX_RELAYS) -> list[PeerID]:
    """Register with candidates, in order, until `limit` took it; those that did."""
    taken: list[PeerID] = []
    for relay in candidates:
        if len(taken) >= limit:
            break
        if await register(p2p, relay):
            taken.append(relay)
    return taken


async def _register_from(dht: DHT, candidates: Sequence[PeerID]) -> list[PeerID]:
    p2p = await own_replica(dht)
    try:
        return await register_with_some(p2p, candidates)
    finally:
        await p2p.shutdown()


StartNode = Callable[[bool, "int | None"], DHT]  # (client_mode, port to start on again or None) -> a started node


def join_network(start: StartNode, *, mode: str, host: str, initial_peers: Sequence[str],
                 public_peers: Callable[[DHT], list[PeerID]]) -> tuple[DHT, Reachability, list[PeerID]]:
    """Start the node and find out how clients reach it; (node, reachability, relay candidates for later)."""
    dht = start(False, None)
    if not initial_peers or (mode != "always" and on_this_machine_only(host, initial_peers)):
        return dht, Reachability(), []  # the first node of a new swarm, or a swarm on one machine: nothing to ask
    answers = asyncio.run(ask_helpers(dht, helper_ids(initial_peers, _safe(public_peers, dht), dht.peer_id)))
    reachable = judge([a.reply for a in answers])
    candidates = relay_candidates(answers)
    if reachable is False:
        port = listening_port(dht)
        dht.shutdown()
        dht = start(True, port)
    if not needs_relay(mode, reachable):
        return dht, _report_direct(reachable, answers), candidates
    relays = asyncio.run(_register_from(dht, candidates))
    if not relays:
        if mode == "always":
            dht.shutdown()
            raise SwarmConnectionError("--relay always, but no initial peer took this peer's relay registration; "
                                       "check the initial peers, or start them without --no-relay-service")
        logger.warning("Not reachable: no helper could dial this peer and none of them relays for it, so clients "
                       "cannot use it; forward a port to it, or join through a bootstrap node that relays")
        return dht, Reachability(reachable=False), candidates
    why = "--relay always" if mode == "always" else "nobody could dial it directly: NAT or firewall"
    logger.info(f"Reachable only through relay {', '.join(map(str, relays))} ({why})")
    return dht, Reachability(relays=tuple(map(str, relays))), candidates


def _safe(public_peers: Callable[[DHT], list[PeerID]], dht: DHT) -> list[PeerID]:
    try:
        return public_peers(dht)
    except Exception as e:  # the DHT read failed: the initial peers alone will have to tell
        logger.debug(f"Reading the swarm's public peers failed: {e!r}")
        return []


def _report_direct(reachable: bool | None, answers: Sequence[HelperAnswer]) -> Reachability:
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


@dataclass
class RelayKeeper:
    """Renews a hidden peer's registrations every `period`, and replaces relays that stop answering."""

    p2p: P2P
    relays: list[PeerID]
    candidates: Callable[[], Awaitable[list[PeerID]]]  # relays to try when one goes away, in order of preference
    on_change: Callable[[list[PeerID]], None]  # told the new list whenever it changes
    period: float = RENEW_PERIOD
    missed: dict[PeerID, int] = field(default_factory=dict)

    async def run(self, stop: asyncio.Event) -> None:
        await run_periodically(self.renew, self.period, stop, name="renewing relay registrations")

    async def renew(self) -> None:
        results = await asyncio.gather(*(register(self.p2p, relay) for relay in self.relays))
        for relay, ok in zip(self.relays, results):
            self.missed[relay] = 0 if ok else self.missed.get(relay, 0) + 1
        kept, _ = keep_relays(self.relays, self.missed, [])
        if len(kept) == len(self.relays) and len(kept) >= MAX_RELAYS:
            return
        gone = [r for r in self.relays if r not in kept]
        kept, spare = keep_relays(self.relays, self.missed, await self.candidates())
        added = await register_with_some(self.p2p, spare, MAX_RELAYS - len(kept))
        relays = kept + added
        if relays == self.relays:
            return
        for relay in gone:
            self.missed.pop(relay, None)
        self.relays = relays
        lost = f" (relay {', '.join(map(str, gone))} went away)" if gone else ""
        if relays:
            logger.info(f"Reachable only through relay {', '.join(map(str, relays))} now{lost}")
        else:
            logger.warning(f"No relay left{lost}: clients cannot reach this peer until one takes it")
        self.on_change(relays)
