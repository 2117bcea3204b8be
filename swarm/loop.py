"""A private asyncio loop on a background thread, so the synchronous client API can drive P2P calls.

All P2P work of a client happens on this one loop (the one that owns its P2P object); a public call
crosses threads once per request, not once per hop.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Awaitable, TypeVar

T = TypeVar("T")


class BackgroundLoop:
    def __init__(self, name: str = "swarm-client"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coroutine: Awaitable[T], timeout: float | None = None) -> T:
        """Run `coroutine` on the loop and wait for its result from the calling thread."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        if self.loop.is_running():
            self.run(_cancel_pending_tasks(), timeout=5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
        if not self.loop.is_running():
            self.loop.close()


async def _cancel_pending_tasks() -> None:
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
