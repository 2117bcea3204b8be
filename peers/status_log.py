"""The peer's status line, logged once a minute while it serves: sessions, tokens served, cache use, trust.

Trust comes from an optional provider (a function returning this peer's score, or None while unknown);
without one the line says trust=n/a.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable

from swarm.periodic import run_periodically

logger = logging.getLogger(__name__)

TrustProvider = Callable[[], "float | None"]  # this peer's current trust score, None if not known


@dataclass(frozen=True)
class StatusSnapshot:
    sessions: int
    tokens_served: int  # since the peer started
    tokens_recent: int  # since the previous line
    cache_used: int  # KV-cache tokens reserved by open sessions
    cache_total: int
    trust: float | None
    batched_steps: int = 0  # steps that ran in one batch with other sessions' steps, since the peer started
    largest_batch: int = 1  # most sessions' steps in one batch


def format_status(s: StatusSnapshot, period: float) -> str:
    share = 100.0 * s.cache_used / s.cache_total if s.cache_total else 0.0
    trust = "n/a" if s.trust is None else f"{s.trust:.3f}"
    batched = f", {s.batched_steps} steps batched (up to {s.largest_batch} at once)" if s.batched_steps else ""
    return (
        f"status: {s.sessions} sessions, {s.tokens_served} tokens served (+{s.tokens_recent} in {period:.0f} s), "
        f"cache {s.cache_used}/{s.cache_total} tokens ({share:.1f}%), trust={trust}{batched}"
    )


def snapshot(handler, previous_tokens: int, trust: TrustProvider | None) -> StatusSnapshot:
    """Read the handler's counters (a peers.handler.BlockHandler)."""
    served = handler.stats.tokens_served
    return StatusSnapshot(
        sessions=len(handler.sessions()),
        tokens_served=served,
        tokens_recent=served - previous_tokens,
        cache_used=handler.reserved_tokens(),
        cache_total=handler.cache_tokens,
        trust=None if trust is None else trust(),
        batched_steps=handler.scheduler.stats.batched_steps,
        largest_batch=handler.scheduler.stats.largest_batch,
    )


async def log_status(handler, stop: asyncio.Event, period: float, trust: TrustProvider | None = None) -> None:
    """Log a status line every `period` seconds until `stop` is set (period <= 0: never)."""
    if period <= 0:
        return
    previous = handler.stats.tokens_served

    async def one_line() -> None:
        nonlocal previous
        current = snapshot(handler, previous, trust)
        previous = current.tokens_served
        logger.info(format_status(current, period))

    await run_periodically(one_line, period, stop, name="status line", immediately=False)
