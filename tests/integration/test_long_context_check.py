"""A spot check at a 1,000-token context with 4096-wide blocks runs and passes for an honest peer, and `model(ids)`
handles such inputs: float32 hidden states of 1,000 x 4096 are 16 MiB, four times hivemind's cap on one message,
so both travel in chunks (swarm.stateless).

The model is a random-weight Llama built here: two 4096-wide blocks with a small MLP and one key/value head
(about 140 MB of weights per peer), a tiny vocabulary; two honest peers serve both blocks.
"""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from peers.local import LocalSwarm
from swarm import DistributedModelForCausalLM
from swarm.models import open_model
from swarm.session import InferenceSession

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "unit"))
from test_models import save_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow

CONTEXT = 1000
WIDE = dict(hidden_size=4096, intermediate_size=256, num_hidden_layers=2, num_attention_heads=32,
            num_key_value_heads=1, vocab_size=64, max_position_embeddings=2048, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """(source directory, converted cache directory) of the random 4096-wide model."""
    source = tmp_path_factory.mktemp("wide") / "wide-llama"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**WIDE)).float()
    model.save_pretrained(source)
    save_tokenizer(source)
    cache = tmp_path_factory.mktemp("wide-cache")
    open_model(str(source), cache_dir=cache, show_progress=False)  # converted once, before the peers start
    return source, cache


class Recorder:
    """A step observer that keeps what it sees."""

    def __init__(self):
        self.records = []

    def on_step(self, record) -> None:
        self.records.append(record)

    def on_close(self, session_id: str) -> None:
        pass

    async def settle(self, session_id: str) -> None:
        pass


def test_a_check_at_a_long_context_of_wide_blocks_runs_and_passes(wide_model):
    source, cache = wide_model
    with LocalSwarm(model=str(source), extra_env={"EFEDLLM_CACHE": str(cache)}) as swarm:
        swarm.add_peers(("wide-a", "0:2", ()), ("wide-b", "0:2", ()))
        model = DistributedModelForCausalLM.from_pretrained(str(source), [swarm.initial_peers], cache_dir=cache,
                                                            check_rate=0.0)
        try:
            ids = torch.randint(3, WIDE["vocab_size"], (1, CONTEXT), generator=torch.Generator().manual_seed(1))
            hidden = model.head.embed(ids)
            assert hidden.numel() * hidden.element_size() > 4 * 1024**2  # more than one message can carry
            recorder = Recorder()
            session = InferenceSession(model.sequence, model.transport, CONTEXT, recorder)
            model.loop.run(session.step(hidden[:, : CONTEXT - 1]))
            model.loop.run(session.step(hidden[:, CONTEXT - 1 :]))  # one token at position 999
            model.loop.run(session.close())
            record = recorder.records[-1]
            assert record.position == CONTEXT - 1 and sum(h.shape[1] for h in record.history) == CONTEXT
            checker = model.trust_layer.checker
            assert model.loop.run(checker.check(record)) == "pass"
            assert checker.stats.chunked == 1 and checker.stats.unverifiable == 0

            logits = model(ids).logits  # a stateless forward of the whole context, chunked too
            with torch.inference_mode():
                local = AutoModelForCausalLM.from_pretrained(source, torch_dtype=torch.float32)
                expected = local(ids).logits
            assert logits.shape == expected.shape
            assert torch.allclose(logits, expected, atol=1e-3, rtol=0), float((logits - expected).abs().max())
        finally:
            model.shutdown()
