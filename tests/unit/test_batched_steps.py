"""Tests of BlockSpan.forward_batched: several sessions' steps in one run equal each session run alone."""

from __future__ import annotations

import pytest
import torch

from swarm.blocks import SpanInput

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _prefill(span, tokens: int, batch: int = 1, seed: int = 0, padding: torch.Tensor | None = None):
    x = torch.randn(batch, tokens, 64, generator=torch.Generator().manual_seed(seed))
    cache = span.new_cache()
    span(x, cache, SpanInput(attention_mask=padding, start_position=0))
    return cache


def _step_alone_and_batched(span, sessions: list[tuple], new_tokens: int = 1):
    """sessions: (cache_alone, cache_batched, mask or None). Returns (alone outputs, batched outputs)."""
    hiddens, inputs_alone = [], []
    for seed, (cache, _, padding) in enumerate(sessions):
        batch = 1 if padding is None else padding.shape[0]
        hiddens.append(torch.randn(batch, new_tokens, 64, generator=torch.Generator().manual_seed(100 + seed)))
        mask = None if padding is None else torch.cat([padding, torch.ones(batch, new_tokens, dtype=padding.dtype)], 1)
        inputs_alone.append(SpanInput(attention_mask=mask, start_position=cache.length))
    alone = [span(h, c, i) for h, (c, _, _), i in zip(hiddens, sessions, inputs_alone)]
    batched = span.forward_batched(hiddens, [b for _, b, _ in sessions], inputs_alone)
    return alone, batched


def test_sessions_of_different_lengths_and_padding_step_together_as_they_would_alone(make_span):
    span = make_span()
    left_padded = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    sessions = []
    for seed, (tokens, padding) in enumerate([(3, None), (9, None), (5, left_padded), (1, None)]):
        batch = 1 if padding is None else padding.shape[0]
        sessions.append((_prefill(span, tokens, batch, seed, padding), _prefill(span, tokens, batch, seed, padding),
                         padding))
    for _ in range(3):  # several steps: the caches grow in step, each session at its own length
        alone, batched = _step_alone_and_batched(span, sessions)
        for a, b in zip(alone, batched):
            assert a.shape == b.shape
            torch.testing.assert_close(b, a, atol=ATOL, rtol=0)
        sessions = [(a, b, None if p is None else torch.cat([p, torch.ones(p.shape[0], 1, dtype=p.dtype)], 1))
                    for a, b, p in sessions]
    for alone_cache, batched_cache, _ in sessions:
        assert batched_cache.length == alone_cache.length


def test_several_new_tokens_per_session_batch_too(make_span):
    span = make_span()
    sessions = [(_prefill(span, n, seed=n), _prefill(span, n, seed=n), None) for n in (2, 6)]
    alone, batched = _step_alone_and_batched(span, sessions, new_tokens=3)
    for a, b in zip(alone, batched):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=0)


def test_steps_of_unequal_length_are_refused(make_span):
    span = make_span()
    caches = [span.new_cache(), span.new_cache()]
    hiddens = [torch.zeros(1, 1, 64), torch.zeros(1, 2, 64)]
    with pytest.raises(ValueError, match="same number of new tokens"):
        span.forward_batched(hiddens, caches, [SpanInput(None, 0), SpanInput(None, 0)])
