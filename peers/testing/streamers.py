"""A transformers-style streamer that records when each new token arrives (for benchmarks and timing tests)."""

from __future__ import annotations

import time


class TokenTimes:
    """Pass as `streamer=` to `generate`: `times` holds `time.perf_counter()` at each new token (the first `put`
    carries the prompt and is not a token), `started` when the streamer was made."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass

    @property
    def first(self) -> float | None:
        """When the first new token arrived."""
        return self.times[0] if self.times else None

    def gaps(self) -> list[float]:
        """Seconds between consecutive new tokens."""
        return [later - earlier for earlier, later in zip(self.times, self.times[1:])]
