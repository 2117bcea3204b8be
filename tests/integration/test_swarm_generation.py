"""Generation through a real 3-peer swarm equals the local model, token for token."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from apps.chat import ChatSession
from swarm.network import split_multiaddrs

pytestmark = pytest.mark.slow


def local_greedy(local_model, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
    return local_model.generate(input_ids, attention_mask=attention_mask, do_sample=False, **kwargs)


def test_route_covers_all_blocks_in_order(client):
    route = client.loop.run(client.sequence.make_route())
    assert [(hop.start, hop.end) for hop in route] == [(0, 10), (10, 20), (20, 30)]
    assert len({hop.peer_id for hop in route}) == 3


def test_greedy_chat_answer_matches_local_model(client, local_model, tokenizer, chat_ids):
    expected = local_greedy(local_model, chat_ids, max_new_tokens=64)
    produced = client.generate(chat_ids, max_new_tokens=64)
    assert produced.tolist() == expected.tolist()
    assert "Paris" in tokenizer.decode(produced[0, chat_ids.shape[1]:])


def test_long_greedy_generation_matches_local_model(client, local_model, chat_ids):
    expected = local_greedy(local_model, chat_ids, max_new_tokens=64, min_new_tokens=64)
    produced = client.generate(chat_ids, max_new_tokens=64, min_new_tokens=64)
    assert produced.shape[1] == chat_ids.shape[1] + 64
    assert produced.tolist() == expected.tolist()


def test_padded_batch_matches_local_model(client, local_model, tokenizer):
    tokenizer.padding_side = "left"
    prompts = ["The capital of Italy is", "Once upon a time, in a small village by the sea, there lived"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()  # the first row really is padded
    expected = local_greedy(local_model, batch["input_ids"], batch["attention_mask"], max_new_tokens=16,
                            pad_token_id=tokenizer.pad_token_id)
    produced = client.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=16,
                               pad_token_id=tokenizer.pad_token_id)
    assert produced.tolist() == expected.tolist()


def test_sampling_is_seeded_and_respects_top_k_one(client, chat_ids):
    torch.manual_seed(0)
    first = client.generate(chat_ids, max_new_tokens=12, do_sample=True, temperature=0.9, top_p=0.9)
    torch.manual_seed(0)
    again = client.generate(chat_ids, max_new_tokens=12, do_sample=True, temperature=0.9, top_p=0.9)
    assert first.tolist() == again.tolist()
    greedy = client.generate(chat_ids, max_new_tokens=12)
    top1 = client.generate(chat_ids, max_new_tokens=12, do_sample=True, top_k=1)
    assert top1.tolist() == greedy.tolist()


def test_stateless_forward_matches_local_logits(client, local_model, chat_ids):
    with torch.inference_mode():
        expected = local_model(chat_ids).logits
    produced = client(chat_ids).logits
    assert torch.allclose(produced, expected, atol=1e-4, rtol=0)


def test_chat_continues_the_session_without_resending_history(client, local_model, tokenizer):
    chat = ChatSession(client, max_length=512, max_new_tokens=32, temperature=0.0, top_p=1.0)
    first = chat.ask("What is the capital of France?", out=open("/dev/null", "w"))
    held_after_first = chat.session.position
    second = chat.ask("And of Germany?", out=open("/dev/null", "w"))
    full_history = list(tokenizer.apply_chat_template(
        chat.conversation.messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=False
    ))
    # The second turn sent only what the peers had not seen (the answer's last token, the new message and
    # the template around it), not the whole history.
    assert chat.last_stats.prompt_tokens <= len(full_history) - held_after_first
    assert chat.last_stats.prompt_tokens < len(full_history) // 2
    # ...and still answers exactly as the local model does given the whole conversation.
    ids = torch.tensor([full_history])
    expected = local_greedy(local_model, ids, max_new_tokens=32)
    assert second == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert "Paris" in first and "Berlin" in second
    chat.session.close()


def test_swarm_chat_prompt_answers_with_paris(swarm3, local_model, tokenizer, chat_ids):
    result = subprocess.run(
        [sys.executable, "-m", "apps.chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "32"],
        env=swarm3.env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    expected = local_greedy(local_model, chat_ids, max_new_tokens=32)
    expected_text = tokenizer.decode(expected[0, chat_ids.shape[1]:], skip_special_tokens=True).strip()
    assert result.stdout == expected_text + "\n" and expected_text == "The capital of France is Paris."
    assert "route:" in result.stderr and "tokens/s" in result.stderr
    # What it did while connecting, on stderr, in order, before the answer's statistics
    progress = [line for line in result.stderr.splitlines() if line.startswith(("Loading", "Looking", "Connected"))]
    bootstrap = len(split_multiaddrs([swarm3.initial_peers]))
    assert progress == [
        "Loading smollm2-135m (tokenizer, embeddings, head) and joining the swarm through "
        f"{bootstrap} initial peer{'' if bootstrap == 1 else 's'}...",
        "Looking for peers serving its 30 blocks...",
        "Connected: 30 blocks served by 3 peers (route: 3 hops)",
    ], result.stderr


def test_swarm_chat_repl_commands_and_history(swarm3):
    script = "What is the capital of France?\n/route\n/stats\nAnd of Germany?\n/reset\n/nonsense\n/exit\n"
    result = subprocess.run([sys.executable, "-m", "apps.chat", "--max-new-tokens", "24"], input=script,
                            env=swarm3.env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "The capital of France is Paris." in out
    assert "The capital of Germany is Berlin." in out  # the second turn saw the first one
    assert out.count("blocks ") == 3 and "rtt" in out  # /route: three hops with their round trips
    assert "tokens/s" in out and "time to first token" in out  # /stats
    assert "(conversation cleared)" in out and "unknown command /nonsense" in out
    assert "Traceback" not in result.stderr
    assert "Connected: 30 blocks served by 3 peers" in result.stderr and "Connected" not in out
