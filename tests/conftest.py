"""Shared fixtures: the default model (converted once by `make model`) and real local swarms."""

from __future__ import annotations

import pytest
import torch

from peers.local import LocalSwarm
from swarm.models import DEFAULT_MODEL, open_model

CHAT_PROMPT = "What is the capital of France?"


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
