"""BatchedLogits: concurrent single-token logits calls run as one pass, each getting exactly its own rows."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from swarm.head_batching import BatchedLogits

WEIGHT = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))


def test_calls_waiting_while_one_computes_run_together_and_get_their_own_rows():
    passes: list[int] = []
    first_started = threading.Event()

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        passes.append(hidden.shape[0])
        first_started.set()
        time.sleep(0.2)  # long enough for the other threads to queue behind this pass
        return hidden @ WEIGHT

    batched = BatchedLogits(logits)
    inputs = [torch.randn(rows, 1, 8, generator=torch.Generator().manual_seed(i)) for i, rows in enumerate([1, 2, 1, 1])]
    results: list = [None] * len(inputs)

    def run(i: int) -> None:
        results[i] = batched(inputs[i])

    threads = [threading.Thread(target=run, args=(0,))]
    threads[0].start()
    first_started.wait(5)
    threads += [threading.Thread(target=run, args=(i,)) for i in range(1, len(inputs))]
    for thread in threads[1:]:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert passes == [1, 4]  # the first alone (nothing waits for company), then the three that queued, together
    for got, x in zip(results, inputs):
        torch.testing.assert_close(got, x @ WEIGHT)
    assert batched.batched_calls == 3


def test_a_multi_token_call_is_computed_alone_and_errors_reach_every_caller():
    batched = BatchedLogits(lambda hidden: hidden @ WEIGHT)
    x = torch.randn(1, 5, 8)
    torch.testing.assert_close(batched(x), x @ WEIGHT)

    def broken(hidden: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no memory")

    with pytest.raises(RuntimeError, match="no memory"):
        BatchedLogits(broken)(torch.randn(1, 1, 8))


class _Session:
    """Stands for a client session (the members BatchedLogits keeps track of, weakly)."""


def _recording(passes: list[int]):
    def logits(hidden: torch.Tensor) -> torch.Tensor:
        passes.append(hidden.shape[0])
        return hidden @ WEIGHT
    return logits


def _call_later(batched: BatchedLogits, member, delay: float, results: dict,
                hold: threading.Event | None = None) -> threading.Thread:
    """Call for `member` after `delay` seconds on a new thread; with `hold`, the thread lives until it is set (so no
    later thread gets its id: calls of one thread never wait for each other)."""
    called = threading.Event()

    def run() -> None:
        time.sleep(delay)
        results[member] = batched(torch.ones(1, 1, 8), member=member)
        called.set()
        if hold is not None:
            hold.wait(10)
    thread = threading.Thread(target=run)
    thread.start()
    if hold is not None:
        thread.called = called
    return thread


def test_a_session_waits_for_the_other_generating_sessions_calls_and_they_run_as_one_pass():
    passes: list[int] = []
    batched = BatchedLogits(_recording(passes))
    a, b = _Session(), _Session()
    hold = threading.Event()
    for member in (a, b):
        _call_later(batched, member, 0.0, {}, hold).called.wait(10)
    time.sleep(0.3)  # the sessions' time between calls: a waits up to half of it
    results: dict = {}
    threads = [_call_later(batched, a, 0.0, results, hold), _call_later(batched, b, 0.05, results, hold)]
    for thread in threads:
        thread.called.wait(10)
    hold.set()
    assert passes == [1, 1, 2] and batched.waits == 1
    torch.testing.assert_close(results[a], torch.ones(1, 1, 8) @ WEIGHT)


def test_a_lone_session_and_a_session_whose_company_closed_never_wait():
    passes: list[int] = []
    batched = BatchedLogits(_recording(passes))
    a, b = _Session(), _Session()
    for _ in range(3):
        batched(torch.ones(1, 1, 8), member=a)
    hold = threading.Event()
    _call_later(batched, b, 0.0, {}, hold).called.wait(10)  # from another thread: a could wait for it
    batched.forget(b)
    began = time.monotonic()
    batched(torch.ones(1, 1, 8), member=a)
    hold.set()
    assert batched.waits == 0 and time.monotonic() - began < 0.1


def test_a_waiting_call_gives_up_after_half_its_sessions_time_between_calls():
    batched = BatchedLogits(_recording([]))
    a, b = _Session(), _Session()
    batched(torch.ones(1, 1, 8), member=a)
    hold = threading.Event()
    _call_later(batched, b, 0.0, {}, hold).called.wait(10)  # b called recently from another thread, and will not again
    time.sleep(0.2)
    began = time.monotonic()
    batched(torch.ones(1, 1, 8), member=a)
    waited = time.monotonic() - began
    hold.set()
    assert batched.waits == 1 and 0.08 < waited < 0.2  # about half of the 0.2 s since a's last call


def test_sessions_stepped_in_turn_by_one_thread_never_wait_for_each_other():
    """One thread cannot call for two sessions at once: waiting for the other would only add the wait to every call."""
    batched = BatchedLogits(_recording([]))
    a, b = _Session(), _Session()
    began = time.monotonic()
    for _ in range(4):
        batched(torch.ones(1, 1, 8), member=a)
        time.sleep(0.05)
        batched(torch.ones(1, 1, 8), member=b)
    assert batched.waits == 0 and time.monotonic() - began < 0.3 + 0.15
