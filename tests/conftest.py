"""Shared fixtures: the default model (converted once by `make model`) and real local swarms."""

from __future__ import annotations

import os

import pytest
import torch

from peers.local import LocalSwarm
from swarm.models import DEFAULT_MODEL, open_model

CHAT_PROMPT = "What is the capital of France?"

# Every node of a test run (in-process clients, and the peer processes and examples it starts, which inherit the
# environment) signs with a 12-bit identity puzzle instead of the default 21 bits: the same code paths, for a few
# milliseconds per identity instead of 1.3 s of CPU each. Set before any node reads it.
os.environ["SWARM_PUZZLE_BITS"] = "12"

# The longest test files, longest first (seconds of one worker, measured with `--durations` in a run with two
# workers). `make test` gives each worker whole files in collection order, so these start first and no long file
# is left to run alone at the end; the others follow in their usual order.
LONGEST_FILES_FIRST = (
    "test_examples.py",  # 420 s
    "test_checks_live.py",  # 287
    "test_trust_live.py",  # 236
    "test_peer_lifecycle.py",  # 231
    "test_failover.py",  # 217
    "test_receipts_live.py",  # 160
    "test_compressed_peers.py",  # 156
    "test_training_live.py",  # 131
    "test_training_trust_live.py",  # 90
    "test_openai_api.py",  # 87
    "test_swarm_generation.py",  # 81
    "test_speculative_live.py",  # 81
    "test_bad_replies.py",  # 74
    "test_self_verify_live.py",  # 73
    "test_cli_errors.py",  # 72
    "test_steering_live.py",  # 66
    "test_long_context_check.py",  # 64
    "test_peer_health.py",  # 59
    "test_routing_live.py",  # 55
    "test_push_chain_live.py",  # 43
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort: the rest keep their order


@pytest.fixture(scope="session")
def checkpoint():
    return open_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tokenizer(checkpoint):
    return checkpoint.load_tokenizer()


@pytest.fixture(scope="session")
def local_model(checkpoint):
    """The whole default model in this process: the reference the swarm must match."""
    return checkpoint.load_causal_lm(torch.float32)


@pytest.fixture(scope="session")
def chat_ids(tokenizer) -> torch.Tensor:
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": CHAT_PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return encoded["input_ids"]


@pytest.fixture(scope="session")
def swarm3():
    """Bootstrap node + three peers serving blocks 0:10, 10:20, 20:30 of the default model in float32."""
    with LocalSwarm(model=DEFAULT_MODEL) as swarm:
        peers = [swarm.add_peer(blocks, wait=False) for blocks in ("0:10", "10:20", "20:30")]
        for peer in peers:
            swarm.wait_online(peer)
        yield swarm


@pytest.fixture(scope="session")
def client(swarm3):
    from swarm import DistributedModelForCausalLM

    model = DistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, [swarm3.initial_peers])
    yield model
    model.shutdown()
