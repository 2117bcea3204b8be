"""Periodic background work with structured cancellation: one helper instead of a hand-written loop each.

`run_periodically` calls an async function every `period` seconds until a stop event is set; a round that
raises is logged and the next one goes on. `BackgroundTasks` owns the tasks a component starts and awaits
every one of them when it closes, so nothing is left running (or un-awaited) after a shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Awaitable, Callable, Coroutine

logger = logging.getLogger(__name__)

async def wait_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to `seconds`; True when `stop` was set (at once or meanwhile)."""
    if stop.is_set():
        return True
    try:
        await asyncio.wait_for(stop.wait(), timeout=max(seconds, 0.0))
        return True
    except asyncio.TimeoutError:
        return False


async def run_periodically(
    work: Callable[[], Awaitable[object]],
    period: float | Callable[[], float],
    stop: asyncio.Event,
    *,
    name: str,
    immediately: bool = True,
    jitter: float = 0.0,
    rng: random.Random | None = None,
) -> None:
    """Await `work()` every `period` seconds (a number, or a function giving the next wait) until `stop` is set.

    `immediately=False` waits one period before the first round. `jitter` spreads rounds by +-that fraction,
    so nodes started together do not act in step. A round that raises is logged; the next one goes on.
    Cancellation is not caught.
    """
    rng = rng or random.Random()

    def next_wait() -> float:
        seconds = period() if callable(period) else period
        return seconds * rng.uniform(1 - jitter, 1 + jitter) if jitter else seconds

    if not immediately and await wait_or_stop(stop, next_wait()):
        return
    while not stop.is_set():
        try:
            await work()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # one bad round (a peer or the DHT hiccuped) must not end the loop
            logger.warning(f"{name} failed: {type(e).__name__}: {e}", exc_info=logger.isEnabledFor(logging.DEBUG))
        if await wait_or_stop(stop, next_wait()):
            return


class BackgroundTasks:
    """The tasks one component runs in the background; `close()` cancels and awaits them all."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def start(self, coroutine: Coroutine, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning(f"Background task {task.get_name()} ended with {task.exception()!r}")

    def __len__(self) -> int:
        return len(self._tasks)

    async def wait(self, timeout: float | None = None) -> None:
        """Wait for the tasks running now to finish by themselves (at most `timeout` seconds)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    async def close(self) -> None:
        """Cancel every task still running and wait until each has ended."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
