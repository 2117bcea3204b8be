"""Stop sequences over streamed text (pure functions): what may be sent now, and where the answer ends."""

from __future__ import annotations


def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Index where the earliest stop sequence starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` could begin a stop sequence, so must not be sent yet."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def sendable(text: str, stops: tuple[str, ...], final: bool) -> tuple[str, bool]:
    """(the part of `text` that is certainly in the answer, whether a stop sequence ended it)."""
    cut = find_stop(text, stops)
    if cut is not None:
        return text[:cut], True
    if final:
        return text, False
    return text[: len(text) - held_back(text, stops)], False
