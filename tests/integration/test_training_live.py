"""Training through the swarm, live: prompts' gradients through three real peers equal local autograd, and
what a peer receives holds no token ids, labels or loss; generation with trained prompts (soft, and deep too)
equals the local model's with them.

The swarm is the session's three float32 peers (0:10, 10:20, 20:30); the reference is the whole model in this
process, with the same prompts (deep prompts added to each block's input by forward pre-hooks).
"""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch

from apps.chat import ChatSession
from peers.local import LocalSwarm
from swarm import DistributedModelForCausalLM
from swarm.client import causal_lm_loss
from swarm.finetune import DEFAULT_DATA
from swarm.models import DEFAULT_MODEL
from swarm.tuning import PromptTuning

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


def test_a_peer_receives_only_hidden_states_never_token_ids_labels_or_the_loss(tuned, chat_ids):
    model = tuned["deep_prompt"]
    sent = []
    train = model.transport.train

    async def recording(peer_id, meta, tensors, shapes, timeout=60.0):
        sent.append((meta, [t.clone() for t in tensors]))
        return await train(peer_id, meta, tensors, shapes, timeout)

    model.transport.train = recording
    try:
        labels = chat_ids.clone()
        out = model(chat_ids, labels=labels)
        out.loss.backward()
    finally:
        model.transport.train = train
    width = model.config.hidden_size
    assert {meta.kind for meta, _ in sent} == {"forward", "backward"}
    for meta, tensors in sent:
        assert set(meta.model_dump()) == {"version", "kind", "request_id", "start", "end", "tensors", "mask", "prompts",
                                          "keep", "forward_id"}
        for tensor in tensors:  # hidden states, their gradients, deep prompts: floating point, hidden-wide
            assert tensor.is_floating_point() and tensor.shape[-1] == width, (meta.kind, tensor.dtype, tensor.shape)
            assert tensor.numel() != labels.numel() and tensor.numel() != 1  # neither the labels nor the loss


def _train(model, ids, labels, steps: int, on_step=None) -> list[float]:
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        loss = model(ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
        if on_step is not None:
            on_step(step)
    return losses


def test_training_survives_a_peer_killed_midway_with_the_same_final_loss(chat_ids):
    steps = 6
    with LocalSwarm(model=DEFAULT_MODEL) as swarm:
        peers = swarm.add_peers(*((f"train-{blocks}-{i}", blocks, ()) for blocks in ("0:15", "15:30") for i in (1, 2)))
        losses = {}
        for run in ("steady", "churn"):
            model = DistributedModelForCausalLM.from_pretrained(
                DEFAULT_MODEL, [swarm.initial_peers], tuning="prompt", prompt_length=PROMPT_LENGTH, spot_checks=False)
            try:
                killed = []

                def kill_one(step: int) -> None:
                    if run == "churn" and step == 2:  # SIGKILL a peer that served the last pass
                        served = {str(r.hop.peer_id) for r in model.remote_blocks.last_records}
                        victim = next(p for p in peers if p.peer_id in served and p.alive())
                        victim.kill_group()
                        killed.append(victim)

                losses[run] = _train(model, chat_ids, chat_ids.clone(), steps, kill_one)
                if run == "churn":
                    assert killed and model.remote_blocks.failovers >= 1
            finally:
                model.shutdown()
    steady, churn = losses["steady"][-1], losses["churn"][-1]
    print(f"losses without churn {losses['steady']}, with a peer killed after step 3 {losses['churn']}")
    assert losses["steady"][-1] < losses["steady"][0]  # it learns
    assert abs(churn - steady) <= 0.01 * steady, (losses["steady"], losses["churn"])


def test_generation_with_soft_prompts_equals_local_generation_with_them_after_a_save_and_load(
        tuned, swarm3, local_model, chat_ids, tmp_path):
    saved = tuned["prompt"].save_prompts(tmp_path / "prompts")
    model = DistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, [swarm3.initial_peers], prompts=saved,
                                                        spot_checks=False)
    try:
        prompts = model.tuning.prompt_embeddings.detach()
        assert torch.equal(prompts, tuned["prompt"].tuning.prompt_embeddings.detach())
        got = model.generate(chat_ids, max_new_tokens=6)[0, chat_ids.shape[1]:].tolist()
        with torch.no_grad():
            embeds = torch.cat([prompts[None], local_model.model.embed_tokens(chat_ids)], dim=1)
            expected = local_model.generate(inputs_embeds=embeds, max_new_tokens=6, do_sample=False)[0].tolist()
        assert got == expected
        with model.inference_session(max_length=64) as session:  # a chat: the prompts go first, once
            first = model.generate(chat_ids, max_new_tokens=3, session=session)
            assert session.inner.position == session.position + PROMPT_LENGTH == first.shape[1] - 1 + PROMPT_LENGTH
    finally:
        model.shutdown()


