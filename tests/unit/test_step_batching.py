"""The peer's step scheduler (peers.batching) through a BlockHandler: decode steps of sessions that wait together
run as one batched forward, long prefills run in chunks between them, and every session gets what it would alone."""

from __future__ import annotations

import asyncio
import threading
from collections import deque

import pytest
import torch

from handler_kit import Stream, hidden
from peers.handler import BlockHandler
from peers.batching import StepJob, chunk_bounds, chunk_input, take_decode_batch
from swarm.blocks import SpanInput

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ATOL = 1e-5


def _job(rows: int = 1, tokens: int = 1, start: int = 0, end: int = 3) -> StepJob:
    return StepJob(torch.zeros(rows, tokens, 4), None, SpanInput(None, 0), start, end, ("s", 0, 0), None)


def test_a_decode_batch_takes_every_compatible_step_within_the_limits():
    queue = deque([_job(), _job(end=2), _job(tokens=2), _job(rows=2), _job(), _job()])
    batch = take_decode_batch(queue, max_rows=4, max_steps=8)
    assert [(j.rows, j.new_tokens, j.end) for j in batch] == [(1, 1, 3), (2, 1, 3), (1, 1, 3)]
    assert [(j.rows, j.new_tokens, j.end) for j in queue] == [(1, 1, 2), (1, 2, 3), (1, 1, 3)]  # order kept
    assert len(take_decode_batch(deque([_job(), _job(), _job()]), max_rows=8, max_steps=1)) == 1


def test_prefill_chunks_cover_the_tokens_and_slice_the_mask():
    job = _job(rows=2, tokens=7)
    assert chunk_bounds(job, chunk_tokens=6) == (0, 3)
    job.done_tokens = 6
    assert chunk_bounds(job, chunk_tokens=6) == (6, 7)
    mask = torch.ones(2, 10)
    part = chunk_input(SpanInput(mask, start_position=3), 2, 5)
    assert part.start_position == 5 and part.attention_mask.shape == (2, 8)


async def _hold_compute_thread(handler) -> threading.Event:
    """Occupy the handler's compute thread until the returned event is set, so steps queue up meanwhile."""
    release, started = threading.Event(), threading.Event()
    asyncio.ensure_future(handler.scheduler.call(lambda: (started.set(), release.wait(10))))
    await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
    return release


def test_decode_steps_of_sessions_waiting_together_run_as_one_batch(make_handler):
    handler = make_handler(max_sessions=4, cache_tokens=4 * 16)
    alone = make_handler(max_sessions=4, cache_tokens=4 * 16, batch_sessions=False)

    async def run(h, hold: bool) -> list[torch.Tensor]:
        streams = [Stream(h) for _ in range(3)]
        for i, stream in enumerate(streams):  # prompts of different lengths
            reply, _ = await stream.step(f"s{i}", 0, hidden(1, 2 + 3 * i, seed=i))
            assert reply.error is None, reply.error
        release = await _hold_compute_thread(h) if hold else None
        steps = [asyncio.ensure_future(s.step(f"s{i}", 2 + 3 * i, hidden(1, 1, seed=10 + i)))
                 for i, s in enumerate(streams)]
        await asyncio.sleep(0.05)
        if release is not None:
            release.set()
        outputs = []
        for step in steps:
            reply, tensors = await step
            assert reply.error is None, reply.error
            assert reply.length == 2 + 3 * len(outputs) + 1
            outputs.append(tensors[0])
        return outputs

    batched = asyncio.run(run(handler, hold=True))
    reference = asyncio.run(run(alone, hold=False))
    assert handler.scheduler.stats.largest_batch == 3 and handler.scheduler.stats.batched_steps == 3
    assert alone.scheduler.stats.batched_steps == 0
    for b, a in zip(batched, reference):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=0)


def test_a_long_prefill_runs_in_chunks_and_lets_a_decode_step_through(make_handler):
    handler = make_handler(max_sessions=4, cache_tokens=4 * 32, max_length=32, prefill_chunk_tokens=4)
    whole = make_handler(max_sessions=4, cache_tokens=4 * 32, max_length=32)
    prompt = hidden(1, 13, seed=3)

    async def run():
        short, long = Stream(handler), Stream(handler)
        reply, _ = await short.step("short", 0, hidden(1, 2, seed=1), max_length=32)
        assert reply.error is None, reply.error
        release = await _hold_compute_thread(handler)
        finished: list[str] = []

        async def tracked(name, coro):
            result = await coro
            finished.append(name)
            return result

        prefill = asyncio.ensure_future(tracked("prefill", long.step("long", 0, prompt, max_length=32)))
        await asyncio.sleep(0.02)
        decode = asyncio.ensure_future(tracked("decode", short.step("short", 2, hidden(1, 1, seed=2), max_length=32)))
        await asyncio.sleep(0.02)
        release.set()
        (reply, tensors), (decoded, _) = await prefill, await decode
        assert reply.error is None and reply.length == 13 and decoded.error is None
        return tensors[0], finished

    chunked, order = asyncio.run(run())
    assert order == ["decode", "prefill"]  # the decode step ran after the first chunk, not after the whole prompt
    assert handler.scheduler.stats.prefill_chunks == 4  # 13 tokens in chunks of 4

    async def reference():
        reply, tensors = await Stream(whole).step("long", 0, prompt, max_length=32)
        return tensors[0]

    torch.testing.assert_close(chunked, asyncio.run(reference()), atol=ATOL, rtol=0)


def _record_compute_threads(handler, monkeypatch) -> list[str]:
    """The name of the thread each of the handler's span forwards ran on, in order."""
    threads: list[str] = []
    run_span = handler.span.forward
    monkeypatch.setattr(handler.span, "forward",
                        lambda *args: threads.append(threading.current_thread().name) or run_span(*args))
    return threads


