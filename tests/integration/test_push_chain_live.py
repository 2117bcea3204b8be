"""Push chains through a real 3-peer swarm (issue 15): decode steps go client -> p1 -> p2 -> p3, each peer pushing
its output to the next over `rpc_push`, and the answer equals the local model's token for token."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

NEW_TOKENS = 32


def test_greedy_generation_through_a_push_chain_matches_the_local_model(client, local_model, chat_ids):
    expected = local_model.generate(chat_ids, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    with client.inference_session(max_length=chat_ids.shape[1] + NEW_TOKENS) as session:
        assert session.inner.push  # the default
        produced = client.generate(chat_ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, session=session)
        assert len(session.route) == 3
        # every decode step (all but the prefill, which opens the sessions) went through the chain end to end
        assert session.inner.pushed_steps == NEW_TOKENS - 1
        assert session.inner.push_fallbacks == 0
    assert produced.tolist() == expected.tolist()


def test_client_driven_and_push_chain_answers_agree(client, chat_ids):
    with client.inference_session(max_length=chat_ids.shape[1] + 16) as session:
        session.inner.push = False  # as `push=False` in from_pretrained, or swarm-chat --no-push, does
        driven = client.generate(chat_ids, max_new_tokens=16, min_new_tokens=16, session=session)
        assert session.inner.pushed_steps == 0
    with client.inference_session(max_length=chat_ids.shape[1] + 16) as session:
        session.inner.push = True
        pushed = client.generate(chat_ids, max_new_tokens=16, min_new_tokens=16, session=session)
        assert session.inner.pushed_steps == 15
    assert pushed.tolist() == driven.tolist()