def _greedy_with_deep_prompts(local_model, ids: torch.Tensor, prompts: torch.Tensor, deep: torch.Tensor,
                              new_tokens: int) -> list[int]:
    """Greedy tokens of the whole local model (transformers' generate) with `prompts` before `ids` and `deep`
    added at each decoder layer's input to the first positions, by forward pre-hooks on the prefill (the one
    forward of more than one token; each later one is a single token past the prompts)."""
    length = prompts.shape[0]

    def hook(index):
        def add(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] == 1:
                return None
            hidden = torch.cat([hidden[:, :length] + deep[index], hidden[:, length:]], dim=1)
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
        return add

    hooks = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(local_model.model.layers)]
    try:
        with torch.no_grad():
            embeds = torch.cat([prompts[None], local_model.model.embed_tokens(ids)], dim=1)
            return local_model.generate(inputs_embeds=embeds, max_new_tokens=new_tokens, do_sample=False)[0].tolist()
    finally:
        for handle in hooks:
            handle.remove()


def test_generation_with_deep_prompts_through_three_peers_equals_the_local_model_with_them(
        swarm3, local_model, chat_ids, tmp_path):
    config = local_model.config
    tuning = PromptTuning("deep_prompt", PROMPT_LENGTH, config.hidden_size, config.num_hidden_layers)
    with torch.no_grad():  # fixed non-zero deep prompts, large enough to change the answer
        tuning.deep_prompts.copy_(30 * torch.randn(tuning.deep_prompts.shape, generator=torch.Generator().manual_seed(0)))
    saved = tuning.save(tmp_path / "deep", DEFAULT_MODEL)
    prompts, deep = tuning.prompt_embeddings.detach(), tuning.deep_prompts.detach()
    expected = _greedy_with_deep_prompts(local_model, chat_ids, prompts, deep, 6)
    assert expected != _greedy_with_deep_prompts(local_model, chat_ids, prompts, 0 * deep, 6)  # they matter
    # receipts are verified (their input digests cover the prompts); no spot checks: nobody else serves the blocks
    model = DistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, [swarm3.initial_peers], prompts=saved,
                                                        check_rate=0.0)
    try:
        assert model.tuning.deep and torch.equal(model.tuning.deep_prompts.detach(), deep)
        assert model.generate(chat_ids, max_new_tokens=6)[0, chat_ids.shape[1]:].tolist() == expected
        chat = ChatSession(model, max_length=64, max_new_tokens=6, temperature=0.0, top_p=1.0)  # swarm-chat's
        answer = chat.ask("What is the capital of France?", out=io.StringIO())  # the prompt of `chat_ids`
        assert answer == model.tokenizer.decode(expected, skip_special_tokens=True).strip()
        assert chat.session.inner.position == chat_ids.shape[1] + 5 + PROMPT_LENGTH
        chat.session.close()
    finally:
        model.shutdown()


def test_swarm_tune_trains_reports_accuracy_and_its_prompts_load_into_swarm_chat(swarm3, tmp_path):
    data = tmp_path / "small.jsonl"
    data.write_text("".join(DEFAULT_DATA.read_text().splitlines(keepends=True)[:20]))
    out = tmp_path / "prompts"
    tune = subprocess.run([sys.executable, "-m", "apps.tune", "--data", str(data), "--epochs", "1", "--batch-size", "8",
                           "--held-out", "0.2", "--prompt-length", "4", "--output", str(out)],
                          env=swarm3.env, capture_output=True, text=True, timeout=280)
    assert tune.returncode == 0, tune.stderr[-2000:]
    lines = tune.stdout.splitlines()
    assert lines[0] == "held-out accuracy before tuning: " + lines[0].split(": ")[1] and "(4 examples)" in lines[0]
    assert any(line.startswith("loss: first step") and "(2 steps)" in line for line in lines)
    assert any(line.startswith("held-out accuracy after tuning: ") for line in lines)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    chat = subprocess.run([sys.executable, "-m", "apps.chat", "--prompts", str(out), "--prompt", "Review: It broke.",
                           "--max-new-tokens", "3"], env=swarm3.env, capture_output=True, text=True, timeout=280)
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr[-2000:]
