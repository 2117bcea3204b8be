"""An in-process swarm behind the `swarm.transport.Transport` seam, for fast tests of sessions, routing and checks.

Each fake block is causal, like attention: the output at token t depends on every input up to t, so a peer
that lost its cache, or a replay that sent the wrong history, gives a different answer. A fake peer keeps
each session's inputs as its "KV cache". Replies pass through the real `swarm.transport.check_output`, so a
fake that misbehaves (NaN, wrong shape) is caught exactly as a real one would be.
"""

from __future__ import annotations

import base64
import hashlib
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from hivemind.p2p import PeerID
from hivemind.utils.crypto import RSAPrivateKey

from reputation.attest import Receipt, tensor_digest
from reputation.node import peer_id_of_key
from swarm.errors import BadReplyError, PeerUnreachableError, RemoteError
from swarm.protocol import PeerInfo, StepRequest
from swarm.records import PeerSpan, ServerInfo, ServerState
from swarm.transport import Reply, check_output

HIDDEN = 8
PREFIX = "fake@0"


def block(index: int, x: torch.Tensor) -> torch.Tensor:
    """Fake block `index` over a whole sequence (batch, tokens, hidden): causal in the tokens."""
    prefix_mean = x.cumsum(dim=1) / torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[None, :, None]
    return x + 0.1 * (index + 1) * torch.tanh(prefix_mean + 0.01 * index)


def run_blocks(start: int, end: int, x: torch.Tensor) -> torch.Tensor:
    for index in range(start, end):
        x = block(index, x)
    return x


@dataclass
class FakePeer:
    name: str
    start: int
    end: int
    throughput: float = 100.0
    rtt: float = 0.001
    sign: bool = False  # sign receipts with a real identity key
    corrupt: Callable[[torch.Tensor], torch.Tensor] | None = None  # applied to every output (a liar)
    fail_after: int | None = None  # steps served before it dies (None: never)
    junk_info: bool = False
    lose_cache_at_step: int | None = None  # answers unknown_session once, at this step count
    sessions: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: int = 0
    forwards: int = 0
    key: RSAPrivateKey | None = None
    relays: tuple[str, ...] = ()  # announced relays (reachable only through them)
    dialable: bool = True  # False: announces that nobody can dial it, and cannot be reached
    drop_stream_at: int | None = None  # its stream drops once at this step count (as when its relay goes away)

    def __post_init__(self) -> None:
        if self.sign:
            self.key = RSAPrivateKey()
            self.peer_id = PeerID.from_base58(peer_id_of_key(self.key))
        else:
            self.peer_id = PeerID(b"\x12\x20" + hashlib.sha256(self.name.encode()).digest())

    @property
    def span(self) -> PeerSpan:
        info = ServerInfo(state=ServerState.ONLINE, start=self.start, end=self.end, throughput=self.throughput,
                          dtype="float32", compression="none", cache_tokens_left=100_000,
                          relays=list(self.relays), reachable=self.dialable)
        return PeerSpan(self.peer_id, info)

    def compute(self, start: int, end: int, full: torch.Tensor, new: int) -> torch.Tensor:
        output = run_blocks(start, end, full)[:, -new:]
        return self.corrupt(output) if self.corrupt is not None else output

    def receipt(self, inputs: torch.Tensor, output: torch.Tensor, start: int, end: int, session: str = "forward",
                step: int = 0) -> str:
        if self.key is None:
            return ""
        receipt = Receipt(
            session_id=session, step=step, dht_prefix=PREFIX, block_start=start, block_end=end,
            tokens=inputs.shape[0] * inputs.shape[1], dtype="float32", compression="none",
            input_digest=tensor_digest(inputs), output_digest=tensor_digest(output),
            signer=str(self.peer_id), signed_at=time.time(),
        ).sign(self.key)
        return base64.b64encode(receipt.encode()).decode()


