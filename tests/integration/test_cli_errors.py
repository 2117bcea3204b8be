"""Bad input on the command line: one line on stderr, a non-zero exit, no traceback, no hang."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.slow

DEAD_PEER = "/ip4/127.0.0.1/tcp/9/p2p/QmNYSDoFZc5pZDn96u4tdQYFsmjCsqHskNJ1YJm9sMrT7D"  # nothing listens on port 9


BAD_INPUTS = [
    (["peers.cli", "join", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["peers.cli", "join", "--blocks", "20:10"], "invalid block range '20:10'"),
    (["peers.cli", "join", "--blocks", "0:40"], "only 30 blocks"),
    (["peers.cli", "join", "--blocks", "ten:twenty"], "invalid block range"),
    (["peers.cli", "join", "--initial-peers", "not-a-multiaddr"], "invalid multiaddr 'not-a-multiaddr'"),
    (["peers.cli", "status", "--initial-peers", "/ip4/127.0.0.1/tcp/9"], "lacks the peer id"),
    (["peers.cli", "join", "--blocks", "0:10", "--host", "127.0.0.1", "--initial-peers", DEAD_PEER],
     "cannot reach any initial peer"),
    (["apps.chat", "--prompt", "hi", "--initial-peers", DEAD_PEER], "cannot reach any initial peer"),
    (["apps.chat", "--model", "no-such-model", "--prompt", "hi"], "unknown model 'no-such-model'"),
    (["apps.chat", "serve", "--initial-peers", DEAD_PEER], "cannot reach any initial peer"),
    (["apps.chat", "serve", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["apps.tune", "--initial-peers", DEAD_PEER], "cannot reach any initial peer"),
    (["apps.tune", "--model", "no-such-model"], "unknown model 'no-such-model'"),
]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def bad_input_results() -> list[subprocess.CompletedProcess]:
    """Every bad command line, run as its own process, a few at a time (most of each run is Python's imports)."""
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(_run, [args for args, _ in BAD_INPUTS]))


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)), ids=[" ".join(a[:2]) + f" ({e})" for a, e in BAD_INPUTS])
def test_bad_input_gives_one_clear_line(bad_input_results, case):
    result, expected = bad_input_results[case], BAD_INPUTS[case][1]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    assert expected in error_lines[0]


def test_swarm_chat_says_what_it_is_doing_on_stderr_only(bad_input_results):
    case = [args for args, _ in BAD_INPUTS].index(["apps.chat", "--prompt", "hi", "--initial-peers", DEAD_PEER])
    result = bad_input_results[case]
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "Loading smollm2-135m (tokenizer, embeddings, head) and joining the swarm through 1 initial peer..."
    assert lines[-1].startswith("error: cannot reach any initial peer")


def test_unreachable_bootstrap_fails_fast_with_env_variable():
    env = {**__import__("os").environ, "SWARM_INITIAL_PEERS": DEAD_PEER}
    result = subprocess.run([sys.executable, "-m", "peers.cli", "status"], capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot reach any initial peer")


def test_swarm_tune_names_the_malformed_line_of_a_dataset(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                    '{"messages": [{"role": "user", "content": "no answer"}]}\n')
    result = subprocess.run([sys.executable, "-m", "apps.tune", "--data", str(data), "--initial-peers", DEAD_PEER],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {data}, line 2: not a chat example")
