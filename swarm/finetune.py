"""Fine-tuning prompts through the swarm on chat examples: data, the training loop and the task's accuracy.

Examples are JSONL lines of `{"messages": [{"role": "user", ...}, {"role": "assistant", "content": ANSWER}]}`.
The loss covers the assistant's answer only. A held-out example counts as right when the model's greedy answer,
its first word lower-cased and stripped of punctuation, equals the first word of the expected answer (for
`swarm/data/reviews.jsonl`: the label "positive" or "negative").
"""

from __future__ import annotations

import json
import logging
import random
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from swarm.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_DATA = Path(__file__).with_name("data") / "reviews.jsonl"


@dataclass(frozen=True)
class ChatExample:
    prompt: list[dict]  # the conversation up to the assistant's answer
    answer: str


def load_examples(path: str | Path) -> list[ChatExample]:
    """Chat examples from a JSONL file; a clear `ConfigError` for a missing file or a malformed line."""
    examples = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
            if messages[-1]["role"] != "assistant" or not isinstance(messages[-1]["content"], str):
                raise ValueError("the last message must be the assistant's answer")
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise ConfigError(f"{path}, line {number}: not a chat example ({e})") from None
        examples.append(ChatExample(messages[:-1], messages[-1]["content"]))
    if len(examples) < 2:
        raise ConfigError(f"{path} holds {len(examples)} example(s); at least 2 are needed (train and held out)")
    return examples


def split(examples: list[ChatExample], held_out: float, seed: int = 0) -> tuple[list[ChatExample], list[ChatExample]]:
    """(train, held out), shuffled with `seed`; at least one of each."""
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    count = min(max(1, round(len(shuffled) * held_out)), len(shuffled) - 1)
    return shuffled[count:], shuffled[:count]


def encode(tokenizer, example: ChatExample) -> tuple[list[int], list[int]]:
    """(input ids, labels): the chat-formatted conversation and answer, labels -100 except on the answer."""
    prompt = tokenizer.apply_chat_template(example.prompt, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt)
    answer = tokenizer(example.answer, add_special_tokens=False)["input_ids"]
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = prompt + answer + end
    return ids, [-100] * len(prompt) + answer + end


def batch_of(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded (ids, attention mask, labels) tensors."""
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for row, (tokens, targets) in enumerate(encoded):
        ids[row, width - len(tokens):] = torch.tensor(tokens)
        mask[row, width - len(tokens):] = 1
        labels[row, width - len(targets):] = torch.tensor(targets)
    return ids, mask, labels


def first_word(text: str) -> str:
    words = text.strip().split()
    return words[0].strip(string.punctuation).lower() if words else ""


@dataclass
class TrainLog:
    losses: list[float] = field(default_factory=list)  # per step


def train(model, examples: list[ChatExample], *, epochs: int = 2, batch_size: int = 8, lr: float = 0.01,
          seed: int = 0, on_step: Callable[[int, float], None] | None = None) -> TrainLog:
    """Adam on the model's trainable prompts over `examples`; `on_step(step, loss)` after each step."""
    tokenizer = model.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [encode(tokenizer, e) for e in examples]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    log = TrainLog()
    for _ in range(epochs):
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for first in range(0, len(order), batch_size):
            ids, mask, labels = batch_of([encoded[i] for i in order[first:first + batch_size]], pad)
            optimizer.zero_grad()
            loss = model(ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            log.losses.append(loss.item())
            if on_step is not None:
                on_step(len(log.losses), log.losses[-1])
    return log


def accuracy(model, examples: list[ChatExample], *, batch_size: int = 16, max_new_tokens: int = 4) -> float:
    """The share of `examples` whose greedy answer's first word is the expected answer's."""
    tokenizer = model.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    right = 0
    for first in range(0, len(examples), batch_size):
        chunk = examples[first:first + batch_size]
        prompts = [encode(tokenizer, e)[0][: -len(_answer_ids(tokenizer, e))] for e in chunk]
        ids, mask, _ = batch_of([(p, p) for p in prompts], pad)
        out = model.generate(ids, mask, max_new_tokens=max_new_tokens, settle_checks=False)
        for row, example in enumerate(chunk):
            text = tokenizer.decode(out[row, ids.shape[1]:], skip_special_tokens=True)
            right += first_word(text) == first_word(example.answer)
    return right / len(examples)


def _answer_ids(tokenizer, example: ChatExample) -> list[int]:
    answer = tokenizer(example.answer, add_special_tokens=False)["input_ids"]
    return answer + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
