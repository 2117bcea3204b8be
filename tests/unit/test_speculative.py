"""Tests of swarm.speculative: speculative decoding gives `decode`'s answer, token for token, in fewer calls.

The model here recomputes its whole sequence at every call (no KV cache), and `keep_cache` cuts that sequence:
a rejected draft token left behind would change every later logit, so equal answers show the rollback is right.
One test runs the real default model with a KV cache that is cropped, as peers crop theirs.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from swarm.drafting import prompt_lookup
from swarm.errors import SwarmError
from swarm.generation import DecodeStats, Rewind, SamplingConfig, decode
from swarm.speculative import decode_speculative

PROMPT = 6
PAD = 0


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread; two OpenMP threads on a busy 2-core machine stall for seconds."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model() -> PreTrainedModel:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(1, 128, (1, PROMPT), generator=torch.Generator().manual_seed(1))


class Recomputing:
    """A model behind `verify` and `keep_cache` that keeps the tokens it was sent and runs them all each call;
    it checks it never holds more tokens than a session of `max_length` could."""

    def __init__(self, model: PreTrainedModel, max_length: int | None = None):
        self.model, self.max_length = model, max_length
        self.ids: torch.Tensor | None = None
        self.calls: list[tuple[list[int], int]] = []  # (ids sent, positions asked)
        self.kept: list[int] = []

    @torch.no_grad()
    def verify(self, new_ids: torch.Tensor, last: int) -> torch.Tensor:
        self.calls.append((new_ids[0].tolist(), last))
        self.ids = new_ids if self.ids is None else torch.cat([self.ids, new_ids], dim=1)
        assert self.max_length is None or self.ids.shape[1] <= self.max_length
        return self.model(self.ids).logits[:, -last:]  # (1, last, vocab)

    def keep_cache(self, tokens: int) -> None:
        assert 0 < tokens <= self.ids.shape[1]
        self.kept.append(tokens)
        self.ids = self.ids[:, :tokens]

    def next_logits(self, new_ids: torch.Tensor, new_mask) -> torch.Tensor:
        return self.verify(new_ids, 1)[:, 0]


def oracle(reference: torch.Tensor, wrong: set[int] = frozenset()):
    """A draft that knows the answer `reference` (1, tokens) and gets the tokens at answer positions `wrong` wrong."""

    def draft(sequence: torch.Tensor, count: int, max_ngram: int) -> list[int]:
        at = sequence.shape[0]
        proposal = reference[0, at : at + count].tolist()
        return [(token + 1) % 128 if at + i - PROMPT in wrong else token for i, token in enumerate(proposal)]

    return draft


def plain(model, prompt, cfg, **kwargs) -> torch.Tensor:
    return decode(Recomputing(model).next_logits, prompt, None, cfg, **kwargs)


def speculative(model, prompt, cfg, k: int, fake: Recomputing | None = None, **kwargs) -> torch.Tensor:
    fake = Recomputing(model, PROMPT + cfg.max_new_tokens) if fake is None else fake
    return decode_speculative(fake.verify, fake.keep_cache, prompt, cfg, k, **kwargs)


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("max_new_tokens", [1, 2, 12])
def test_prompt_lookup_gives_the_plain_greedy_answer(model, prompt, k, max_new_tokens):
    cfg = SamplingConfig(max_new_tokens=max_new_tokens)
    assert torch.equal(speculative(model, prompt, cfg, k), plain(model, prompt, cfg))


def test_right_drafts_bring_k_plus_one_tokens_per_call(model, prompt):
    cfg = SamplingConfig(max_new_tokens=12)
    reference = plain(model, prompt, cfg)
    fake, stats = Recomputing(model, PROMPT + 12), DecodeStats()
    out = speculative(model, prompt, cfg, 3, fake, stats=stats, draft=oracle(reference))
    assert torch.equal(out, reference)
    assert [len(sent) for sent, _ in fake.calls] == [PROMPT + 3, 4, 4]  # 4 + 4 + 4 tokens; the last round drafts 3
    assert [last for _, last in fake.calls] == [4, 4, 4]
    assert fake.kept == []  # nothing to drop
    assert (stats.round_trips, stats.new_tokens, stats.drafted, stats.accepted) == (3, 12, 9, 9)
    assert stats.tokens_per_round_trip == 4.0 and stats.acceptance == 1.0


def test_a_wrong_draft_token_is_replaced_and_the_rest_dropped(model, prompt):
    cfg = SamplingConfig(max_new_tokens=12)
    reference = plain(model, prompt, cfg)
    fake, stats = Recomputing(model, PROMPT + 12), DecodeStats()
    out = speculative(model, prompt, cfg, 4, fake, stats=stats, draft=oracle(reference, wrong={2, 9}))
    assert torch.equal(out, reference)
    # round 1: tokens 0 (the prompt's), 1 and 2 (drafted 1-4, 1 accepted, 2 wrong): the model keeps prompt + 2
    assert fake.calls[0][0][PROMPT:] != reference[0, PROMPT + 1 : PROMPT + 5].tolist()
    assert fake.kept[0] == PROMPT + 2
    assert stats.accepted < stats.drafted and stats.round_trips < 12 and stats.new_tokens == 12


def test_never_more_than_max_new_tokens_nor_a_longer_session(model, prompt):
    cfg = SamplingConfig(max_new_tokens=5)
    reference = plain(model, prompt, SamplingConfig(max_new_tokens=20))

    def greedy_draft(sequence, count, max_ngram):  # drafts past the end if it may
        return oracle(reference)(sequence, 20, max_ngram)[:count]

    counts: list[int] = []

    def counting(sequence, count, max_ngram):
        counts.append(count)
        return greedy_draft(sequence, count, max_ngram)

    out = speculative(model, prompt, cfg, 8, draft=counting)  # Recomputing asserts it holds <= prompt + 5
    assert torch.equal(out, reference[:, : PROMPT + 5])
    assert counts == [4]  # one round: 4 drafted + the model's own = the 5 allowed


def test_drafts_shrink_while_they_are_rejected_and_grow_back_once_accepted(model, prompt):
    cfg = SamplingConfig(max_new_tokens=40)
    reference = plain(model, prompt, cfg)
    asked: list[int] = []

    def wrong_then_right(sequence, count, max_ngram):
        asked.append(count)
        wrong = set(range(40)) if len(asked) <= 4 else set()
        return oracle(reference, wrong)(sequence, count, max_ngram)

    assert torch.equal(speculative(model, prompt, cfg, 8, draft=wrong_then_right), reference)
    assert asked[:8] == [8, 4, 2, 1, 1, 2, 4, 8]


def test_end_of_sequence_inside_an_accepted_draft_ends_the_answer(model, prompt):
    long = plain(model, prompt, SamplingConfig(max_new_tokens=12))
    eos = int(long[0, PROMPT + 4])
    first = long[0, PROMPT:].tolist().index(eos)
    cfg = SamplingConfig(max_new_tokens=12, eos_token_ids=(eos,), pad_token_id=PAD)
    expected = plain(model, prompt, cfg)
    assert expected.shape[1] == PROMPT + first + 1
    fake = Recomputing(model, PROMPT + 12)
    out = speculative(model, prompt, cfg, 8, fake, draft=oracle(long))  # the draft runs on past the end
    assert torch.equal(out, expected)
    assert fake.kept[-1] == out.shape[1] - 1  # the model holds what plain decoding would: all but the last token


def test_stopping_criteria_are_asked_after_every_token(model, prompt):
    cfg = SamplingConfig(max_new_tokens=12)
    reference = plain(model, prompt, cfg)
    asked: list[int] = []

    def stop_at_three(sequences, scores):
        asked.append(sequences.shape[1])
        return sequences.shape[1] >= PROMPT + 3

    out = speculative(model, prompt, cfg, 6, draft=oracle(reference), stopping=stop_at_three)
    assert torch.equal(out, reference[:, : PROMPT + 3])
    assert asked == [PROMPT + 1, PROMPT + 2, PROMPT + 3]


class Recording:
    def __init__(self) -> None:
        self.values: list[list[int]] = []
        self.ended = 0

    def put(self, value: torch.Tensor) -> None:
        self.values.append(value.tolist() if value.ndim == 1 else value[0].tolist())

    def end(self) -> None:
        self.ended += 1


def test_a_streamer_sees_the_same_puts_as_with_plain_decoding(model, prompt):
    cfg = SamplingConfig(max_new_tokens=9)
    reference = plain(model, prompt, cfg)
    plain_streamer, streamer = Recording(), Recording()
    plain(model, prompt, cfg, streamer=plain_streamer)
    speculative(model, prompt, cfg, 4, streamer=streamer, draft=oracle(reference, wrong={5}))
    assert streamer.values == plain_streamer.values and len(streamer.values) == 10 and streamer.ended == 1


@pytest.mark.parametrize("knobs", [dict(min_new_tokens=4), dict(repetition_penalty=1.5)], ids=str)
def test_min_new_tokens_and_repetition_penalty_apply_per_position(model, prompt, knobs):
    reference = plain(model, prompt, SamplingConfig(max_new_tokens=10))
    eos = int(reference[0, PROMPT])  # the answer would end at once
    cfg = SamplingConfig(max_new_tokens=10, eos_token_ids=(eos,), **knobs)
    expected = plain(model, prompt, cfg)
    out = speculative(model, prompt, cfg, 4, draft=oracle(expected, wrong={3}))
    assert torch.equal(out, expected)


def test_sampling_draws_what_plain_sampling_draws_with_the_same_seed(model, prompt):
    cfg = SamplingConfig(max_new_tokens=12, do_sample=True, temperature=0.7)
    torch.manual_seed(3)
    expected = plain(model, prompt, cfg)
    torch.manual_seed(3)
    out = speculative(model, prompt, cfg, 4, draft=oracle(expected, wrong={6}))
    assert torch.equal(out, expected)


class CaughtCheater(Recomputing):
    """Calls `bad` return garbage at every position (a cheating peer); at call `caught` it rolls back so that
    it holds all of the first `keep` tokens but the last, and raises Rewind (as the swarm client does)."""

    def __init__(self, model, bad: range, caught: int, keep: int):
        super().__init__(model)
        self.bad, self.caught, self.keep = bad, caught, keep

    def verify(self, new_ids: torch.Tensor, last: int) -> torch.Tensor:
        if len(self.calls) + 1 == self.caught:
            self.calls.append(([], 0))
            self.ids = self.ids[:, : self.keep - 1] if self.keep > PROMPT else None
            raise Rewind(self.keep, "caught")
        logits = super().verify(new_ids, last)
        if len(self.calls) in self.bad:
            return torch.randn(logits.shape, generator=torch.Generator().manual_seed(len(self.calls))) * 10
        return logits


@pytest.mark.parametrize("keep", [PROMPT, PROMPT + 2])
def test_a_rewind_drops_the_untrusted_tokens_and_the_answer_stays_the_same(model, prompt, keep):
    cfg = SamplingConfig(max_new_tokens=10)
    reference = plain(model, prompt, cfg)
    cheater = CaughtCheater(model, bad=range(2, 4), caught=4, keep=keep)
    rewinds: list[int] = []
    streamer = Recording()
    streamer.rewind = lambda kept: (rewinds.append(kept), setattr(streamer, "values", streamer.values[: 1 + kept]))
    out = speculative(model, prompt, cfg, 2, cheater, draft=oracle(reference, wrong={4}), streamer=streamer)
    assert torch.equal(out, reference)
    assert rewinds == [keep - PROMPT]
    assert sum(streamer.values[1:], []) == reference[0, PROMPT:].tolist()


def test_a_batch_is_refused(model):
    with pytest.raises(ValueError, match="one row"):
        decode_speculative(lambda ids, last: None, lambda n: None, torch.ones(2, 3, dtype=torch.long),
                           SamplingConfig(), 4)


def test_endless_rewinds_give_up(model, prompt):
    def always(ids, last):
        raise Rewind(PROMPT)

    with pytest.raises(SwarmError, match="gave up"):
        decode_speculative(always, lambda n: None, prompt, SamplingConfig(max_new_tokens=4), 4)


def test_plain_decoding_counts_one_token_per_call(model, prompt):
    stats = DecodeStats()
    plain(model, prompt, SamplingConfig(max_new_tokens=7), stats=stats)
    assert (stats.round_trips, stats.new_tokens, stats.drafted) == (7, 7, 0)
    assert stats.tokens_per_round_trip == 1.0


# the cache's keyword: `past_key_values`, or `cache` in transformers releases that renamed it
CACHE_KEYWORD = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


class CachedLocal:
    """The real model with a KV cache that `keep_cache` crops, as a peer crops its cache after a rollback."""

    def __init__(self, model: PreTrainedModel):
        self.model, self.cache, self.calls = model, DynamicCache(), 0

    @torch.inference_mode()
    def verify(self, new_ids: torch.Tensor, last: int) -> torch.Tensor:
        self.calls += 1
        held = self.cache.get_seq_length()
        positions = torch.arange(held, held + new_ids.shape[1])
        output = self.model(new_ids, **{CACHE_KEYWORD: self.cache}, use_cache=True, cache_position=positions,
                            position_ids=positions[None])
        return output.logits[:, -last:]

    def keep_cache(self, tokens: int) -> None:
        self.cache.crop(tokens - self.cache.get_seq_length())  # this transformers release takes minus the count


def test_the_real_model_gives_its_greedy_answer_in_fewer_calls(local_model, tokenizer):
    ids = tokenizer("red green blue, red green blue, red green blue, red green blue,", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        expected = local_model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    fake, stats = CachedLocal(local_model), DecodeStats()
    out = decode_speculative(fake.verify, fake.keep_cache, ids, SamplingConfig(max_new_tokens=24), 6, stats=stats,
                             draft=prompt_lookup)
    assert out.tolist() == expected.tolist()
    assert fake.calls == stats.round_trips and stats.tokens_per_round_trip > 2
