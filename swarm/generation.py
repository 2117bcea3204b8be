"""The decoding loop, independent of where the blocks run.

`decode` takes a `next_logits(new_token_ids, attention_mask) -> (batch, vocab)` function, so the same
loop drives the swarm and a local model (tests compare the two). Sampling uses transformers' own
logits processors, so the knobs mean what they mean in `transformers.generate`.

`next_logits` may raise `Rewind` when tokens it gave earlier turn out to be untrustworthy (a peer that
computed them was since caught cheating): the loop drops them and goes on from the last trusted token.
So may `settle`, called when the answer looks finished (the swarm waits there for the answer's spot checks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from swarm.errors import SwarmError

NextLogits = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
Stopping = Callable[[torch.Tensor, torch.Tensor], "bool | torch.Tensor"]  # (sequences, scores) -> done (per row)


MAX_REWINDS = 8  # per call: each one needs a newly blacklisted peer, so this is never reached in practice


class Streamer(Protocol):
    """transformers' streamer interface (`TextStreamer`, `TextIteratorStreamer`).

    A streamer may also have `rewind(kept_new_tokens: int)`, called when the newest tokens are dropped;
    one without it keeps what it already showed.
    """

    def put(self, value: torch.Tensor) -> None: ...

    def end(self) -> None: ...


class Rewind(Exception):
    """Raised by `next_logits`: only the first `keep` tokens of the sequence (prompt included) are trusted.

    The raiser has already rolled its state back, so the next call feeds the token at `keep - 1` (or the
    whole prompt again, if `keep` is the prompt's length).
    """

    def __init__(self, keep: int, reason: str = ""):
        super().__init__(f"rewinding to {keep} tokens" + (f": {reason}" if reason else ""))
        self.keep, self.reason = keep, reason


@dataclass
class DecodeStats:
    """Counts of one decoding run, filled in as it goes: how many tokens each call to the model brought.

    Through the swarm a call is one step through the whole route (one round trip per hop), so
    `tokens_per_round_trip` is what speculative decoding (`swarm.speculative`) raises above 1.
    """

    round_trips: int = 0  # calls to the model (the prompt's included, and calls redone after a rewind)
    new_tokens: int = 0  # tokens of the answer (per row), set when decoding ends
    drafted: int = 0  # draft tokens sent to the model to verify
    accepted: int = 0  # draft tokens that the model's own choice confirmed

    @property
    def tokens_per_round_trip(self) -> float:
        return self.new_tokens / self.round_trips if self.round_trips else 0.0

    @property
    def acceptance(self) -> float:
        """The share of draft tokens accepted (0.0 when none were drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0 or self.min_new_tokens < 0:
            raise ValueError("max_new_tokens and min_new_tokens must be >= 0")
        if self.do_sample and self.temperature <= 0:
            raise ValueError("temperature must be > 0 when sampling")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


def logits_processors(cfg: SamplingConfig) -> LogitsProcessorList:
    """transformers' processors for the sampling knobs (min_new_tokens is handled in `decode`)."""
    processors = LogitsProcessorList()
    if cfg.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty))
    if cfg.do_sample:
        if cfg.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k > 0:
            processors.append(TopKLogitsWarper(cfg.top_k))
        if cfg.top_p < 1.0:
            processors.append(TopPLogitsWarper(cfg.top_p))
    return processors


