"""Tests of swarm.generation: `decode` driven by a tiny local model equals transformers' `generate`.

The `next_logits` function here recomputes the whole sequence at every step (no KV cache), so it is an
independent reference for the cached path inside `generate`.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from swarm.errors import SwarmError
from swarm.generation import MAX_REWINDS, NextLogits, Rewind, SamplingConfig, decode, logits_processors

PAD = 0
PROMPT = 6


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
        vocab_size=128, initializer_range=0.1,  # larger than the default: clear argmaxes
        bos_token_id=None, eos_token_id=None, pad_token_id=None,  # generate takes only what the test passes
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def prompt() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts, the second 2 tokens shorter and padded on the left: (ids, attention mask)."""
    ids = torch.randint(1, 128, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = PAD, 0
    return ids, mask


def full_recompute(model: PreTrainedModel, calls: list | None = None) -> NextLogits:
    """next_logits that keeps every token seen and runs the whole sequence each step."""
    seen: dict[str, torch.Tensor | None] = {"ids": None, "mask": None}

    @torch.no_grad()
    def next_logits(new_ids: torch.Tensor, new_mask: torch.Tensor | None) -> torch.Tensor:
        if calls is not None:
            calls.append((new_ids.clone(), None if new_mask is None else new_mask.clone()))
        seen["ids"] = new_ids if seen["ids"] is None else torch.cat([seen["ids"], new_ids], dim=1)
        if new_mask is not None:
            seen["mask"] = new_mask if seen["mask"] is None else torch.cat([seen["mask"], new_mask], dim=1)
        mask = seen["mask"]
        positions = None if mask is None else (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        return model(seen["ids"], attention_mask=mask, position_ids=positions).logits[:, -1]  # (batch, vocab)

    return next_logits


@torch.no_grad()
def hf_generate(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor | None, cfg: SamplingConfig) -> torch.Tensor:
    kwargs = dict(
        max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens, do_sample=cfg.do_sample,
        repetition_penalty=cfg.repetition_penalty, pad_token_id=cfg.pad_token_id,
        eos_token_id=list(cfg.eos_token_ids) or None,
    )
    if cfg.do_sample:  # spelled out: generate's own default top_k is 50, SamplingConfig's is 0 (off)
        kwargs.update(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    return model.generate(ids, attention_mask=mask, **kwargs)


def run_decode(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor | None, cfg: SamplingConfig) -> torch.Tensor:
    return decode(full_recompute(model), ids, mask, cfg)


def test_greedy_equals_generate(model, prompt):
    ids, mask = prompt
    cfg = SamplingConfig(max_new_tokens=10)
    out = run_decode(model, ids, mask, cfg)
    assert out.shape == (2, PROMPT + 10)
    assert torch.equal(out[:, :PROMPT], ids)
    assert torch.equal(out, hf_generate(model, ids, mask, cfg))


def test_greedy_without_an_attention_mask(model, prompt):
    ids = prompt[0][:1]
    cfg = SamplingConfig(max_new_tokens=7)
    assert torch.equal(run_decode(model, ids, None, cfg), hf_generate(model, ids, None, cfg))


@pytest.mark.parametrize("max_new_tokens", [1, 3])
def test_max_new_tokens(model, prompt, max_new_tokens):
    ids, mask = prompt
    cfg = SamplingConfig(max_new_tokens=max_new_tokens)
    out = run_decode(model, ids, mask, cfg)
    assert out.shape[1] == PROMPT + max_new_tokens
    assert torch.equal(out, hf_generate(model, ids, mask, cfg))


def test_zero_new_tokens_returns_the_prompt_without_calling_the_model(prompt):
    ids, mask = prompt

    def never(new_ids, new_mask):
        raise AssertionError("next_logits must not be called")

    assert torch.equal(decode(never, ids, mask, SamplingConfig(max_new_tokens=0)), ids)


def test_next_logits_gets_the_prompt_then_one_token_at_a_time(model, prompt):
    ids, mask = prompt
    calls: list = []
    out = decode(full_recompute(model, calls), ids, mask, SamplingConfig(max_new_tokens=4))
    assert len(calls) == 4
    assert torch.equal(calls[0][0], ids) and torch.equal(calls[0][1], mask)
    for step, (new_ids, new_mask) in enumerate(calls[1:]):
        assert torch.equal(new_ids, out[:, PROMPT + step : PROMPT + step + 1])
        assert torch.equal(new_mask, torch.ones(2, 1, dtype=mask.dtype))


def first_new_token_only_in_row(out: torch.Tensor, row: int) -> tuple[int, int]:
    """(token, step) of the earliest new token of `row` that the other row never generates."""
    other = set(out[1 - row, PROMPT:].tolist())
    for step, token in enumerate(out[row, PROMPT:].tolist()):
        if token not in other and token not in out[row, PROMPT : PROMPT + step].tolist():
            return token, step
    raise AssertionError("the seeded model produced no usable end-of-sequence token")


def test_eos_stops_a_row_and_pads_it(model, prompt):
    ids, mask = prompt
    plain = run_decode(model, ids, mask, SamplingConfig(max_new_tokens=10))
    eos, step = first_new_token_only_in_row(plain, row=0)
    assert step < 9
    cfg = SamplingConfig(max_new_tokens=10, eos_token_ids=(eos,), pad_token_id=PAD)
    out = run_decode(model, ids, mask, cfg)
    assert torch.equal(out, hf_generate(model, ids, mask, cfg))
    assert out.shape[1] == PROMPT + 10  # the other row keeps going
    assert out[0, PROMPT + step] == eos
    assert (out[0, PROMPT + step + 1 :] == PAD).all()
    assert torch.equal(out[1], plain[1])


def test_generation_ends_when_every_row_has_ended(model, prompt):
    ids, mask = prompt
    plain = run_decode(model, ids, mask, SamplingConfig(max_new_tokens=10))
    eos_a, step_a = first_new_token_only_in_row(plain, row=0)
    eos_b, step_b = first_new_token_only_in_row(plain, row=1)
    assert max(step_a, step_b) < 9  # so ending early is visible
    cfg = SamplingConfig(max_new_tokens=10, eos_token_ids=(eos_a, eos_b), pad_token_id=PAD)
    out = run_decode(model, ids, mask, cfg)
    assert out.shape[1] == PROMPT + max(step_a, step_b) + 1
    assert torch.equal(out, hf_generate(model, ids, mask, cfg))


def test_min_new_tokens_suppresses_eos_until_reached(model, prompt):
    ids, mask = prompt
    plain = run_decode(model, ids, mask, SamplingConfig(max_new_tokens=10))
    eos = int(plain[0, PROMPT])  # row 0 would end at once
    cfg = SamplingConfig(max_new_tokens=10, min_new_tokens=4, eos_token_ids=(eos,), pad_token_id=PAD)
    out = run_decode(model, ids, mask, cfg)
    assert torch.equal(out, hf_generate(model, ids, mask, cfg))
    assert eos not in out[:, PROMPT : PROMPT + 4].tolist()[0]
    assert eos not in out[:, PROMPT : PROMPT + 4].tolist()[1]
    without_min = run_decode(model, ids, mask, dataclasses.replace(cfg, min_new_tokens=0))
    assert without_min[0, PROMPT] == eos and (without_min[0, PROMPT + 1 :] == PAD).all()


def test_repetition_penalty_equals_generate(model, prompt):
    ids, mask = prompt
    cfg = SamplingConfig(max_new_tokens=10, repetition_penalty=1.5)
    out = run_decode(model, ids, mask, cfg)
    assert torch.equal(out, hf_generate(model, ids, mask, cfg))
    assert not torch.equal(out, run_decode(model, ids, mask, SamplingConfig(max_new_tokens=10)))


SAMPLING = [
    dict(temperature=1.5, top_p=0.9),
    dict(temperature=0.7, top_k=20),
    dict(top_p=0.8, repetition_penalty=1.3),
]


@pytest.mark.parametrize("knobs", SAMPLING, ids=str)
def test_sampling_equals_generate_with_the_same_seed(model, prompt, knobs):
    ids, mask = prompt
    cfg = SamplingConfig(max_new_tokens=10, do_sample=True, **knobs)
    torch.manual_seed(5)
    out = run_decode(model, ids, mask, cfg)
    torch.manual_seed(5)
    assert torch.equal(out, hf_generate(model, ids, mask, cfg))


def test_sampling_is_reproducible_with_a_seed(model, prompt):
    ids, mask = prompt
    cfg = SamplingConfig(max_new_tokens=12, do_sample=True, temperature=2.0)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(run_decode(model, ids, mask, cfg))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])  # it does sample


def test_top_k_one_is_greedy(model, prompt):
    ids, mask = prompt
    greedy = run_decode(model, ids, mask, SamplingConfig(max_new_tokens=10))
    torch.manual_seed(3)
    sampled = run_decode(model, ids, mask, SamplingConfig(max_new_tokens=10, do_sample=True, temperature=3.0, top_k=1))
    assert torch.equal(sampled, greedy)


def test_sampling_knobs_are_ignored_without_do_sample():
    assert len(logits_processors(SamplingConfig(temperature=0.5, top_k=3, top_p=0.5))) == 0
    assert len(logits_processors(SamplingConfig(do_sample=True, temperature=0.5, top_k=3, top_p=0.5))) == 3


class RecordingStreamer:
    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []
        self.ended = 0

    def put(self, value: torch.Tensor) -> None:
        self.values.append(value.clone())

    def end(self) -> None:
        self.ended += 1


def test_streamer_gets_the_prompt_then_each_token(model, prompt):
    ids = prompt[0][:1]
    streamer = RecordingStreamer()
    out = decode(full_recompute(model), ids, None, SamplingConfig(max_new_tokens=5), streamer=streamer)
    assert len(streamer.values) == 6 and streamer.ended == 1
    assert torch.equal(streamer.values[0], ids)
    assert torch.equal(torch.cat(streamer.values[1:]), out[0, PROMPT:])


class CaughtCheater:
    """next_logits whose calls `bad` give garbage logits (a cheating peer) until it is caught: at call `caught`,
    or when the answer settles, it rolls its state back to the first `keep` tokens and raises Rewind, as the
    swarm client does once the cheater is blacklisted."""

    def __init__(self, model: PreTrainedModel, bad: range, caught: int | None, keep: int):
        self.model, self.bad, self.caught, self.keep = model, bad, caught, keep
        self.ids: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.calls, self.rewound = 0, False

    def _rewind(self) -> Rewind:
        fed = self.keep - 1 if self.keep > PROMPT else 0  # the next call feeds token keep - 1
        self.ids = self.ids[:, :fed] if fed else None
        self.mask = None if self.mask is None or not fed else self.mask[:, :fed]
        self.rewound = True
        return Rewind(self.keep, "caught")

    def settle(self) -> None:
        if not self.rewound:
            raise self._rewind()

    @torch.no_grad()
    def __call__(self, new_ids: torch.Tensor, new_mask: torch.Tensor | None) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.caught:
            raise self._rewind()
        self.ids = new_ids if self.ids is None else torch.cat([self.ids, new_ids], dim=1)
        if new_mask is not None:
            self.mask = new_mask if self.mask is None else torch.cat([self.mask, new_mask], dim=1)
        positions = None if self.mask is None else (self.mask.cumsum(-1) - 1).masked_fill(self.mask == 0, 1)
        logits = self.model(self.ids, attention_mask=self.mask, position_ids=positions).logits[:, -1]
        if self.calls in self.bad and not self.rewound:
            return torch.randn(logits.shape, generator=torch.Generator().manual_seed(self.calls)) * 10
        return logits


class RewindingStreamer(RecordingStreamer):
    def __init__(self):
        super().__init__()
        self.rewinds: list[int] = []

    def rewind(self, kept_new_tokens: int) -> None:
        self.rewinds.append(kept_new_tokens)
        self.values = self.values[: 1 + kept_new_tokens]


@pytest.mark.parametrize("keep", [PROMPT, PROMPT + 2])
def test_a_rewind_drops_the_untrusted_tokens_and_the_answer_equals_generate(model, prompt, keep):
    ids, mask = prompt
    cfg = SamplingConfig(max_new_tokens=10, pad_token_id=PAD)
    cheater = CaughtCheater(model, bad=range(3, 6), caught=6, keep=keep)  # calls 3-5 made tokens 3-5 garbage
    streamer = RewindingStreamer()
    out = decode(cheater, ids, mask, cfg, streamer=streamer)
    assert torch.equal(out, hf_generate(model, ids, mask, cfg))
    assert streamer.rewinds == [keep - PROMPT]
    assert torch.equal(torch.cat(streamer.values[1:], dim=0).view(-1), out[:, PROMPT:].T.reshape(-1))


def test_a_cheater_caught_when_the_answer_settles_is_rewound_too(model, prompt):
    ids, mask = prompt
    cfg = SamplingConfig(max_new_tokens=8, pad_token_id=PAD)
    cheater = CaughtCheater(model, bad=range(5, 100), caught=None, keep=PROMPT + 4)  # the last tokens are garbage
    streamer = RewindingStreamer()
    out = decode(cheater, ids, mask, cfg, streamer=streamer, settle=cheater.settle)
    assert torch.equal(out, hf_generate(model, ids, mask, cfg))
    assert streamer.rewinds == [4] and streamer.ended == 1


def test_rewinds_are_bounded(model, prompt):
    def always_rewinding(new_ids, new_mask):
        raise Rewind(PROMPT)

    with pytest.raises(SwarmError, match=f"gave up after {MAX_REWINDS} restarts"):
        decode(always_rewinding, prompt[0], prompt[1], SamplingConfig(max_new_tokens=4))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(min_new_tokens=-1), "min_new_tokens"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(do_sample=True, temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_sampling_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_temperature_zero_is_fine_for_greedy():
    assert SamplingConfig(temperature=0.0).do_sample is False


def test_stopping_criteria_end_rows_early_and_the_answer_still_settles(model, prompt):
    ids, mask = prompt
    cfg = SamplingConfig(max_new_tokens=8, pad_token_id=PAD)
    full = decode(full_recompute(model), ids, mask, cfg)
    settled = []
    out = decode(full_recompute(model), ids, mask, cfg, settle=lambda: settled.append(True),
                 stopping=lambda sequences, scores: sequences.shape[1] >= PROMPT + 3)
    assert torch.equal(out, full[:, : PROMPT + 3]) and settled == [True]
    first_row = decode(full_recompute(model), ids, mask, cfg,
                       stopping=lambda sequences, scores: torch.tensor([sequences.shape[1] >= PROMPT + 2, False]))
    assert torch.equal(first_row[1], full[1])
    assert torch.equal(first_row[0, : PROMPT + 2], full[0, : PROMPT + 2]) and (first_row[0, PROMPT + 2:] == PAD).all()
