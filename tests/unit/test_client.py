"""Tests of swarm.client's pure parts: where generation goes on after a rewind."""

from __future__ import annotations

import pytest

from swarm.client import rewind_point

START, PROMPT_LENGTH = 40, 6  # a chat turn whose prompt went in at position 40


@pytest.mark.parametrize(
    "untrusted_from, expected",
    [
        (0, (PROMPT_LENGTH, 0)),  # the peer was on the route from the start: only the prompt is kept
        (START, (PROMPT_LENGTH, START)),  # ... of this generation, in a chat that went on before
        (START + PROMPT_LENGTH, (PROMPT_LENGTH + 1, START + PROMPT_LENGTH)),  # joined at the first token's step
        (START + PROMPT_LENGTH + 3, (PROMPT_LENGTH + 4, START + PROMPT_LENGTH + 3)),
    ],
)
def test_rewind_point_keeps_tokens_chosen_before_the_peer_joined(untrusted_from, expected):
    start = 0 if untrusted_from == 0 else START
    assert rewind_point(untrusted_from, start, PROMPT_LENGTH) == expected