def choose_tokens(
    logits: torch.Tensor, sequences: torch.Tensor, cfg: SamplingConfig, processors: LogitsProcessorList,
    eos: torch.Tensor, step: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's next token from its logits (batch, vocab) (changed in place) after `sequences`, `step` new
    tokens into the answer: (tokens (batch,), the processed scores (batch, vocab))."""
    if step < cfg.min_new_tokens and len(eos):
        logits[:, eos] = -float("inf")  # MinNewTokensLengthLogitsProcessor, without a vocab-sized copy
    scores = processors(sequences, logits)
    if cfg.do_sample:
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1), scores
    return scores.argmax(dim=-1), scores


@torch.inference_mode()
def decode(
    next_logits: NextLogits,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cfg: SamplingConfig,
    streamer: Streamer | None = None,
    settle: Callable[[], None] | None = None,
    stopping: Stopping | None = None,
    stats: DecodeStats | None = None,
) -> torch.Tensor:
    """Generate up to `max_new_tokens` after `input_ids` (batch, prompt); returns (batch, prompt + new).

    Rows that produced an end-of-sequence token are padded with `pad_token_id` until all are done.
    `stopping(sequences, scores)` (like transformers' stopping criteria) ends rows, or all of them, early.
    `settle()`, if given, runs when the answer is complete and may raise `Rewind` to reopen it.
    `stats`, if given, counts the calls to `next_logits` and the tokens they brought.
    """
    processors = logits_processors(cfg)
    prompt_length = input_ids.shape[1]
    sequences = input_ids
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    eos = torch.tensor(cfg.eos_token_ids, dtype=input_ids.dtype)
    stats = DecodeStats() if stats is None else stats
    if streamer is not None:
        streamer.put(input_ids.cpu())
    new_ids, new_mask = input_ids, attention_mask
    rewinds = 0
    while True:
        try:
            while sequences.shape[1] - prompt_length < cfg.max_new_tokens and not bool(finished.all()):
                step = sequences.shape[1] - prompt_length
                logits = next_logits(new_ids, new_mask).float()  # (batch, vocab)
                stats.round_trips += 1
                tokens, scores = choose_tokens(logits, sequences, cfg, processors, eos, step)
                tokens = torch.where(finished, torch.full_like(tokens, cfg.pad_token_id), tokens)
                sequences = torch.cat([sequences, tokens[:, None]], dim=1)
                if streamer is not None:
                    streamer.put(tokens.cpu())
                if len(eos):
                    finished |= torch.isin(tokens, eos)
                if stopping is not None:
                    finished |= torch.as_tensor(stopping(sequences, scores), dtype=torch.bool)
                new_ids = tokens[:, None]
                new_mask = None if attention_mask is None else torch.ones_like(new_ids)
            if settle is not None:
                settle()
            break
        except Rewind as rewind:
            rewinds += 1
            sequences, finished = restart_after(rewind, rewinds, sequences, prompt_length, eos, streamer)
            if sequences.shape[1] == prompt_length:
                new_ids, new_mask = input_ids, attention_mask
            else:
                new_ids = sequences[:, -1:]
                new_mask = None if attention_mask is None else torch.ones_like(new_ids)
    stats.new_tokens = sequences.shape[1] - prompt_length
    if streamer is not None:
        streamer.end()
    return sequences


def restart_after(
    rewind: Rewind, rewinds: int, sequences: torch.Tensor, prompt_length: int, eos: torch.Tensor,
    streamer: Streamer | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """After the `rewinds`-th `Rewind` of a call: the trusted part of `sequences`, and which rows had ended in it
    (the streamer is told). Raises `SwarmError` once there were more than `MAX_REWINDS`."""
    if rewinds > MAX_REWINDS:
        raise SwarmError(
            f"gave up after {MAX_REWINDS} restarts of this answer: peers on its route kept being caught "
            f"returning wrong results ({rewind.reason or 'untrusted outputs'})"
        ) from None
    sequences, finished = _rewind_to(sequences, max(rewind.keep, prompt_length), prompt_length, eos)
    if streamer is not None and hasattr(streamer, "rewind"):
        streamer.rewind(sequences.shape[1] - prompt_length)
    return sequences, finished


def _rewind_to(
    sequences: torch.Tensor, keep: int, prompt_length: int, eos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `keep` tokens, and which rows had already ended among them."""
    kept = sequences[:, :keep]
    generated = kept[:, prompt_length:]
    if len(eos) == 0 or generated.shape[1] == 0:
        return kept, torch.zeros(kept.shape[0], dtype=torch.bool)
    return kept, torch.isin(generated, eos).any(dim=1)
