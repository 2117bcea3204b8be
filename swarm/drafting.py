"""Cheap local drafts for speculative decoding: prompt lookup.

Prompt lookup (Saxena 2023, transformers' `prompt_lookup_num_tokens`) guesses that text repeats: it finds an
earlier occurrence of the sequence's last n-gram and proposes the tokens that followed it. It costs no model,
and it pays off where answers quote their prompt (summaries, code edits, extraction) or repeat themselves.

Two choices differ from transformers' `PromptLookupCandidateGenerator`, which takes the earliest match and
stops its draft at the end of the sequence: here the latest occurrence wins (the nearest context is the
likeliest to repeat), and the copy may run on into the draft itself (LZ77's overlapping copy), so a match
close to the end still proposes `num_tokens` tokens: a loop of period 3 drafts as many tokens as a long quote.
"""

from __future__ import annotations

import torch

DEFAULT_MAX_NGRAM = 2  # transformers' max_matching_ngram_size default


def find_match(sequence: torch.Tensor, max_ngram: int = DEFAULT_MAX_NGRAM) -> int | None:
    """Where the continuation of the latest earlier occurrence of the sequence's last n-gram begins, trying n
    from `max_ngram` down to 1; None when even its last token never occurred before. `sequence`: (tokens,)."""
    length = int(sequence.shape[0])
    for n in range(min(max_ngram, length - 1), 0, -1):
        windows = sequence[: length - 1].unfold(0, n, 1)  # (length - n, n): every n-gram that has a successor
        hits = (windows == sequence[length - n :]).all(dim=1).nonzero()
        if len(hits):
            return int(hits[-1]) + n
    return None


def prompt_lookup(sequence: torch.Tensor, num_tokens: int, max_ngram: int = DEFAULT_MAX_NGRAM) -> list[int]:
    """Up to `num_tokens` token ids that would follow `sequence` (tokens,) if it repeated its latest earlier
    occurrence of its last n-gram (n from `max_ngram` down to 1); [] when nothing matches."""
    if num_tokens <= 0 or max_ngram <= 0:
        return []
    start = find_match(sequence, max_ngram)
    if start is None:
        return []
    source = sequence.tolist()
    draft: list[int] = []
    for offset in range(num_tokens):
        index = start + offset  # always < len(source) + offset: the copy may overlap the draft
        draft.append(source[index] if index < len(source) else draft[index - len(source)])
    return draft
