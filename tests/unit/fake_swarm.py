"""An in-process swarm behind the `swarm.transport.Transport` seam, for fast tests of sessions, routing and checks.

Each fake block is causal, like attention: the output at token t depends on every input up to t, so a peer
that lost its cache, or a replay that sent the wrong history, gives a different answer. A fake peer keeps
each session's inputs as its "KV cache". Replies pass through the real `swarm.transport.check_output`, so a
fake that misbehaves (NaN, wrong shape) is caught exactly as a real one would be. Signing fakes (`sign=True`)
sign receipts as `peers.handler.BlockHandler` does: per stream and session, a step count and the cumulative
batch x tokens; `receipts` makes them cheat on receipts (see `RECEIPT_MODES`). Deep prompts a step or forward
carries are added at each fake block's input, as `swarm.blocks.BlockSpan` adds them (`ignore_prompts`: a cheater
that drops them but signs for them).
"""

from __future__ import annotations

import asyncio

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
from swarm.blocks import add_prompt
from swarm.errors import BadReplyError, PeerUnreachableError, RemoteError
from swarm.protocol import PeerInfo, StepRequest, TrainRequest, inputs_digest
from swarm.records import PeerSpan, ServerInfo, ServerState
from swarm.transport import Reply, TrainResult, check_output

HIDDEN = 8
PREFIX = "fake@0"
RECEIPT_MODES = (
    "honest",
    "none",  # replies with an empty receipt
    "bad-digest",  # signs the honest output, returns a corrupted one
    "inflate",  # claims 10x the tokens
    "wrong-step",  # names the next step
    "other-blocks",  # names one block fewer
    "other-session",  # names another session
    "other-signer",  # a valid receipt, signed by another identity
    "altered",  # a field changed after signing
)


