"""Dial-back: a node asks another to open a fresh connection to it, to learn whether strangers can dial it.

RPC `rpc_dial_back` (handler on bootstrap nodes and directly reachable peers, caller `call_dial_back`): the helper
dials the requester's listening TCP ports at the IP address the request came from (never an address the requester
names, so a helper cannot be made to dial third parties). Behind NAT without inbound forwarding that fails, which
is the answer sought. The reply also says whether the helper relays (`swarm.relays`).

The dialer is a throwaway p2p daemon with an identity of its own, so an existing connection between the two
nodes cannot answer for a new one; the libp2p handshake proves that the requester's identity answered. One
check runs at a time per helper; others get "busy" at once and ask again.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Annotated, Awaitable, Callable, Sequence

from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils.multiaddr import Multiaddr
from pydantic import Field

from swarm.errors import ProtocolError
from swarm.protocol import PROTOCOL_VERSION, WireModel, handle_name, pack, unpack

logger = logging.getLogger(__name__)

MAX_ADDRESSES = 8  # listening addresses a request may carry
DIAL_TIMEOUT = 5.0  # seconds the helper's dialer tries before it calls the requester unreachable

Address = str  # a multiaddr, as text


class DialBackRequest(WireModel):
    version: int = PROTOCOL_VERSION
    addresses: list[Annotated[str, Field(max_length=256)]] = Field(default_factory=list, max_length=MAX_ADDRESSES)  # where it listens


class DialBackReply(WireModel):
    version: int = PROTOCOL_VERSION
    checked: bool  # a dial was attempted (False: see `error`)
    reachable: bool = False  # the dial reached the requester
    dialed: list[str] = Field(default_factory=list, max_length=MAX_ADDRESSES)  # what the helper dialled
    relays: bool = False  # the helper forwards to nodes that cannot be dialled (swarm.relays)
    error: str = Field(default="", max_length=512)


def is_circuit(address: Address) -> bool:
    """A libp2p circuit-relay address (.../p2p/<relay>/p2p-circuit/...): not a direct one."""
    return "p2p-circuit" in address.strip("/").split("/")


def dial_targets(listening: Sequence[Address], observed: Address | None) -> list[Address]:
    """The addresses to dial back: each TCP port the requester listens on, at the IP address its request came from.

    `observed` is the remote address of the helper's connection to the requester (None or a circuit: no target).
    """
    if observed is None or is_circuit(observed):
        return []
    parts = observed.strip("/").split("/")
    if len(parts) < 2 or parts[0] not in ("ip4", "ip6"):
        return []
    family, ip = parts[0], parts[1]
    targets: list[Address] = []
    for address in listening:
        fields = address.strip("/").split("/")
        if is_circuit(address) or len(fields) < 4 or fields[0] != family or fields[2] != "tcp":
            continue
        target = f"/{family}/{ip}/tcp/{fields[3]}"
        if target not in targets:
            targets.append(target)
    return targets[:MAX_ADDRESSES]


Dialer = Callable[[PeerID, list[Address]], Awaitable[bool]]


async def dial_with_fresh_node(peer_id: PeerID, addresses: list[Address], timeout: float = DIAL_TIMEOUT) -> bool:
    """Whether a brand-new node (own daemon, own identity) can connect to `peer_id` at one of `addresses`."""
    dialer = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], dht_mode="client", auto_nat=False, nat_port_map=False)
    try:
        # hivemind has no public connect(); its own identity check uses the daemon client's the same way
        await asyncio.wait_for(dialer._client.connect(peer_id, [Multiaddr(a) for a in addresses]), timeout)
        return True
    except Exception as e:  # refused, timed out, wrong identity: all mean "not reachable there"
        logger.debug(f"Dial-back to {peer_id} at {addresses} failed: {e!r}")
        return False
    finally:
        await dialer.shutdown()


class DialBackService(ServicerBase):
    """The `rpc_dial_back` handler (see the module docstring)."""

    def __init__(self, relays: bool, dialer: Dialer = dial_with_fresh_node):
        self.relays = relays  # whether this node's daemon relays for others (told to requesters)
        self.dialer = dialer
        self._p2p: P2P | None = None
        self._busy = asyncio.Lock()

    @classmethod
    def _get_handle_name(cls, namespace: str | None, method_name: str) -> str:
        return handle_name("DialBack", namespace, method_name)

    async def add_p2p_handlers(self, p2p: P2P, *args, **kwargs) -> None:
        self._p2p = p2p
        await super().add_p2p_handlers(p2p, *args, **kwargs)

    def _reply(self, **fields) -> runtime_pb2.ExpertResponse:
        return runtime_pb2.ExpertResponse(metadata=pack(DialBackReply(relays=self.relays, **fields)))

    async def rpc_dial_back(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        try:
            meta = unpack(request.metadata, DialBackRequest)
        except ProtocolError as e:
            return self._reply(checked=False, error=f"bad request: {e}")
        if self._busy.locked():
            return self._reply(checked=False, error="busy: another dial-back check is running")
        async with self._busy:
            targets, error = await self._targets(meta, context.remote_id)
            if not targets:
                return self._reply(checked=False, error=error)
            reachable = await self.dialer(context.remote_id, targets)
        logger.debug(f"Dial-back to {context.remote_id} at {targets}: {'reachable' if reachable else 'unreachable'}")
        return self._reply(checked=True, reachable=reachable, dialed=targets)

    async def _targets(self, meta: DialBackRequest, requester: PeerID) -> tuple[list[Address], str]:
        observed = await self._connection_address(requester)
        targets = dial_targets(meta.addresses, observed)
        return targets, "" if targets else f"no TCP address to dial back (request came from {observed})"

    async def _connection_address(self, peer_id: PeerID) -> Address | None:
        """The remote address of a direct connection to `peer_id`, if any."""
        assert self._p2p is not None
        for info in await self._p2p.list_peers():
            if info.peer_id == peer_id:
                for address in map(str, info.addrs):
                    if not is_circuit(address):
                        return address
        return None


async def call_dial_back(p2p: P2P, helper: PeerID, request: DialBackRequest, timeout: float = 20.0,
                         busy_wait: float = 20.0) -> DialBackReply | None:
    """The helper's answer, or None when it does not answer (down, or a version without dial-back).

    A busy helper (checking another node) is asked again for up to `busy_wait` seconds.
    """
    stub = DialBackService.get_stub(p2p, helper)
    deadline = asyncio.get_running_loop().time() + busy_wait
    while True:
        try:
            raw = await stub.rpc_dial_back(runtime_pb2.ExpertRequest(uid="", metadata=pack(request)), timeout=timeout)
            reply = unpack(raw.metadata, DialBackReply)
        except Exception as e:  # unreachable, no such handler, junk: this helper cannot tell
            logger.debug(f"Dial-back request to {helper} failed: {e!r}")
            return None
        if reply.checked or not reply.error.startswith("busy") or asyncio.get_running_loop().time() > deadline:
            return reply
        await asyncio.sleep(random.uniform(0.2, 0.6))