class FakeStream:
    def __init__(self, swarm: "FakeSwarm", peer: FakePeer):
        self.swarm, self.peer, self.peer_id = swarm, peer, peer.peer_id
        self.closed = False

    async def step(self, meta: StepRequest, hidden: torch.Tensor, mask: torch.Tensor | None = None,
                   timeout: float | None = None) -> Reply:
        peer = self.peer
        self.swarm.calls.append(("step", peer.name, meta.position, hidden.shape[1]))
        if peer.name in self.swarm.dead or (peer.fail_after is not None and peer.steps >= peer.fail_after):
            self.swarm.dead.add(peer.name)
            raise PeerUnreachableError(str(peer.peer_id), f"peer {peer.peer_id} closed the stream")
        if peer.drop_stream_at is not None and peer.steps == peer.drop_stream_at:
            peer.drop_stream_at = None
            peer.sessions.pop(meta.session_id, None)  # a peer's caches live as long as the stream
            raise PeerUnreachableError(str(peer.peer_id), f"lost the stream to peer {peer.peer_id}")
        if peer.lose_cache_at_step is not None and peer.steps == peer.lose_cache_at_step:
            peer.lose_cache_at_step = None
            peer.sessions.pop(meta.session_id, None)
        held = peer.sessions.get(meta.session_id)
        if held is None and meta.position > 0:
            raise RemoteError(str(peer.peer_id), "unknown_session", "no such session on this stream")
        if held is not None and meta.position > held.shape[1]:
            raise RemoteError(str(peer.peer_id), "bad_position", "position beyond the cache")
        past = hidden[:, :0] if held is None else held[:, : meta.position]
        full = torch.cat([past, hidden], dim=1)
        peer.sessions[meta.session_id] = full
        peer.steps += 1
        output = peer.compute(meta.start, meta.end, full, hidden.shape[1])
        receipt = peer.receipt(hidden, output, meta.start, meta.end, meta.session_id, meta.position)
        return Reply(check_output(peer.peer_id, [output], hidden.shape), receipt, full.shape[1])

    async def close(self) -> None:
        self.closed = True


class FakeSwarm:
    """Fake peers, and the transport and span source a client would use to reach them."""

    def __init__(self, *peers: FakePeer):
        self.peers = {p.peer_id: p for p in peers}
        self.dead: set[str] = set()
        self.calls: list[tuple] = []

    def by_name(self, name: str) -> FakePeer:
        return next(p for p in self.peers.values() if p.name == name)

    # SpanSource
    async def read(self) -> list[PeerSpan]:
        return [p.span for p in self.peers.values() if p.name not in self.dead]

    # Transport
    @property
    def peer_id(self) -> PeerID:
        return PeerID(b"\x12\x20" + hashlib.sha256(b"client").digest())

    def _peer(self, peer_id: PeerID) -> FakePeer:
        peer = self.peers[peer_id]
        if peer.name in self.dead or not peer.dialable:
            raise PeerUnreachableError(str(peer_id), f"peer {peer_id} is unreachable")
        return peer

    async def info(self, peer_id: PeerID, timeout: float = 5.0) -> tuple[PeerInfo, float]:
        peer = self._peer(peer_id)
        if peer.junk_info:
            raise BadReplyError(str(peer_id), "invalid PeerInfo: model: Field required")
        info = PeerInfo(model=PREFIX, start=peer.start, end=peer.end, dtype="float32", throughput=peer.throughput,
                        max_length=4096, cache_tokens_left=100_000, sessions=len(peer.sessions))
        return info, peer.rtt

    async def forward(self, peer_id: PeerID, start: int, end: int, hidden: torch.Tensor, timeout: float = 60.0) -> Reply:
        peer = self._peer(peer_id)
        self.calls.append(("forward", peer.name, start, end))
        peer.forwards += 1
        output = peer.compute(start, end, hidden, hidden.shape[1])
        return Reply(check_output(peer_id, [output], hidden.shape), peer.receipt(hidden, output, start, end))

    def open_stream(self, peer_id: PeerID) -> FakeStream:
        return FakeStream(self, self.peers[peer_id])
