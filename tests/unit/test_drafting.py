"""Tests of swarm.drafting: prompt lookup proposes what followed the latest earlier match of the last n-gram."""

from __future__ import annotations

import pytest
import torch

from swarm.drafting import find_match, next_draft_length, prompt_lookup


def ids(*tokens: int) -> torch.Tensor:
    return torch.tensor(tokens)


def test_proposes_what_followed_the_last_ngram_before():
    assert prompt_lookup(ids(1, 2, 3, 4, 5, 9, 1, 2), 3) == [3, 4, 5]


def test_the_latest_earlier_occurrence_wins():
    assert prompt_lookup(ids(1, 2, 3, 8, 1, 2, 4, 8, 1, 2), 2) == [4, 8]


def test_longer_ngrams_are_tried_first():
    # the bigram (5, 1) occurred before 7; the unigram 1 occurred more recently, before 6
    assert prompt_lookup(ids(5, 1, 7, 0, 1, 6, 0, 5, 1), 1, max_ngram=2, min_ngram=1) == [7]
    assert prompt_lookup(ids(5, 1, 7, 0, 1, 6, 0, 5, 1), 1, max_ngram=1) == [6]


def test_falls_back_to_shorter_ngrams_down_to_the_shortest_allowed():
    assert prompt_lookup(ids(4, 2, 9, 3, 4, 2), 2, max_ngram=3) == [9, 3]
    assert prompt_lookup(ids(4, 2, 9, 3, 2), 2, max_ngram=3) == []  # only the single token 2 occurred before
    assert prompt_lookup(ids(4, 2, 9, 3, 2), 2, max_ngram=3, min_ngram=1) == [9, 3]
    assert prompt_lookup(ids(4, 2, 9, 3, 2), 2, max_ngram=1) == [9, 3]  # max_ngram 1: single tokens are matches


def test_a_recent_match_copies_on_into_the_draft():
    """A loop of period 3: the copy overlaps what it writes (as in LZ77) and proposes all the tokens asked."""
    assert prompt_lookup(ids(1, 2, 3, 1, 2, 3), 7) == [1, 2, 3, 1, 2, 3, 1]
    assert prompt_lookup(ids(7, 7, 7), 3) == [7, 7, 7]


def test_the_last_ngram_itself_is_no_match():
    assert find_match(ids(1, 2, 3)) is None
    assert prompt_lookup(ids(1, 2, 3), 4) == []


@pytest.mark.parametrize("sequence", [(), (5,)])
def test_too_short_sequences_give_nothing(sequence):
    assert prompt_lookup(torch.tensor(sequence, dtype=torch.long), 4) == []


def test_at_most_num_tokens_and_none_when_asked_for_none():
    assert prompt_lookup(ids(1, 2, 3, 4, 5, 1, 2), 2) == [3, 4]
    assert prompt_lookup(ids(1, 2, 3, 4, 5, 1, 2), 0) == []
    assert prompt_lookup(ids(1, 2, 3, 4, 5, 1, 2), 3, max_ngram=0) == []


def test_find_match_points_after_the_match():
    assert find_match(ids(1, 2, 3, 1, 2), max_ngram=2) == 2
    assert find_match(ids(9, 1, 2, 3, 1, 2), max_ngram=2) == 3


@pytest.mark.parametrize(
    "current, drafted, accepted, expected",
    [
        (8, 8, 0, 4),  # rejected outright: half
        (1, 1, 0, 1),  # ... never below one
        (2, 2, 2, 4),  # accepted whole: twice
        (6, 6, 6, 8),  # ... at most the maximum
        (8, 3, 3, 8),  # a whole draft shorter than allowed (the text ran out of room) counts too
        (8, 8, 5, 8),  # partly accepted: as before
        (4, 0, 0, 4),  # nothing drafted: as before
    ],
)
def test_the_draft_length_adapts_like_a_window(current, drafted, accepted, expected):
    assert next_draft_length(current, drafted, accepted, maximum=8) == expected