async def _decode(stream: Stream, session: str, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """A prefill of 3 tokens, then `steps` decode steps; every reply's output."""
    outputs = []
    for position, tokens in [(0, 3)] + [(3 + i, 1) for i in range(steps)]:
        reply, tensors = await stream.step(session, position, hidden(1, tokens, seed=seed + position))
        assert reply.error is None, reply.error
        outputs.append(tensors[0])
    return outputs


def test_a_lone_sessions_short_steps_run_on_the_event_loop_with_the_same_outputs(make_handler, monkeypatch):
    inline, threaded = make_handler(), make_handler(inline_step_seconds=0)
    inline_threads = _record_compute_threads(inline, monkeypatch)
    threaded_threads = _record_compute_threads(threaded, monkeypatch)
    fast = asyncio.run(_decode(Stream(inline), "s", steps=4))
    slow = asyncio.run(_decode(Stream(threaded), "s", steps=4))
    assert inline_threads == ["MainThread"] * 5 and inline.scheduler.stats.inline_runs == 5
    assert all(name.startswith("compute") for name in threaded_threads) and threaded.scheduler.stats.inline_runs == 0
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_steps_go_to_the_compute_thread_when_another_session_is_stepping(make_handler, monkeypatch):
    handler = make_handler(max_sessions=4, cache_tokens=4 * 16)
    threads = _record_compute_threads(handler, monkeypatch)

    async def run() -> None:
        await _decode(Stream(handler), "first", steps=1)
        threads.clear()  # the second session steps within a second of the first: neither is alone any more
        await _decode(Stream(handler), "second", steps=2, seed=5)

    asyncio.run(run())
    assert len(threads) == 3 and all(name.startswith("compute") for name in threads)


def test_steps_go_to_the_compute_thread_once_one_took_longer_than_the_limit(make_handler, monkeypatch):
    handler = make_handler(inline_step_seconds=1e-9)  # any measured step is longer
    threads = _record_compute_threads(handler, monkeypatch)
    asyncio.run(_decode(Stream(handler), "s", steps=2))
    assert threads[0] == "MainThread" and all(name.startswith("compute") for name in threads[1:])


def test_a_lone_step_waits_for_other_work_on_the_compute_thread(make_handler, monkeypatch):
    handler = make_handler()
    threads = _record_compute_threads(handler, monkeypatch)

    async def run() -> list[str]:
        release = await _hold_compute_thread(handler)
        step = asyncio.ensure_future(_decode(Stream(handler), "s", steps=0))
        await asyncio.sleep(0.05)
        ran_before_release = list(threads)
        release.set()
        await step
        return ran_before_release

    assert asyncio.run(run()) == []  # nothing ran beside the other work
    assert len(threads) == 1 and threads[0].startswith("compute")


class _SeesInputs(BlockHandler):
    """Keeps the input each finished step's `transform_step` was given."""

    seen: list[torch.Tensor]

    def transform_step(self, inputs, output, span_input):
        self.seen.append(inputs)
        return output


def test_a_decode_step_is_cast_to_the_compute_dtype_once(make_handler, monkeypatch):
    handler = make_handler(_SeesInputs, dtype=torch.float64)  # float32 on the wire: the cast makes a new tensor
    handler.span.double()
    handler.seen, ran = [], []
    run_span = handler.span.forward
    monkeypatch.setattr(handler.span, "forward", lambda inputs, *rest: ran.append(inputs) or run_span(inputs, *rest))

    async def run() -> None:
        stream = Stream(handler)
        for position, tokens in ((0, 3), (3, 1)):
            reply, _ = await stream.step("s", position, hidden(1, tokens, seed=position))
            assert reply.error is None, reply.error

    asyncio.run(run())
    assert len(ran) == len(handler.seen) == 2
    assert all(seen is blocks_input for seen, blocks_input in zip(handler.seen, ran))  # the very tensor, no copy
    assert all(seen.dtype == torch.float64 for seen in handler.seen)


def test_a_decode_step_waits_for_the_step_of_another_session_and_they_run_as_one_batch(make_handler):
    """The peer's half of keeping concurrent sessions in step: a step waits (a share of the last decode run, capped)
    for the next step of a session that stepped on the same blocks; a closed session is not waited for."""
    handler = make_handler(max_sessions=4, cache_tokens=4 * 16, batch_wait_fraction=1e6)  # capped at MAX_WAIT

    async def run() -> None:
        a, b = Stream(handler), Stream(handler)
        for stream, name, seed in ((a, "a", 0), (b, "b", 5)):
            reply, _ = await stream.step(name, 0, hidden(1, 3, seed=seed))
            assert reply.error is None, reply.error

        async def later(stream, name, position, delay):
            await asyncio.sleep(delay)
            return await stream.step(name, position, hidden(1, 1, seed=position))

        stats = handler.scheduler.stats
        for position, delay in ((3, 0.0), (4, 0.01)):  # b's second step comes 10 ms after a's and joins its batch
            batched_before = stats.batched_steps
            replies = await asyncio.gather(later(a, "a", position, 0.0), later(b, "b", position, delay))
            assert all(reply.error is None for reply, _ in replies)
        assert stats.batched_steps == batched_before + 2 and stats.waits >= 1
        waits = handler.scheduler.stats.waits
        await b.step("b", 5, hidden(1, 1, seed=9), close=True)
        reply, _ = await a.step("a", 5, hidden(1, 1, seed=9))
        assert reply.error is None and handler.scheduler.stats.waits == waits  # b closed: a ran without waiting

    asyncio.run(run())
