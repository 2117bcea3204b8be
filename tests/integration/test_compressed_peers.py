"""Peers started with --svd-energy, --quant nf4 and --offload disk serve generation through swarm-chat."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from peers.local import LocalSwarm
from swarm import records
from swarm.models import DEFAULT_MODEL
from swarm.network import create_client_dht

pytestmark = pytest.mark.slow

PEER_OPTIONS = {
    "0:10": ("--svd-energy", "0.95"),
    "10:20": ("--quant", "nf4"),
    "20:30": ("--offload", "disk"),
}


@pytest.fixture(scope="module")
def compressed_swarm():
    """One chain that needs all three kinds of peer: each serves a third of the blocks."""
    with LocalSwarm(model=DEFAULT_MODEL) as swarm:
        peers = [swarm.add_peer(blocks, *options, wait=False) for blocks, options in PEER_OPTIONS.items()]
        for peer in peers:
            swarm.wait_online(peer)
        yield swarm


def test_peers_announce_what_they_run(compressed_swarm, checkpoint):
    dht = create_client_dht([compressed_swarm.initial_peers], checkpoint.dht_prefix, checkpoint.num_blocks)
    try:
        spans = records.read_spans(dht, checkpoint.dht_prefix, checkpoint.num_blocks)
    finally:
        dht.shutdown()
    announced = {(s.start, s.end): (s.info.dtype, s.info.compression) for s in spans}
    assert announced == {
        (0, 10): ("float32", "svd-energy0.95-plain"),
        (10, 20): ("float32", "nf4"),
        (20, 30): ("float32", "none"),  # offloading does not change outputs
    }


def test_status_shows_each_peers_compression(compressed_swarm):
    expected = {"0:10": "svd-energy0.95-plain", "10:20": "nf4", "20:30": "none"}
    status = [sys.executable, "-m", "peers.cli", "status"]
    table = subprocess.run(status, env=compressed_swarm.env, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines() if line[:1].isdigit()}
    assert {blocks: row[6] for blocks, row in rows.items()} == expected  # the column after dtype
    listed = subprocess.run([*status, "--json"], env=compressed_swarm.env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    peers = json.loads(listed.stdout)["peers"]
    assert {f"{p['start']}:{p['end']}": p["compression"] for p in peers} == expected


def test_swarm_chat_answers_through_compressed_and_offloaded_peers(compressed_swarm):
    result = subprocess.run(
        [sys.executable, "-m", "apps.chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "12"],
        env=compressed_swarm.env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert all(hop in result.stderr for hop in ("[0:10]", "[10:20]", "[20:30]")), result.stderr  # all three peers
    assert len(result.stdout.split()) >= 3, result.stdout  # a real (if lossy) answer, not an empty one
    logs = {p.name: p.log() for p in compressed_swarm.processes}
    assert any("compression svd-energy0.95-plain" in log for log in logs.values())
    assert any("offload disk" in log for log in logs.values())


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--svd-rank", "8", "--svd-energy", "0.9"], "not several"),
        (["--offload", "cpu"], "--offload disk"),
        (["--quant", "nf4", "--offload", "disk"], "cannot be combined"),
    ],
)
def test_contradictory_options_give_one_clear_line(args, expected):
    result = subprocess.run([sys.executable, "-m", "peers.cli", "join", "--blocks", "0:2", *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
