"""Every script in examples/ runs as written against the default model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# An example starts its own peers or trains, and a busy CI machine can take minutes for that: more time than the
# suite's 300 s per test.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name: str, env: dict[str, str]) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / name)], env=env, capture_output=True, text=True,
                            timeout=560, cwd=EXAMPLES.parent)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("name", ["python_api.py", "openai_chat.py"])
def test_example_against_a_running_swarm(name, swarm3):
    out = run_example(name, swarm3.env)  # $SWARM_INITIAL_PEERS names the test swarm
    assert "A: The capital of France is Paris" in out


@pytest.mark.parametrize("name", ["local_swarm.py", "compressed_peer.py"])
def test_example_that_starts_its_own_swarm(name):
    env = {k: v for k, v in os.environ.items() if k != "SWARM_INITIAL_PEERS"}
    out = run_example(name, env)
    assert "Paris" in out


def test_finetune_example_trains_prompts_and_chats_with_them(swarm3):
    out = run_example("finetune.py", swarm3.env)
    assert "held-out accuracy before:" in out and "held-out accuracy after 8 steps:" in out
    losses = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if line.startswith("step ")]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert "saved to" in out and "\nA: " in out
