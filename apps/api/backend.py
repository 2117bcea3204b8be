"""Generation for the HTTP API: each request gets its own inference session, run on a worker thread.

Concurrent requests run side by side in a thread pool (`workers` at once): sessions are independent, and
all P2P work of the shared client is done on its one event loop, so threads never share mutable state
except through that loop. Text reaches the caller through `on_text` as soon as it is certain (not the
start of a stop sequence, not half of a multi-byte character). Each result says how much of the answer spot
checks verified; a non-streamed answer (or any answer, when `strict`) waits for its checks first.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from apps.api.schema import Verification
from apps.streaming import StreamedText
from swarm.errors import SwarmError

logger = logging.getLogger(__name__)


class RequestTooLong(SwarmError):
    """The prompt plus max_tokens would not fit in a session."""


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int | None  # None: as many as fit
    temperature: float  # 0: greedy
    top_p: float
    stop: tuple[str, ...]


@dataclass(frozen=True)
class GenerationResult:
    text: str
    finish_reason: str  # "stop" (end of sequence or a stop sequence) or "length"
    prompt_tokens: int
    completion_tokens: int
    verification: Verification | None = None  # None: the generation was cut short (the client went away)


class _Finished(Exception):
    """Raised inside the decoding loop to end it at once (the client went away)."""


class TextCollector(StreamedText):
    """A streamer (transformers' interface) that decodes new tokens and passes on the certain text; it ends
    generation at once (raising `_Finished`) once `cancelled` is set. `stopping` is the stopping criterion
    that ends the answer at a stop sequence."""

    def __init__(self, tokenizer, stop: tuple[str, ...], eos_ids: tuple[int, ...],
                 on_text: Callable[[str], None] | None, cancelled: threading.Event):
        super().__init__(tokenizer, stop, on_text)
        self.eos_ids, self.cancelled = eos_ids, cancelled
        self.saw_eos = False
        self.retracted = False  # text already streamed came from a peer since caught cheating

    def put(self, value: torch.Tensor) -> None:
        if self._seen_prompt and self.cancelled.is_set():
            raise _Finished()
        super().put(value)
        self.saw_eos = bool(self.tokens) and self.tokens[-1] in self.eos_ids

    def stopping(self, sequences: torch.Tensor, scores: torch.Tensor) -> bool:
        return self.stopped

    def rewind(self, kept_new_tokens: int) -> None:
        """The newest tokens were dropped (a peer that computed them was caught cheating). A non-streamed
        answer loses them; text already streamed cannot be taken back, and the stream goes on from the
        kept tokens."""
        if self.on_text is not None and len(self._sent_after) > kept_new_tokens + 1 \
                and self._sent_after[-1] > self._sent_after[kept_new_tokens]:
            self.retracted = True
            logger.warning("Text already streamed came from a peer since caught cheating; the rest is regenerated")
        super().rewind(kept_new_tokens)
        self.saw_eos = bool(self.tokens) and self.tokens[-1] in self.eos_ids


class SwarmBackend:
    """Runs requests against one `DistributedModelForCausalLM`."""

    def __init__(self, model, max_length: int, default_max_tokens: int, workers: int, strict: bool = False,
                 prompt_lookup: int = 0):
        self.model = model
        self.prompt_lookup = prompt_lookup  # draft tokens per step (speculative decoding); 0: off
        self.strict = strict  # streamed answers wait for their checks too (the client checks every step)
        self.tokenizer = model.tokenizer
        self.max_length = max_length  # session length: prompt + new tokens
        self.default_max_tokens = default_max_tokens
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="generate")

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False))

    def text_prompt(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def budget(self, prompt_ids: list[int], max_new_tokens: int | None) -> int:
        """New tokens to allow; RequestTooLong if the request cannot fit in a session."""
        room = self.max_length - len(prompt_ids)
        if max_new_tokens is None:
            max_new_tokens = min(self.default_max_tokens, room)
        if not prompt_ids or max_new_tokens > room or room < 1:
            raise RequestTooLong(
                f"this server's context is {self.max_length} tokens; the prompt has {len(prompt_ids)} and "
                f"{max_new_tokens} more were asked for"
            )
        return max_new_tokens

    def generate(self, prompt_ids: list[int], params: GenerationParams,
                 on_text: Callable[[str], None] | None = None,
                 cancelled: threading.Event | None = None) -> GenerationResult:
        """Blocking: run on a worker thread. Raises SwarmError if the swarm cannot serve the request."""
        max_new = self.budget(prompt_ids, params.max_new_tokens)
        collector = TextCollector(self.tokenizer, params.stop, self.model.eos_token_ids, on_text,
                                  cancelled or threading.Event())
        verification = None
        try:
            result = self.model.generate(
                torch.tensor([prompt_ids]),
                max_new_tokens=max_new,
                do_sample=params.temperature > 0,
                temperature=params.temperature if params.temperature > 0 else 1.0,
                top_p=params.top_p,
                streamer=collector,
                # a streamed answer is out already: it waits for its checks only in strict mode
                settle_checks=None if on_text is None or self.strict else False,
                stopping_criteria=collector.stopping,
                return_dict_in_generate=True,
                prompt_lookup_num_tokens=self.prompt_lookup,
            )
            report = result.report
            verification = Verification(coverage=report.coverage, verified_steps=report.verified, steps=report.steps,
                                         flagged=report.flagged or collector.retracted)
        except _Finished:  # generate() closed its session on the way out
            pass
        text = collector.finish()
        generated = len(collector.tokens)
        finish = "stop" if collector.stopped or collector.saw_eos else "length"
        return GenerationResult(text, finish, len(prompt_ids), generated, verification)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
