"""`swarm-chat serve` against a live loopback swarm, driven by the official `openai` client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch



pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
CHAT_PROMPT = "What is the capital of France?"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except (urllib.error.URLError, OSError):
        return None


@pytest.fixture(scope="module")
def api_url(swarm3, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("api") / "serve.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "apps.chat", "serve", "--port", str(port), "--max-length", "256"],
            env=swarm3.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while get_status(f"{url}/models") != 200:
        assert server.poll() is None, f"the server exited: {log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"the server did not come up: {log_path.read_text()[-3000:]}"
        time.sleep(0.3)
    yield url
    server.send_signal(signal.SIGINT)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    assert "Traceback" not in log_path.read_text(), log_path.read_text()[-3000:]


@pytest.fixture()
def api(api_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_url, api_key="unused", max_retries=0, timeout=120)


def local_chat_answer(local_model, tokenizer, question: str, max_new_tokens: int) -> str:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    output = local_model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)


def test_lists_the_model(api):
    assert [m.id for m in api.models.list().data] == [MODEL]


def test_streamed_chat_equals_swarm_chat_prompt(api, swarm3):
    stream = api.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": CHAT_PROMPT}], max_tokens=24, temperature=0, stream=True
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3  # really streamed, not one blob
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    streamed = "".join(pieces)
    cli = subprocess.run(
        [sys.executable, "-m", "apps.chat", "--prompt", CHAT_PROMPT, "--max-new-tokens", "24"],
        env=swarm3.env, capture_output=True, text=True, timeout=120, check=True,
    )
    assert streamed.strip() == cli.stdout.strip()
    assert "Paris" in streamed


def test_four_concurrent_clients_get_the_local_models_answers(api_url, local_model, tokenizer):
    questions = ["What is the capital of France?", "What is 2 + 2?", "Name a primary colour.", "Who wrote Hamlet?"]
    expected = [local_chat_answer(local_model, tokenizer, q, 16) for q in questions]

    def ask(index: int) -> str:
        client = openai.OpenAI(base_url=api_url, api_key="unused", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": questions[index]}]
        if index % 2:  # half of them stream
            stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                                    stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                              temperature=0).choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(4)))
    assert answers == expected


def test_completion_matches_local_model_and_honours_stop(api, local_model, tokenizer):
    prompt = "The capital of Italy is"
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    local = tokenizer.decode(local_model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:],
                             skip_special_tokens=True)
    reply = api.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert reply.choices[0].text == local
    assert reply.usage.prompt_tokens == ids.shape[1] and reply.usage.completion_tokens == 8
    stop_word = local.split()[1]  # a word in the middle of the answer
    stopped = api.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stop=[stop_word])
    assert stopped.choices[0].text == local[: local.index(stop_word)]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = api.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stop=stop_word,
                                      stream=True)
    assert "".join(c.choices[0].text for c in streamed) == local[: local.index(stop_word)]


def test_bad_requests_get_openai_errors(api, api_url):
    hello = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as missing:
        api.chat.completions.create(model="no-such-model", messages=hello, max_tokens=2)
    assert missing.value.body["code"] == "model_not_found"
    for bad in (dict(temperature=5), dict(n=2), dict(top_p=0), dict(stop=["a", "b", "c", "d", "e"])):
        with pytest.raises(openai.BadRequestError):
            api.chat.completions.create(model=MODEL, messages=hello, max_tokens=2, **bad)
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError) as too_long:
        api.chat.completions.create(model=MODEL, messages=hello, max_tokens=100_000)
    assert too_long.value.body["code"] == "context_length_exceeded"
    request = urllib.request.Request(f"{api_url}/chat/completions", data=b"{not json", method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as malformed:
        urllib.request.urlopen(request, timeout=10)
    assert malformed.value.code == 400
    assert json.loads(malformed.value.read())["error"]["type"] == "invalid_request_error"
    # the server is still fine
    assert api.chat.completions.create(model=MODEL, messages=hello, max_tokens=2, temperature=0).choices[0].message


def test_every_answer_says_how_much_of_it_was_verified(api):
    # swarm3's peers each serve blocks nobody else serves: no step can be checked, so every answer is flagged
    messages = [{"role": "user", "content": CHAT_PROMPT}]
    reply = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    verification = reply.model_extra["verification"]
    assert verification["steps"] >= 3 * 4 and verification["verified_steps"] == 0
    assert verification["coverage"] == 0.0 and verification["flagged"] is True
    chunks = list(api.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                              stream=True))
    assert all("verification" not in (c.model_extra or {}) for c in chunks[:-1])
    assert chunks[-1].model_extra["verification"]["flagged"] is True
    completion = api.completions.create(model=MODEL, prompt="The capital of Italy is", max_tokens=3, temperature=0)
    assert completion.model_extra["verification"]["coverage"] == 0.0
