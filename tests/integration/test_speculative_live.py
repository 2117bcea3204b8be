"""Speculative decoding through a real 3-peer swarm: the same greedy answer, token for token, in fewer round trips."""

from __future__ import annotations

import io

import pytest
import torch

from apps.chat import ChatSession

pytestmark = pytest.mark.slow

REPEATING = "red green blue, red green blue, red green blue, red green blue,"


def test_the_chat_answer_is_the_same_with_prompt_lookup(client, local_model, chat_ids):
    expected = local_model.generate(chat_ids, max_new_tokens=64, do_sample=False)
    plain = client.generate(chat_ids, max_new_tokens=64, return_dict_in_generate=True)
    fast = client.generate(chat_ids, max_new_tokens=64, prompt_lookup_num_tokens=8, return_dict_in_generate=True)
    assert fast.sequences.tolist() == plain.sequences.tolist() == expected.tolist()
    new = expected.shape[1] - chat_ids.shape[1]
    assert plain.report.decoding.round_trips == plain.report.decoding.new_tokens == new
    decoding = fast.report.decoding
    assert decoding.new_tokens == new and decoding.round_trips <= new


def test_a_long_repeating_answer_takes_several_tokens_per_round_trip(client, local_model, tokenizer):
    ids = tokenizer(REPEATING, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        expected = local_model.generate(ids, max_new_tokens=60, min_new_tokens=60, do_sample=False)
    plain = client.generate(ids, max_new_tokens=60, min_new_tokens=60)
    fast = client.generate(ids, max_new_tokens=60, min_new_tokens=60, prompt_lookup_num_tokens=8,
                           return_dict_in_generate=True)
    assert fast.sequences.tolist() == plain.tolist() == expected.tolist()
    decoding = fast.report.decoding
    assert decoding.new_tokens == 60 and decoding.tokens_per_round_trip > 1
    assert decoding.round_trips == client.last_generation.decoding.round_trips < 60


def test_a_chat_with_prompt_lookup_continues_its_session_like_one_without(client):
    def conversation(lookup: int) -> tuple[list[str], list[int]]:
        chat = ChatSession(client, max_length=512, max_new_tokens=32, temperature=0.0, top_p=1.0, prompt_lookup=lookup)
        try:
            answers = [chat.ask(text, out=io.StringIO()) for text in
                       ("What is the capital of France?", "Repeat your last answer word for word.")]
            return answers, list(chat.conversation.fed_ids)
        finally:
            chat.session.close()

    assert conversation(8) == conversation(0)
