"""Logits of concurrent sessions in one pass of the LM head.

A client that serves several users at once (`swarm-chat serve`, or threads of the Python API) computes each
session's next-token logits on its own thread. The LM head is one large matrix (vocabulary x hidden), and a
single token's logits read all of it, so eight sessions' tokens cost eight reads of it when one would do. Calls
that arrive while another is computing wait and then run together (continuous batching, as the peers do with
decode steps): a lone call never waits for company.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class _Call:
    hidden: torch.Tensor
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
        self.batched_calls = 0  # calls computed together with others

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[1] != 1:
            return self._logits(hidden)
        call = _Call(hidden)
        with self._cond:
            self._waiting.append(call)
            while self._busy and not call.done:
                self._cond.wait()
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

    @staticmethod
    def _result(call: _Call) -> torch.Tensor:
        if call.error is not None:
            raise call.error
        return call.result
