"""Spreading attestations and countersigned receipts to every node: push-pull anti-entropy over hivemind RPC.

hivemind's Python bindings expose no pubsub calls to drive the bundled p2pd's gossipsub, so nodes reconcile
their stores in pairs instead. Every `period` a node picks a few random peers and sends the ids it holds; the
other side answers with the messages the caller lacks and its own ids; the caller pushes back what the other
side lacks. Messages are verified by the receiving node (`ReputationNode.ingest`) before they are stored or
passed on; duplicates are dropped by id; each sender gets a token bucket of messages and is ignored for a
while after sending too many invalid ones. A newcomer catches up with one exchange as soon as it starts.
Peers serve the RPC; clients (which cannot be dialled) only call it, which push-pull makes enough.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import msgpack
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reputation.node import KINDS, ReputationNode

logger = logging.getLogger(__name__)

MAX_EXCHANGE_BYTES = 16 * 2**20
MAX_MESSAGES_PER_EXCHANGE = 2000


class Exchange(BaseModel):
    """One push-pull message, both ways: ids the sender holds, messages for the receiver, whether to reply with ours."""

    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    have: list[str] = Field(default_factory=list, max_length=200_000)
    push: list[tuple[str, bytes]] = Field(default_factory=list, max_length=MAX_MESSAGES_PER_EXCHANGE)
    pull: bool = False


def pack_exchange(message: Exchange) -> bytes:
    return msgpack.packb(message.model_dump(), use_bin_type=True)


def unpack_exchange(data: bytes) -> Exchange:
    if len(data) > MAX_EXCHANGE_BYTES:
        raise ValueError(f"gossip message of {len(data)} bytes is over the {MAX_EXCHANGE_BYTES} limit")
    try:
        fields = msgpack.unpackb(data, raw=False)
        if isinstance(fields, dict) and isinstance(fields.get("push"), list):
            fields["push"] = [tuple(item) if isinstance(item, list) else item for item in fields["push"]]
        return Exchange.model_validate(fields)
    except (ValidationError, ValueError, TypeError) as e:
        raise ValueError(f"malformed gossip message: {type(e).__name__}") from None
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ValueError(f"gossip message is not msgpack: {type(e).__name__}") from None


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


def receive(node: ReputationNode, budget: SenderBudget, sender: str, push: list[tuple[str, bytes]]) -> int:
    """Ingest pushed messages within the sender's budget; returns how many were new and valid."""
    now = time.monotonic()
    allowed = budget.allow(sender, len(push), now)
    accepted = 0
    for kind, data in push[:allowed]:
        if kind not in KINDS:
            budget.invalid(sender, now)
        elif node.ingest(kind, data):
            accepted += 1
    return accepted


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
        mine = self.node.inventory()
        missing = [mid for mid in mine if mid not in theirs]
        reply = Exchange(have=mine, push=self.node.messages(missing, limit=MAX_MESSAGES_PER_EXCHANGE))
        return runtime_pb2.ExpertResponse(metadata=pack_exchange(reply))


async def exchange(node: ReputationNode, p2p: P2P, peer_id: PeerID, budget: SenderBudget, timeout: float = 10.0) -> tuple[int, int]:
    """One push-pull round with `peer_id`: (messages received and accepted, messages pushed)."""
    stub = GossipService.get_stub(p2p, peer_id)
    request = runtime_pb2.ExpertRequest(uid="", metadata=pack_exchange(Exchange(have=node.inventory(), pull=True)))
    reply = await stub.rpc_exchange(request, timeout=timeout)
    answer = unpack_exchange(reply.metadata)
    loop = asyncio.get_running_loop()
    accepted = await loop.run_in_executor(None, receive, node, budget, str(peer_id), answer.push)
    theirs = set(answer.have)
    missing = [mid for mid in node.inventory() if mid not in theirs]
    pushed = 0
    if missing:
        push = node.messages(missing, limit=MAX_MESSAGES_PER_EXCHANGE)
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
        while not stop.is_set():
            try:
                await self.round()
            except Exception:  # the loop must outlive any single bad round
                logger.warning("Gossip round failed", exc_info=True)
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.period * self.rng.uniform(0.8, 1.2))
            except asyncio.TimeoutError:
                pass
