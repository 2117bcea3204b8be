"""Scheduling sessions' steps on a peer's compute thread.

Steps are queued, and the compute thread takes work from the queue one run at a time:
- decode steps (a few new tokens) of different sessions that wait together on the same blocks run as one batched
  forward (`BlockSpan.forward_batched`); each session keeps its own cache, length, positions and padding;
- a long prefill runs in chunks of `prefill_chunk` tokens, alternating with the decode batches, so one long prompt
  does not stall every other session's next token;
- a step that carries deep prompts runs alone (each chunk of a prefill gets its positions' part of them).

A lone session never waits for company: its step runs at once. While several sessions step on the same blocks, a
decode step that finds the thread idle waits a little (`wait_fraction` of the last decode run, `MAX_WAIT` at most)
for the steps of the others, which keeps their steps together: without it, sessions drift apart in a chain of
peers, each peer computes them one by one, and on a busy CPU eight single-row runs cost about six times one run of
eight rows. Steps that arrive while the thread is busy run together next (continuous batching).

A lone session's short decode step (no other session stepped within `LONE_WINDOW` seconds, the compute thread idle,
and such steps measured to take at most `inline_seconds`) runs on the event loop itself: the hand-off to the compute
thread and back costs about 0.7 ms, a quarter of a loopback hop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable

import torch

from swarm.blocks import SpanCache, SpanInput

logger = logging.getLogger(__name__)

DECODE_TOKENS = 8  # steps of at most this many new tokens per row batch together (decode, speculative drafts)
LONE_WINDOW = 1.0  # seconds: a session is alone when no other session stepped within this long
MAX_WAIT = 0.05  # seconds a decode step waits at most for other sessions' steps


@dataclass
class StepJob:
    """One session's step: its input (wire dtype, CPU), cache and blocks, and where its result goes."""

    hidden: torch.Tensor
    cache: SpanCache
    span_input: SpanInput
    start: int
    end: int
    work: tuple[str, int, int]  # (session id, step, cumulative batch x tokens) for the receipt
    future: asyncio.Future
    prompts: torch.Tensor | None = None  # deep prompts (end - start, prompt_length, hidden), wire dtype, CPU
    sign: bool = True  # False: the result comes without its receipt (the caller signs it, after pushing it on)
    inputs: torch.Tensor | None = None  # `hidden` on the compute device and dtype, once a decode run cast it
    done_tokens: int = 0  # of a chunked prefill: tokens computed so far
    pieces: list[torch.Tensor] = field(default_factory=list)  # of a chunked prefill: outputs so far

    @property
    def rows(self) -> int:
        return self.hidden.shape[0]

    @property
    def new_tokens(self) -> int:
        return self.hidden.shape[1]

    def batch_key(self) -> tuple[int, int, int]:
        return self.start, self.end, self.new_tokens


@dataclass
class SchedulerStats:
    runs: int = 0  # runs of the compute thread for steps
    batched_steps: int = 0  # steps that ran in a batch with other sessions' steps
    largest_batch: int = 1  # most sessions in one run
    prefill_chunks: int = 0  # runs that computed part of a longer prefill
    inline_runs: int = 0  # lone sessions' decode steps that ran on the event loop
    waits: int = 0  # decode runs that waited for other sessions' steps


# (jobs of one batch) -> per job, (output in the compute dtype on the compute device, input on the same)
BatchRunner = Callable[[list[StepJob]], list[torch.Tensor]]
# (job, first token, end token) -> output of that chunk
ChunkRunner = Callable[[StepJob, int, int], torch.Tensor]
# (job, full output) -> (reply tensor, receipt), on the compute thread
Finisher = Callable[[StepJob, torch.Tensor], tuple[torch.Tensor, str]]


def take_decode_batch(queue: deque[StepJob], max_rows: int, max_steps: int) -> list[StepJob]:
    """The oldest decode step and every later one that can run with it (same blocks and new tokens), up to
    `max_rows` rows and `max_steps` steps in all; removed from `queue`. A step with deep prompts runs alone."""
    first = queue[0]
    batch, rows, kept = [first], first.rows, deque()
    queue.popleft()
    while queue:
        job = queue.popleft()
        if (job.batch_key() == first.batch_key() and rows + job.rows <= max_rows and len(batch) < max_steps
                and first.prompts is None and job.prompts is None):
            batch.append(job)
            rows += job.rows
        else:
            kept.append(job)
    queue.extend(kept)
    return batch


