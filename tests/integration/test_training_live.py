"""Training through the swarm, live: prompts' gradients through three real peers equal local autograd, and
what a peer receives holds no token ids, labels or loss.

The swarm is the session's three float32 peers (0:10, 10:20, 20:30); the reference is the whole model in this
process, with the same prompts (deep prompts added to each block's input by forward pre-hooks).
"""

from __future__ import annotations

import pytest
import torch

from swarm import DistributedModelForCausalLM
from swarm.client import causal_lm_loss
from swarm.models import DEFAULT_MODEL

pytestmark = pytest.mark.slow

PROMPT_LENGTH = 4


@pytest.fixture(scope="module")
def tuned(swarm3):
    models = {}
    for kind in ("prompt", "deep_prompt"):
        models[kind] = DistributedModelForCausalLM.from_pretrained(
            DEFAULT_MODEL, [swarm3.initial_peers], tuning=kind, prompt_length=PROMPT_LENGTH, spot_checks=False)
    yield models
    for model in models.values():
        model.shutdown()


def _local_gradients(local_model, ids, labels, prompts, deep):
    """The loss's gradients with respect to `prompts` (and `deep`), by autograd on the whole local model."""
    prompts = prompts.detach().clone().requires_grad_(True)
    deep = None if deep is None else deep.detach().clone().requires_grad_(True)
    hooks = []
    if deep is not None:
        for index, layer in enumerate(local_model.model.layers):
            def add_prompt(module, args, kwargs, index=index):
                hidden = args[0] if args else kwargs["hidden_states"]
                hidden = torch.cat([hidden[:, :PROMPT_LENGTH] + deep[index], hidden[:, PROMPT_LENGTH:]], dim=1)
                if args:
                    return (hidden, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": hidden}
            hooks.append(layer.register_forward_pre_hook(add_prompt, with_kwargs=True))
    try:
        embeds = local_model.model.embed_tokens(ids)
        inputs = torch.cat([prompts[None].expand(ids.shape[0], -1, -1), embeds], dim=1)
        logits = local_model(inputs_embeds=inputs).logits[:, PROMPT_LENGTH:]
        loss = causal_lm_loss(logits, labels)
        wrt = [prompts] if deep is None else [prompts, deep]
        return loss.detach(), torch.autograd.grad(loss, wrt)
    finally:
        for hook in hooks:
            hook.remove()


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", ["prompt", "deep_prompt"])
def test_prompt_gradients_through_three_peers_equal_local_autograd(tuned, local_model, chat_ids, kind):
    model = tuned[kind]
    if model.tuning.deep:
        with torch.no_grad():
            model.tuning.deep_prompts.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    labels = chat_ids.clone()
    labels[:, :5] = -100  # some positions ignored, as a chat template's prompt would be
    for parameter in model.parameters():
        parameter.grad = None
    out = model(chat_ids, labels=labels)
    out.loss.backward()
    loss, expected = _local_gradients(local_model, chat_ids, labels, model.tuning.prompt_embeddings,
                                      model.tuning.deep_prompts)
    assert abs(float(out.loss) - float(loss)) <= 1e-4 * abs(float(loss))
    got = [p.grad for p in model.parameters()]
    assert len(got) == len(expected) == (2 if kind == "deep_prompt" else 1)
    for remote, local in zip(got, expected):
        assert local.norm() > 0
        print(f"{kind}: relative error {_relative_error(remote, local):.2e}, {model.remote_blocks.failovers} failovers")
        assert _relative_error(remote, local) < 1e-4, _relative_error(remote, local)
