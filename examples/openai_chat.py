"""Chat with the swarm through the official `openai` client: `swarm-chat serve` speaks OpenAI's API.

    python examples/openai_chat.py         # uses $SWARM_INITIAL_PEERS, or starts a local swarm of 3 peers
"""

import os
import socket
import subprocess
import sys
import time

import openai

from peers.local import swarm_or_local


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(client: openai.OpenAI, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.models.list()
            return
        except openai.APIConnectionError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("swarm-chat serve did not start") from None
            time.sleep(0.5)


def main() -> None:
    with swarm_or_local() as initial_peers:
        port = free_port()
        server = subprocess.Popen(  # in a shell: swarm-chat serve --port 8000
            [sys.executable, "-m", "apps.chat", "serve", "--port", str(port)],
            env={**os.environ, "SWARM_INITIAL_PEERS": initial_peers},
        )
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="not-needed")
            wait_ready(client, server)
            question = "What is the capital of France?"
            print(f"Q: {question}\nA: ", end="", flush=True)
            stream = client.chat.completions.create(
                model="smollm2-135m",
                messages=[{"role": "user", "content": question}],
                max_tokens=32,
                temperature=0,
                stream=True,
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    print(chunk.choices[0].delta.content, end="", flush=True)
            print()
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