def block(index: int, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fake block `index` over a whole sequence (batch, tokens, hidden): causal in the tokens, and like attention
    it ignores the tokens `mask` (batch, tokens) marks 0 (padding)."""
    weights = torch.ones(x.shape[:2], dtype=x.dtype) if mask is None else mask.to(x.dtype)
    prefix_mean = (x * weights[..., None]).cumsum(dim=1) / weights.cumsum(dim=1).clamp_min(1.0)[..., None]
    return x + 0.1 * (index + 1) * torch.tanh(prefix_mean + 0.01 * index)


def run_blocks(start: int, end: int, x: torch.Tensor, mask: torch.Tensor | None = None,
               prompts: torch.Tensor | None = None) -> torch.Tensor:
    """Fake blocks [start, end) over a whole sequence from position 0; `prompts` (end - start, length, hidden) are
    deep prompts added at each block's input."""
    for index in range(start, end):
        if prompts is not None:
            x = add_prompt(x, prompts[index - start], 0)
        x = block(index, x, mask)
    return x


# How far an honest fake peer of each declared compression strays from the exact blocks (relative L2 of the
# update); each one strays the same way every time, as real quantised weights do. bfloat16 rounds for real.
COMPRESSION_ERROR = {"none": 0.0, "int8": 0.01, "nf4": 0.05}


def configured(output: torch.Tensor, inputs: torch.Tensor, dtype: str, compression: str) -> torch.Tensor:
    """The exact blocks' output as an honest peer of this configuration would return it."""
    update = output - inputs
    level = COMPRESSION_ERROR.get(compression.rpartition("+")[2] if "+" in compression else compression, 0.0)
    if level:
        generator = torch.Generator().manual_seed(sum(map(ord, compression)))
        wobble = torch.randn(update.shape[-1], generator=generator)  # the same direction for every token
        update = update + level * update.norm(dim=-1, keepdim=True) * wobble / wobble.norm()
    output = inputs + update
    if dtype != "float32":
        output = output.to(getattr(torch, dtype)).to(inputs.dtype)
    return output


_KEYS: dict[str, RSAPrivateKey] = {}


def _key(name: str) -> RSAPrivateKey:
    """One identity key per fake peer name, made once per test run (RSA key generation is slow)."""
    if name not in _KEYS:
        _KEYS[name] = RSAPrivateKey()
    return _KEYS[name]


@dataclass
class FakePeer:
    name: str
    start: int
    end: int
    throughput: float = 100.0
    rtt: float = 0.001
    sign: bool = False  # sign receipts with a real identity key
    dtype: str = "float32"  # declared (and honestly served) configuration
    compression: str = "none"
    corrupt: Callable[[torch.Tensor], torch.Tensor] | None = None  # applied to every output (a liar)
    corrupt_padded: Callable[[torch.Tensor], torch.Tensor] | None = None  # ... only to outputs of padded requests
    corrupt_grad: Callable[[torch.Tensor], torch.Tensor] | None = None  # applied to the gradients it returns
    fail_after: int | None = None  # steps served before it dies (None: never)
    junk_info: bool = False
    lose_cache_at_step: int | None = None  # answers unknown_session once, at this step count
    receipts: str = "honest"  # one of RECEIPT_MODES (with sign=True)
    receipts_from_step: int = 0  # cheats on receipts only from this step count on (honest before)
    inflate: int = 1  # its receipts claim this many times the tokens it computed (1: honest)
    sessions: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # per session, once some row is padded
    steps: int = 0
    forwards: int = 0
    key: RSAPrivateKey | None = None
    relays: tuple[str, ...] = ()  # announced relays (reachable only through them)
    dialable: bool = True  # False: announces that nobody can dial it, and cannot be reached
    drop_stream_at: int | None = None  # its stream drops once at this step count (as when its relay goes away)
    push: str = "honest"  # how it pushes its output to the next hop: "honest", "drop" (never), "tamper" (altered)
    ignore_prompts: bool = False  # computes as if no deep prompts came (its receipts still name them)
    prompts: dict[str, torch.Tensor] = field(default_factory=dict)  # per session: deep prompts as added, per position
    prompt_steps: int = 0  # steps and forwards that carried deep prompts

    def __post_init__(self) -> None:
        if self.sign:
            self.key = _key(self.name)
            self.peer_id = PeerID.from_base58(peer_id_of_key(self.key))
        else:
            self.peer_id = PeerID(b"\x12\x20" + hashlib.sha256(self.name.encode()).digest())

    @property
    def span(self) -> PeerSpan:
        info = ServerInfo(state=ServerState.ONLINE, start=self.start, end=self.end, throughput=self.throughput,
                          dtype=self.dtype, compression=self.compression, cache_tokens_left=100_000,
                          relays=list(self.relays), reachable=self.dialable)
        return PeerSpan(self.peer_id, info)

    def compute(self, start: int, end: int, full: torch.Tensor, new: int, mask: torch.Tensor | None = None,
                prompts: torch.Tensor | None = None) -> torch.Tensor:
        prompts = None if self.ignore_prompts else prompts
        output = configured(run_blocks(start, end, full, mask, prompts), full, self.dtype, self.compression)[:, -new:]
        if self.corrupt_padded is not None and mask is not None and bool((mask == 0).any()):
            output = self.corrupt_padded(output)
        return self.corrupt(output) if self.corrupt is not None else output

    def receipt(self, inputs: torch.Tensor, output: torch.Tensor, start: int, end: int, session: str = "forward",
                step: int = 0, tokens: int | None = None, mode: str = "honest", prompts: torch.Tensor | None = None) -> str:
        """base64 of a signed receipt (cheating as `mode` says), or "" without a key. `tokens`: batch x tokens
        computed so far in the session (as a real peer counts them, per stream); this call's inputs by default."""
        if self.key is None or mode == "none":
            return ""
        tokens = inputs.shape[0] * inputs.shape[1] if tokens is None else tokens
        fields = dict(
            session_id=session, step=step, dht_prefix=PREFIX, block_start=start, block_end=end,
            tokens=tokens * self.inflate, dtype=self.dtype, compression=self.compression,
            input_digest=inputs_digest(inputs, prompts), output_digest=tensor_digest(output),
            signer=str(self.peer_id), signed_at=time.time(),
        )
        key = self.key
        if mode == "inflate":
            fields["tokens"] = 10 * tokens
        elif mode == "wrong-step":
            fields["step"] = step + 1
        elif mode == "other-blocks":
            fields["block_end"] = end - 1 if end - 1 > start else end + 1
        elif mode == "other-session":
            fields["session_id"] = session + "-other"
        elif mode == "other-signer":
            key = RSAPrivateKey()
            fields["signer"] = peer_id_of_key(key)
        receipt = Receipt(**fields).sign(key)
        if mode == "altered":
            receipt = receipt.model_copy(update={"tokens": receipt.tokens + 1})
        return base64.b64encode(receipt.encode()).decode()


class FakeStream:
    def __init__(self, swarm: "FakeSwarm", peer: FakePeer):
        self.swarm, self.peer, self.peer_id = swarm, peer, peer.peer_id
        self.closed = False
        self.steps: dict[str, int] = {}  # per session: steps served on this stream (receipts count them)
        self.work: dict[str, int] = {}  # per session: batch x tokens computed on this stream

    async def step(self, meta: StepRequest, hidden: torch.Tensor, mask: torch.Tensor | None = None,
                   timeout: float | None = None, prompts: torch.Tensor | None = None) -> Reply:
        peer = self.peer
        assert meta.prompts == (prompts is not None), "deep prompts go with meta.prompts set"
        if prompts is not None and meta.position >= prompts.shape[1]:
            raise RemoteError(str(peer.peer_id), "bad_request", "a step past the deep prompts carries them")
        self.swarm.calls.append(("step", peer.name, meta.position, hidden.shape[1]))
        self.swarm.check_size(peer, hidden)
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
        applied = self._prompts(meta, hidden, prompts)
        mask = self._mask(meta.session_id, meta.position, hidden, mask)
        output = peer.compute(meta.start, meta.end, full, hidden.shape[1], mask, applied)
        step = self.steps.get(meta.session_id, 0)
        work = self.work.get(meta.session_id, 0) + hidden.shape[0] * hidden.shape[1]
        self.steps[meta.session_id], self.work[meta.session_id] = step + 1, work
        mode = peer.receipts if step >= peer.receipts_from_step else "honest"
        receipt = peer.receipt(hidden, output, meta.start, meta.end, meta.session_id, step, work, mode, prompts)
        if mode == "bad-digest":
            output = output + 0.5  # the receipt signed the honest output
        if meta.push_to is not None and peer.push != "drop":
            pushed = output + 0.5 if peer.push == "tamper" else output
            box = self.swarm.box(meta.session_id, meta.push_to.start, meta.position)
            if not box.done():
                box.set_result((str(peer.peer_id), pushed))
        digest = tensor_digest(hidden) if meta.pushed else ""
        return Reply(check_output(peer.peer_id, [output], hidden.shape), receipt, full.shape[1], digest)

    async def step_pushed(self, meta: StepRequest, shape: torch.Size, mask: torch.Tensor | None = None,
                          timeout: float | None = None) -> Reply:
        """A pushed step: the input the previous hop pushes (as `peers.push.PushInbox` takes it), then a step."""
        box = self.swarm.box(meta.session_id, meta.start, meta.position)
        try:
            sender, hidden = await asyncio.wait_for(asyncio.shield(box), self.swarm.push_timeout)
        except asyncio.TimeoutError:
            raise RemoteError(str(self.peer_id), "push_timeout", "no input pushed in time") from None
        finally:
            self.swarm.boxes.pop((meta.session_id, meta.start, meta.position), None)
        assert sender == meta.push_from
        self.swarm.pushed_steps += 1
        return await self.step(meta, hidden, mask, timeout)

    def _prompts(self, meta: StepRequest, hidden: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor | None:
        """The deep prompts as added to each position of the session so far (blocks, length, hidden), zeros where a
        step added none, like a real peer's KV cache holds them: a step that should have carried them and did not
        is computed without them. None while the session never had any."""
        peer, position, new = self.peer, meta.position, hidden.shape[1]
        held = peer.prompts.get(meta.session_id) if position > 0 else None
        if held is None and prompts is None:
            peer.prompts.pop(meta.session_id, None)
            return None
        blocks = meta.end - meta.start
        past = held[:, :position] if held is not None else hidden.new_zeros(blocks, position, hidden.shape[2])
        added = hidden.new_zeros(blocks, new, hidden.shape[2])
        if prompts is not None:
            count = min(prompts.shape[1] - position, new)
            added[:, :count] = prompts[:, position : position + count]
            peer.prompt_steps += 1
        applied = peer.prompts[meta.session_id] = torch.cat([past, added], dim=1)
        return applied

    def _mask(self, session_id: str, position: int, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The session's whole mask after this step, kept like the real handler's (None while nothing is padded)."""
        held = self.peer.masks.get(session_id)
        if mask is None and held is not None and position > 0:
            mask = torch.cat([held[:, :position], torch.ones(hidden.shape[0], hidden.shape[1], dtype=held.dtype)], dim=1)
        if mask is not None:
            self.peer.masks[session_id] = mask
        return mask

    async def close(self) -> None:
        self.closed = True


class FakeSwarm:
    """Fake peers, and the transport and span source a client would use to reach them."""

    def __init__(self, *peers: FakePeer, max_message_bytes: int | None = None):
        self.peers = {p.peer_id: p for p in peers}
        self.dead: set[str] = set()
        self.calls: list[tuple] = []
        self.max_message_bytes = max_message_bytes  # like hivemind's 4 MiB cap on a message (None: no cap)
        self.boxes: dict[tuple[str, int, int], asyncio.Future] = {}  # pushes, by (session, first block, position)
        self.push_timeout = 0.2  # seconds a pushed step waits for its input
        self.pushed_steps = 0  # steps that took a pushed input

    def box(self, session_id: str, start: int, position: int) -> asyncio.Future:
        """Where the push for one step goes (either the pusher or the pushed step may come first)."""
        key = (session_id, start, position)
        if key not in self.boxes:
            self.boxes[key] = asyncio.get_running_loop().create_future()
        return self.boxes[key]

    def add(self, *peers: FakePeer) -> None:
        self.peers.update({p.peer_id: p for p in peers})

    def check_size(self, peer: FakePeer, hidden: torch.Tensor) -> None:
        size = hidden.numel() * hidden.element_size()
        if self.max_message_bytes is not None and size > self.max_message_bytes:
            raise PeerUnreachableError(str(peer.peer_id), f"message of {size} bytes exceeds {self.max_message_bytes}")

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

    async def forward(self, peer_id: PeerID, start: int, end: int, hidden: torch.Tensor, timeout: float = 60.0,
                      *, mask: torch.Tensor | None = None, prompts: torch.Tensor | None = None) -> Reply:
        peer = self._peer(peer_id)
        self.calls.append(("forward", peer.name, start, end))
        self.check_size(peer, hidden)
        peer.forwards += 1
        peer.prompt_steps += prompts is not None
        output = peer.compute(start, end, hidden, hidden.shape[1], mask, prompts)
        receipt = peer.receipt(hidden, output, start, end, prompts=prompts)
        return Reply(check_output(peer_id, [output], hidden.shape), receipt)

    def open_stream(self, peer_id: PeerID) -> FakeStream:
        return FakeStream(self, self.peers[peer_id])

    async def train(self, peer_id: PeerID, meta: TrainRequest, tensors, expected_shapes, timeout: float = 60.0
                    ) -> TrainResult:
        """A training pass as `peers.training.train_step` computes it, over the fake blocks (deep prompts added to
        each block's input); a peer whose `fail_after` is reached dies here too."""
        peer = self._peer(peer_id)
        self.calls.append((meta.kind, peer.name, meta.start, meta.end))
        await asyncio.sleep(0)  # a real call waits for the network: other requests go out meanwhile
        if peer.fail_after is not None and peer.forwards >= peer.fail_after:
            self.dead.add(peer.name)
            raise PeerUnreachableError(str(peer_id), f"peer {peer_id} is unreachable")
        peer.forwards += 1
        tensors = list(tensors)
        hidden = tensors.pop(0)
        grad = tensors.pop(0) if meta.kind == "backward" else None
        mask = tensors.pop(0) if meta.mask else None
        prompts = tensors.pop(0) if meta.prompts else None
        with torch.enable_grad():
            x = hidden.clone().requires_grad_(True)
            deep = None if prompts is None else prompts.clone().requires_grad_(True)
            out = x
            for index in range(meta.start, meta.end):
                if deep is not None:
                    length = deep.shape[1]
                    out = torch.cat([out[:, :length] + deep[index - meta.start], out[:, length:]], dim=1)
                out = block(index, out, mask)
            if peer.corrupt is not None:
                out = peer.corrupt(out)
            if grad is None:
                outputs = [out.detach()]
            else:
                outputs = [g.detach() for g in torch.autograd.grad(out, [x] if deep is None else [x, deep],
                                                                   grad_outputs=grad)]
                if peer.corrupt_grad is not None:
                    outputs = [peer.corrupt_grad(g) for g in outputs]
        received = hidden if grad is None else torch.cat([hidden, grad], dim=-1)
        receipt = peer.receipt(received, outputs[0], meta.start, meta.end, f"train:{meta.request_id}",
                               0 if grad is None else 1, hidden.shape[0] * hidden.shape[1])
        return TrainResult(outputs, receipt)
