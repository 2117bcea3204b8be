"""Spreading attestations and countersigned receipts to every node: push-pull anti-entropy over hivemind RPC.

hivemind's Python bindings expose no pubsub calls to drive the bundled p2pd's gossipsub, so nodes reconcile
their stores in pairs instead. Every `period` a node picks a few random peers and sends the ids it holds; the
other side answers with the messages the caller lacks and its own ids; the caller pushes back what the other
side lacks. Messages are verified by the receiving node (`ReputationNode.ingest`) before they are stored or
passed on; duplicates are dropped by id; each sender gets a token bucket of messages and is ignored for a
while after sending too many invalid ones (an exchange that does not validate, say one with a message of an
unknown kind or over its size, is one invalid message, whichever side sent it). An exchange stays within what
one hivemind call carries: the ids a node offers are capped, and the messages it sends are capped in bytes too
(an attestation with evidence may be 1 MiB), so a large backlog travels over several rounds. A newcomer
catches up with one exchange as soon as it starts.
Peers serve the RPC; clients (which cannot be dialled) only call it, which push-pull makes enough.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Annotated, Callable, Iterable, NamedTuple

import msgpack
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2
from pydantic import Field, ValidationError

from reputation.attest import MAX_MESSAGE_BYTES
from reputation.node import Kind, ReputationNode
from swarm.periodic import run_periodically
from swarm.protocol import WireModel
from swarm.schema import first_error, load_msgpack

logger = logging.getLogger(__name__)

MAX_EXCHANGE_BYTES = 4 * 2**20 - 64 * 1024  # what one hivemind unary call carries (4 MiB), less its framing
MAX_MESSAGES_PER_EXCHANGE = 2000
MAX_IDS_PER_EXCHANGE = 50_000  # 1.7 MiB of ids; a node's store holds 20,000 by default
_ID_BYTES = 34  # one packed message id
_PUSH_BYTES = MAX_EXCHANGE_BYTES - MAX_IDS_PER_EXCHANGE * _ID_BYTES - 64 * 1024  # left for messages, ids or not
assert _PUSH_BYTES >= MAX_MESSAGE_BYTES, "one message of the largest size must fit in an exchange"

MessageId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]  # reputation.node.message_id


class Pushed(NamedTuple):
    """One message pushed to the other side; travels as a [kind, data] pair."""

    kind: Kind
    data: Annotated[bytes, Field(max_length=MAX_MESSAGE_BYTES)]  # its encoding, verified by the receiving node


class Exchange(WireModel):
    """One push-pull message, both ways: ids the sender holds, messages for the receiver, whether to reply with ours."""

    have: list[MessageId] = Field(default_factory=list, max_length=MAX_IDS_PER_EXCHANGE)
    push: list[Pushed] = Field(default_factory=list, max_length=MAX_MESSAGES_PER_EXCHANGE)
    pull: bool = False


def pack_exchange(message: Exchange) -> bytes:
    return msgpack.packb(message.model_dump(), use_bin_type=True)


def unpack_exchange(data: bytes) -> Exchange:
    """The Exchange `data` encodes; ValueError for anything else (the sender is then charged one invalid message)."""
    fields = load_msgpack(data, MAX_EXCHANGE_BYTES, "gossip message")
    try:
        return Exchange.model_validate(fields)
    except ValidationError as e:
        raise ValueError(f"malformed gossip message: {first_error(e)}") from None


@dataclass
class SenderBudget:
    """Token bucket of messages per sender, and a time-out for senders of invalid messages."""

    rate: float = 50.0  # messages per second, refilled
    burst: float = 5000.0  # bucket size
    max_invalid: int = 50  # invalid messages before the sender is ignored
    ignore_s: float = 300.0
    _tokens: dict[str, float] = field(default_factory=dict)
    _updated: dict[str, float] = field(default_factory=dict)
    _invalid: dict[str, int] = field(default_factory=dict)
    _ignored_until: dict[str, float] = field(default_factory=dict)

    def allow(self, sender: str, count: int, now: float) -> int:
        """How many of `count` messages from `sender` may be processed now."""
        if self._ignored_until.get(sender, 0.0) > now:
            return 0
        tokens = min(self.burst, self._tokens.get(sender, self.burst) + (now - self._updated.get(sender, now)) * self.rate)
        allowed = int(min(count, tokens))
        self._tokens[sender], self._updated[sender] = tokens - allowed, now
        return allowed

    def invalid(self, sender: str, now: float) -> None:
        self._invalid[sender] = self._invalid.get(sender, 0) + 1
        if self._invalid[sender] >= self.max_invalid:
            logger.warning(f"Ignoring gossip from {sender} for {self.ignore_s:.0f} s: too many invalid messages")
            self._ignored_until[sender] = now + self.ignore_s
            self._invalid[sender] = 0


def offered_ids(node: ReputationNode) -> list[str]:
    """The ids a node offers in one exchange: its newest MAX_IDS_PER_EXCHANGE."""
    return node.inventory()[-MAX_IDS_PER_EXCHANGE:]


def messages_for(node: ReputationNode, missing: list[str]) -> list[tuple[Kind, bytes]]:
    """What to send of `missing`, within the exchange's message and byte limits."""
    return node.messages(missing, limit=MAX_MESSAGES_PER_EXCHANGE, max_bytes=_PUSH_BYTES)


