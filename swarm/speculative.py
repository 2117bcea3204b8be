"""Speculative decoding: a cheap local draft proposes tokens, the model checks them all in one call.

Each round sends the last token together with up to `num_draft_tokens` drafted ones (`swarm.drafting`) as
one step, so through the swarm it costs one round trip per hop, and takes the logits of every position it
sent. The token the model chooses at each position (the same choice `decode` would make there: argmax, or a
sample, after the same logits processors) is kept; while it equals the draft's next token, the next position's
logits are valid too. So a round brings the accepted draft tokens plus the model's first token of its own, at
least one token, and the answer is the one `decode` gives, token for token. Sampling stays exact as well: it
is Leviathan et al.'s speculative sampling (2023) for a draft that puts all its probability on one token (the
draft token is kept with the model's probability of it; otherwise the model's sample, which is not that
token, is kept), and it draws the same random numbers in the same order as `decode`. Then the model forgets
the rejected positions (`keep_cache`; swarm peers crop their KV caches at the next step).

One row at a time: the rows of a batch would accept different numbers of tokens, but a session's rows share
one position on every peer. `swarm.client.DistributedModelForCausalLM.generate` falls back to `decode` for
batches and padded prompts.

The same numbers in a different shape: a step of k tokens and k steps of one token compute the same logits up
to float rounding (different matrix shapes), so where two tokens are within rounding of each other the greedy
choice may differ. Outside such near-ties the answer is identical (tests check this against the local model).
"""

from __future__ import annotations

from typing import Callable

import torch

from swarm.drafting import DEFAULT_MAX_NGRAM, next_draft_length, prompt_lookup
from swarm.generation import (
    DecodeStats,
    Rewind,
    SamplingConfig,
    Stopping,
    Streamer,
    choose_tokens,
    logits_processors,
    restart_after,
)

# (new ids (1, new), how many of the last positions' logits) -> logits (1, last, vocab). May raise `Rewind`,
# like `decode`'s next_logits, after rolling its state back.
VerifyLogits = Callable[[torch.Tensor, int], torch.Tensor]
KeepCache = Callable[[int], None]  # forget every token of the sequence (prompt included) after the first n
Draft = Callable[[torch.Tensor, int, int], list[int]]  # (sequence (tokens,), at most, max n-gram) -> draft ids


@torch.inference_mode()
def decode_speculative(
    verify: VerifyLogits,
    keep_cache: KeepCache,
    input_ids: torch.Tensor,
    cfg: SamplingConfig,
    num_draft_tokens: int,
    max_ngram: int = DEFAULT_MAX_NGRAM,
    streamer: Streamer | None = None,
    settle: Callable[[], None] | None = None,
    stopping: Stopping | None = None,
    stats: DecodeStats | None = None,
    draft: Draft = prompt_lookup,
) -> torch.Tensor:
    """`swarm.generation.decode` for one row (`input_ids` (1, prompt)), with drafts of up to `num_draft_tokens`
    checked at once (fewer after rejected ones: `swarm.drafting.next_draft_length`); returns (1, prompt + new).
    Streamer, stopping criteria, `settle` and `Rewind` behave as there."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"speculative decoding takes one row at a time, not {input_ids.shape[0]}")
    processors = logits_processors(cfg)
    prompt_length = input_ids.shape[1]
    eos = torch.tensor(cfg.eos_token_ids, dtype=input_ids.dtype)
    stats = DecodeStats() if stats is None else stats
    sequences, finished = input_ids, False
    if streamer is not None:
        streamer.put(input_ids.cpu())
    rewinds, budget = 0, num_draft_tokens
    while True:
        try:
            while sequences.shape[1] - prompt_length < cfg.max_new_tokens and not finished:
                # the model holds every token but the last one (all of the prompt's at first, or after a rewind to it)
                pending = input_ids if sequences.shape[1] == prompt_length else sequences[:, -1:]
                room = cfg.max_new_tokens - (sequences.shape[1] - prompt_length)
                proposal = draft(sequences[0], min(budget, room - 1), max_ngram)
                fed = torch.cat([pending, torch.tensor([proposal], dtype=input_ids.dtype)], dim=1)
                logits = verify(fed, len(proposal) + 1).float()  # (1, 1 + drafted, vocab)
                stats.round_trips += 1
                stats.drafted += len(proposal)
                held = sequences.shape[1] + len(proposal)  # tokens the model holds now
                sequences, finished, accepted = _accept(logits, proposal, sequences, prompt_length, cfg, processors,
                                                        eos, streamer, stopping, stats)
                budget = next_draft_length(budget, len(proposal), accepted, num_draft_tokens)
                if held > sequences.shape[1] - 1:
                    keep_cache(sequences.shape[1] - 1)  # drop the rejected positions (the last token goes next)
            if settle is not None:
                settle()
            break
        except Rewind as rewind:  # the raiser rolled its state back: the model holds all but the last kept token
            rewinds += 1
            sequences, ended = restart_after(rewind, rewinds, sequences, prompt_length, eos, streamer)
            finished = bool(ended.any())
    stats.new_tokens = sequences.shape[1] - prompt_length
    if streamer is not None:
        streamer.end()
    return sequences


def _accept(
    logits: torch.Tensor, proposal: list[int], sequences: torch.Tensor, prompt_length: int, cfg: SamplingConfig,
    processors, eos: torch.Tensor, streamer: Streamer | None, stopping: Stopping | None, stats: DecodeStats,
) -> tuple[torch.Tensor, bool, int]:
    """The model's tokens for one round's positions (logits (1, 1 + len(proposal), vocab)), position by position
    while they confirm the draft: (the sequence with them, whether the answer ended, draft tokens accepted)."""
    for index in range(len(proposal) + 1):
        step = sequences.shape[1] - prompt_length
        tokens, scores = choose_tokens(logits[:, index], sequences, cfg, processors, eos, step)  # (1,)
        sequences = torch.cat([sequences, tokens[:, None]], dim=1)
        if streamer is not None:
            streamer.put(tokens.cpu())
        finished = bool(torch.isin(tokens, eos).any()) if len(eos) else False
        if stopping is not None:
            finished |= bool(torch.as_tensor(stopping(sequences, scores), dtype=torch.bool).any())
        confirmed = index < len(proposal) and int(tokens[0]) == proposal[index]
        stats.accepted += int(confirmed)
        if finished or not confirmed:
            return sequences, finished, index + int(confirmed)
    raise AssertionError("unreachable: the last position never confirms a draft token")
