"""Logits of concurrent sessions in one pass of the LM head.

A client that serves several users at once (`swarm-chat serve`, or threads of the Python API) computes each
session's next-token logits on its own thread. The LM head is one large matrix (vocabulary x hidden), and a
single token's logits read all of it, so eight sessions' tokens cost eight reads of it when one would do. Calls
that arrive while another is computing wait and then run together (continuous batching, as the peers do with
decode steps): a lone call never waits for company.

Calls say which session they come from (`member`). While several sessions generate, a call waits a little (half of
its session's time between calls, `MAX_WAIT` at most) for the calls of the other sessions that called recently and
have not closed (`forget`). That keeps concurrent sessions in step: their next steps leave together, and each peer
computes them in one batched run. Without it, sessions drift apart along a chain of peers, and each peer computes
them one by one. This is the one place that waits that long: the peers wait only for steps that leave together.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

ACTIVE_WINDOW = 1.0  # seconds: a session that called within this long is expected to call again
MAX_WAIT = 0.25  # seconds a call waits at most for other sessions' calls


@dataclass
class _Call:
    hidden: torch.Tensor
    member: object = None
    result: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = False


class BatchedLogits:
    """`logits(hidden)` for (batch, tokens, hidden), batching concurrent single-token calls of the same dtype."""

    def __init__(self, logits: Callable[[torch.Tensor], torch.Tensor]):
        self._logits = logits
        self._cond = threading.Condition()
        self._waiting: list[_Call] = []
        self._busy = False
        self._last_call: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # member -> (when, thread) of its last call
        self.batched_calls = 0  # calls computed together with others
        self.waits = 0  # calls that waited for other sessions' calls

    def forget(self, member: object) -> None:
        """`member` closed: calls no longer wait for its calls."""
        with self._cond:
            self._last_call.pop(member, None)
            self._cond.notify_all()

    def __call__(self, hidden: torch.Tensor, member: object = None) -> torch.Tensor:
        if hidden.shape[1] != 1:
            return self._logits(hidden)
        call = _Call(hidden, member)
        with self._cond:
            now = time.monotonic()
            previous = self._last_call.get(member, (None, None))[0] if member is not None else None
            if member is not None:
                self._last_call[member] = (now, threading.get_ident())
            self._waiting.append(call)
            self._cond.notify_all()  # calls waiting for company check again
            deadline = now + (min((now - previous) / 2, MAX_WAIT) if previous is not None else 0.0)
            if self._missing(now) and deadline > now:
                self.waits += 1
            while not call.done and (self._busy or (self._missing(now) and time.monotonic() < deadline)):
                self._cond.wait(None if self._busy else max(deadline - time.monotonic(), 0.0))
            if call.done:
                return self._result(call)
            # this thread computes every waiting call of its dtype (its own among them)
            batch = [c for c in self._waiting if c.hidden.dtype == hidden.dtype]
            self._waiting = [c for c in self._waiting if c.hidden.dtype != hidden.dtype]
            self._busy = True
        try:
            logits = self._logits(torch.cat([c.hidden for c in batch])) if len(batch) > 1 else self._logits(hidden)
            rows = 0
            for c in batch:
                c.result, rows = logits[rows:rows + c.hidden.shape[0]], rows + c.hidden.shape[0]
        except BaseException as e:  # every call of the batch gets the error
            for c in batch:
                c.error = e
        finally:
            with self._cond:
                for c in batch:
                    c.done = True
                if len(batch) > 1:
                    self.batched_calls += len(batch)
                self._busy = False
                self._cond.notify_all()
        return self._result(call)

    def _missing(self, now: float) -> bool:
        """Whether a session that called recently, from another thread than this one, has no call waiting (one
        thread that steps several sessions in turn can never have their calls wait together)."""
        waiting, me = {c.member for c in self._waiting}, threading.get_ident()
        return any(now - when <= ACTIVE_WINDOW and thread != me and member not in waiting
                   for member, (when, thread) in self._last_call.items())

    @staticmethod
    def _result(call: _Call) -> torch.Tensor:
        if call.error is not None:
            raise call.error
        return call.result