def receive(node: ReputationNode, budget: SenderBudget, sender: str, push: list[Pushed]) -> int:
    """Ingest pushed messages within the sender's budget; returns how many were new and valid."""
    allowed = budget.allow(sender, len(push), time.monotonic())
    return sum(node.ingest(kind, data) for kind, data in push[:allowed])


class GossipService(ServicerBase):
    """The `rpc_exchange` handler a peer registers next to its block service."""

    def __init__(self, node: ReputationNode, budget: SenderBudget | None = None):
        self.node = node
        self.budget = budget or SenderBudget()

    @classmethod
    def _get_handle_name(cls, namespace: str | None, method_name: str) -> str:
        name = f"efedllm.Gossip.{method_name}"
        return name if namespace is None else f"{namespace}::{name}"

    async def rpc_exchange(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        try:
            incoming = unpack_exchange(request.metadata)
        except ValueError as e:
            self.budget.invalid(str(context.remote_id), time.monotonic())
            logger.debug(f"Gossip from {context.remote_id} rejected: {e}")
            return runtime_pb2.ExpertResponse(metadata=pack_exchange(Exchange()))
        loop = asyncio.get_running_loop()
        accepted = await loop.run_in_executor(None, receive, self.node, self.budget, str(context.remote_id), incoming.push)
        if accepted:
            logger.debug(f"Gossip: {accepted} new message(s) from {context.remote_id}")
        if not incoming.pull:
            return runtime_pb2.ExpertResponse(metadata=pack_exchange(Exchange()))
        theirs = set(incoming.have)
        mine = offered_ids(self.node)
        missing = [mid for mid in mine if mid not in theirs]
        reply = Exchange(have=mine, push=messages_for(self.node, missing))
        return runtime_pb2.ExpertResponse(metadata=pack_exchange(reply))


async def exchange(node: ReputationNode, p2p: P2P, peer_id: PeerID, budget: SenderBudget, timeout: float = 10.0) -> tuple[int, int]:
    """One push-pull round with `peer_id`: (messages received and accepted, messages pushed)."""
    stub = GossipService.get_stub(p2p, peer_id)
    request = runtime_pb2.ExpertRequest(uid="", metadata=pack_exchange(Exchange(have=offered_ids(node), pull=True)))
    reply = await stub.rpc_exchange(request, timeout=timeout)
    try:
        answer = unpack_exchange(reply.metadata)
    except ValueError:
        budget.invalid(str(peer_id), time.monotonic())
        raise
    loop = asyncio.get_running_loop()
    accepted = await loop.run_in_executor(None, receive, node, budget, str(peer_id), answer.push)
    theirs = set(answer.have)
    missing = [mid for mid in offered_ids(node) if mid not in theirs]
    pushed = 0
    if missing:
        push = messages_for(node, missing)
        request = runtime_pb2.ExpertRequest(uid="", metadata=pack_exchange(Exchange(push=push)))
        await stub.rpc_exchange(request, timeout=timeout)
        pushed = len(push)
    return accepted, pushed


class GossipAgent:
    """Runs push-pull rounds with `fanout` random peers every `period` seconds until stopped."""

    def __init__(
        self,
        node: ReputationNode,
        p2p: P2P,
        peers: Callable[[], Iterable[PeerID]],
        period: float = 5.0,
        fanout: int = 2,
        rng: random.Random | None = None,
    ):
        self.node, self.p2p, self.peers = node, p2p, peers
        self.period, self.fanout = period, fanout
        self.rng = rng or random.Random()
        self.budget = SenderBudget()
        self.rounds = 0

    async def round(self) -> int:
        """One round; returns the messages received. Unreachable peers are skipped quietly."""
        candidates = sorted({p for p in self.peers() if p != self.p2p.peer_id}, key=str)
        received = 0
        for peer_id in self.rng.sample(candidates, min(self.fanout, len(candidates))):
            try:
                got, _ = await exchange(self.node, self.p2p, peer_id, self.budget)
                received += got
            except Exception as e:  # a peer leaving mid-exchange is normal churn
                logger.debug(f"Gossip with {peer_id} failed: {type(e).__name__}: {e}")
        self.rounds += 1
        return received

    async def run(self, stop: asyncio.Event) -> None:
        """Rounds every `period` seconds (+-20 %, so nodes started together do not gossip in step) until `stop`."""
        await run_periodically(self.round, lambda: self.period, stop, name="Gossip round", jitter=0.2, rng=self.rng)
