"""Stateless runs of blocks on peers for inputs of any length.

hivemind caps a unary message at 4 MiB, so one `rpc_forward` carries at most about 255 tokens of a 4096-wide
model in float32. An input that fits in one message (`CHUNK_BYTES`, half the cap) goes as one forward; a longer
one goes through a temporary `rpc_inference` session on the peer, chunk by chunk at increasing positions (the
peer's KV cache carries the context from chunk to chunk), and the session is closed at the end. Either way the
caller gets the output for every input token. Deep prompts (a session's, for a spot check's re-run of its history)
go with every message that starts below their length. `model(ids)` and the trust layer's spot checks both run this way,
so no message limit caps the context they handle.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Sequence

import torch
from hivemind.p2p import PeerID

from swarm.protocol import StepRequest
from swarm.routing import RouteHop
from swarm.transport import PeerStream, Transport

logger = logging.getLogger(__name__)

CHUNK_BYTES = 2 * 1024 * 1024  # hidden states per message: half of hivemind's 4 MiB cap (the reply is as large)
MAX_CHUNK_TOKENS = 4096  # batch x tokens per message: within a peer's default limit of 8192 per request


@dataclass(frozen=True)
class StatelessRun:
    """What one peer returned for a whole input."""

    peer_id: PeerID
    output: torch.Tensor  # (batch, tokens, hidden): the blocks' output for every input token
    receipt: str  # the peer's receipt of its last message ("" if it sent none)
    receipt_from: int  # that receipt covers input and output tokens [receipt_from:]
    messages: int  # requests sent
    receipt_prompts: torch.Tensor | None = None  # the deep prompts that last message carried (its receipt commits to them)


def chunk_tokens(batch: int, hidden_size: int, element_size: int = 4, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per message so that its hidden states stay within `chunk_bytes` (at least one)."""
    by_bytes = chunk_bytes // max(batch * hidden_size * element_size, 1)
    return max(1, min(by_bytes, MAX_CHUNK_TOKENS // max(batch, 1)))


async def run_blocks_chunked(
    transport: Transport,
    peer_id: PeerID,
    start: int,
    end: int,
    hidden: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    timeout: float = 60.0,
    chunk_bytes: int = CHUNK_BYTES,
    prompts: torch.Tensor | None = None,
) -> StatelessRun:
    """`hidden` (batch, tokens, hidden) through the peer's blocks [start, end), no state left behind.

    `mask` (batch, tokens) of 0/1 when some row is left-padded; `prompts` (end - start, prompt_length, hidden):
    deep prompts added at each block's input. Raises the transport's `PeerError`s.
    """
    batch, tokens, width = hidden.shape
    step = chunk_tokens(batch, width, hidden.element_size(), chunk_bytes)
    if tokens <= step:
        extra = {} if prompts is None else {"prompts": prompts}  # transports that predate deep prompts still work
        reply = await transport.forward(peer_id, start, end, hidden, timeout, mask=mask, **extra)
        return StatelessRun(peer_id, reply.output, reply.receipt, 0, 1, prompts)
    stream = transport.open_stream(peer_id)
    session_id = f"stateless-{uuid.uuid4().hex}"
    outputs: list[torch.Tensor] = []
    try:
        for position in range(0, tokens, step):
            chunk = hidden[:, position : position + step]
            carried = prompts if prompts is not None and position < prompts.shape[1] else None
            meta = StepRequest(session_id=session_id, start=start, end=end, position=position, max_length=tokens,
                               prompts=carried is not None)
            chunk_mask = None if mask is None else mask[:, : position + chunk.shape[1]]
            extra = {} if carried is None else {"prompts": carried}
            reply = await stream.step(meta, chunk, chunk_mask, timeout=timeout, **extra)
            outputs.append(reply.output)
    finally:
        await _close_quietly(stream)
    logger.debug(f"Ran {tokens} tokens through {peer_id} [{start}:{end}] in {len(outputs)} chunks")
    return StatelessRun(peer_id, torch.cat(outputs, dim=1), reply.receipt, position, len(outputs), carried)


async def run_route(
    transport: Transport,
    route: Sequence[RouteHop],
    hidden: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    timeout: float = 60.0,
    chunk_bytes: int = CHUNK_BYTES,
    prompts: torch.Tensor | None = None,
) -> list[StatelessRun]:
    """`hidden` through every hop of `route` in turn; each hop's run (the last one's output is the route's).
    `prompts`: deep prompts of the route's blocks (from its first hop's start on); each hop gets its own."""
    runs = []
    first = route[0].start if route else 0
    for hop in route:
        own = None if prompts is None else prompts[hop.start - first : hop.end - first]
        run = await run_blocks_chunked(transport, hop.peer_id, hop.start, hop.end, hidden, mask,
                                       timeout=timeout, chunk_bytes=chunk_bytes, prompts=own)
        runs.append(run)
        hidden = run.output
    return runs


async def _close_quietly(stream: PeerStream) -> None:
    try:
        await stream.close()
    except Exception:  # closing is best effort: the peer frees the session when the stream drops
        logger.debug(f"Closing the stream to {stream.peer_id} failed", exc_info=True)