def chunk_bounds(job: StepJob, chunk_tokens: int) -> tuple[int, int]:
    """The next chunk [first, end) of a prefill's new tokens: `chunk_tokens` batch x tokens at most (one token
    at least)."""
    per_row = max(chunk_tokens // job.rows, 1)
    return job.done_tokens, min(job.done_tokens + per_row, job.new_tokens)


def chunk_input(span_input: SpanInput, first: int, end: int) -> SpanInput:
    """The SpanInput of new tokens [first, end) of a step described by `span_input`."""
    mask = span_input.attention_mask
    if mask is not None:
        mask = mask[:, : span_input.start_position + end]
    return SpanInput(attention_mask=mask, start_position=span_input.start_position + first)


class StepScheduler:
    """Runs queued steps on `executor` (one thread): decode batches and prefill chunks, in turn."""

    def __init__(self, executor: Executor, run_batch: BatchRunner, run_chunk: ChunkRunner, finish: Finisher,
                 max_rows: int, prefill_chunk: int, max_steps: int = 64, inline_seconds: float = 0.0,
                 wait_fraction: float = 0.0):
        self._executor = executor
        self._run_batch, self._run_chunk, self._finish = run_batch, run_chunk, finish
        self.max_rows, self.prefill_chunk, self.max_steps = max_rows, prefill_chunk, max_steps
        self.inline_seconds = inline_seconds  # 0: every step goes to the compute thread
        self.wait_fraction = wait_fraction  # 0: a decode step never waits for other sessions' steps
        self._decodes: deque[StepJob] = deque()
        self._prefills: deque[StepJob] = deque()
        self._worker: asyncio.Task | None = None
        self._decode_next = True  # whose turn it is when both kinds wait
        self._calls = 0  # other work on the compute thread (`call`) in flight
        self._last_step: dict[str, float] = {}  # session id -> when it last submitted a step
        self._last_decode: dict[str, tuple[int, int, int]] = {}  # session id -> batch key of its last decode step
        self._lone_step_seconds = 0.0  # how long the last decode step that ran alone took
        self._decode_seconds = 0.0  # how long the last decode run took
        self._arrived = asyncio.Event()  # set when a decode step is queued
        self.stats = SchedulerStats()

    async def call(self, fn: Callable[[], object]) -> object:
        """Run other work (a training pass, a stateless forward) on the compute thread."""
        self._calls += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
        finally:
            self._calls -= 1

    async def submit(self, job: StepJob) -> tuple[torch.Tensor, str]:
        """Queue a step; its (reply tensor, receipt) once computed."""
        alone = self._note_step(job.work[0])
        if alone and self._runs_inline(job):
            self.stats.inline_runs += 1
            (result,) = self._compute_batch([job])
            return result
        if job.new_tokens <= DECODE_TOKENS and job.rows <= self.max_rows:
            self._decodes.append(job)
            self._last_decode[job.work[0]] = job.batch_key()
            self._arrived.set()
        else:
            self._prefills.append(job)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())
        return await job.future

    def forget(self, session_id: str) -> None:
        """A session closed: steps of other sessions no longer wait for its steps."""
        self._last_step.pop(session_id, None)
        self._last_decode.pop(session_id, None)

    def _expected(self, key: tuple[int, int, int]) -> set[str]:
        """Sessions that recently ran decode steps like `key` and have none queued now (nor a prefill)."""
        now = time.monotonic()
        queued = {job.work[0] for job in self._decodes if job.batch_key() == key}
        queued |= {job.work[0] for job in self._prefills}
        return {session for session, when in self._last_step.items()
                if now - when <= LONE_WINDOW and self._last_decode.get(session) == key and session not in queued}

    async def _wait_for_company(self) -> None:
        """Before a decode run, wait (a fraction of the last decode run's time at most) for the steps of other
        sessions that step on the same blocks."""
        key = self._decodes[0].batch_key()
        budget = min(self.wait_fraction * self._decode_seconds, MAX_WAIT)
        if budget <= 0 or not self._expected(key):
            return
        self.stats.waits += 1
        deadline = time.monotonic() + budget
        while self._expected(key) and (left := deadline - time.monotonic()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                return

    def _note_step(self, session: str) -> bool:
        """Record that `session` stepped now; whether it is alone (no other session stepped within LONE_WINDOW)."""
        now = time.monotonic()
        alone = all(now - when > LONE_WINDOW for other, when in self._last_step.items() if other != session)
        if len(self._last_step) > 4 * self.max_steps:  # forget sessions long gone
            self._last_step = {k: v for k, v in self._last_step.items() if now - v <= LONE_WINDOW}
        self._last_step[session] = now
        return alone

    def _runs_inline(self, job: StepJob) -> bool:
        """Whether a lone session's step runs on the event loop: short, and nothing else on the compute thread."""
        return (0 < self.inline_seconds and self._lone_step_seconds <= self.inline_seconds and self._calls == 0
                and (self._worker is None or self._worker.done()) and not self._decodes and not self._prefills
                and job.new_tokens <= DECODE_TOKENS and job.rows <= self.max_rows and job.prompts is None)

    async def _work(self) -> None:
        try:
            await self._work_queue()
        except BaseException as e:  # never leave a queued step waiting forever (shutdown, or a bug here)
            error = e if isinstance(e, Exception) else RuntimeError("the peer is shutting down")
            for job in [*self._decodes, *self._prefills]:
                if not job.future.done():
                    job.future.set_exception(error)
            self._decodes.clear()
            self._prefills.clear()
            raise

    async def _work_queue(self) -> None:
        loop = asyncio.get_running_loop()
        while self._decodes or self._prefills:
            if self._decodes and (self._decode_next or not self._prefills):
                if self.max_steps > 1:
                    await self._wait_for_company()
                batch = take_decode_batch(self._decodes, self.max_rows, self.max_steps)
                await self._run(loop, batch, self._compute_batch)
                self._decode_next = False
            else:
                job = self._prefills.popleft()
                await self._run(loop, [job], self._compute_chunk)
                if not job.future.done() and job.done_tokens < job.new_tokens:
                    self._prefills.appendleft(job)  # next prefill turn continues it
                self._decode_next = True

    async def _run(self, loop: asyncio.AbstractEventLoop, jobs: list[StepJob],
                   compute: Callable[[list[StepJob]], list[tuple[torch.Tensor, str] | None]]) -> None:
        try:
            results = await loop.run_in_executor(self._executor, compute, jobs)
        except Exception as e:  # every step of the run gets the error; the scheduler goes on
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        for job, result in zip(jobs, results):
            if result is not None and not job.future.done():  # done already: its client went away
                job.future.set_result(result)

    def _compute_batch(self, jobs: list[StepJob]) -> list[tuple[torch.Tensor, str]]:
        self.stats.runs += 1
        if len(jobs) > 1:
            self.stats.batched_steps += len(jobs)
            self.stats.largest_batch = max(self.stats.largest_batch, len(jobs))
        began = time.perf_counter()
        outputs = self._run_batch(jobs)
        results = [self._finish(job, output) for job, output in zip(jobs, outputs)]
        self._decode_seconds = time.perf_counter() - began
        if len(jobs) == 1:
            self._lone_step_seconds = self._decode_seconds
        return results

    def _compute_chunk(self, jobs: list[StepJob]) -> list[tuple[torch.Tensor, str] | None]:
        (job,) = jobs
        self.stats.runs += 1
        first, end = chunk_bounds(job, self.prefill_chunk)
        if first > 0 or end < job.new_tokens:
            self.stats.prefill_chunks += 1
        job.pieces.append(self._run_chunk(job, first, end))
        job.done_tokens = end
        if end < job.new_tokens:
            return [None]
        output = job.pieces[0] if len(job.pieces) == 1 else torch.cat(job.pieces, dim=1)
        job.pieces.clear()
        return [self._finish(job, output)]
