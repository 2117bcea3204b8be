"""Joining without --blocks, coverage status, missing blocks, and leaving the swarm cleanly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from peers.local import LocalSwarm
from swarm import DistributedModelForCausalLM
from swarm.errors import MissingBlocksError

pytestmark = pytest.mark.slow


def status(swarm: LocalSwarm) -> dict:
    result = subprocess.run([sys.executable, "-m", "peers.cli", "status", "--json"], env=swarm.env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def partial_swarm():
    """A peer pinned to 0:20, then one that chooses 5 blocks itself (blocks 25-29 stay uncovered)."""
    with LocalSwarm() as swarm:
        swarm.add_peer("0:20", "--public-name", "fixed")
        swarm.add_peer(None, "--num-blocks", "5", "--rebalance-period", "0", name="chooser")
        yield swarm


def test_joining_peer_takes_the_least_served_blocks(partial_swarm):
    chooser = next(p for p in partial_swarm.processes if p.name == "chooser")
    assert "blocks 20:25" in chooser.log()
    report = status(partial_swarm)
    spans = sorted((p["start"], p["end"], p["state"]) for p in report["peers"])
    assert spans == [(0, 20, "online"), (20, 25, "online")]
    assert all(p["rtt_ms"] is not None and p["rtt_ms"] > 0 for p in report["peers"])
    assert report["missing_blocks"] == [25, 26, 27, 28, 29]
    assert {p["public_name"] for p in report["peers"]} == {"fixed", ""}


def test_status_table_names_missing_blocks(partial_swarm):
    result = subprocess.run([sys.executable, "-m", "peers.cli", "status"], env=partial_swarm.env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "0:20" in result.stdout and "online" in result.stdout
    assert "MISSING: no reachable online peer serves block(s) 25-29" in result.stdout


def test_client_waits_then_names_the_missing_blocks(partial_swarm, chat_ids):
    model = DistributedModelForCausalLM.from_pretrained("smollm2-135m", [partial_swarm.initial_peers],
                                                        missing_blocks_timeout=3)
    try:
        began = time.monotonic()
        with pytest.raises(MissingBlocksError) as caught:
            model.generate(chat_ids, max_new_tokens=2)
        assert 3 <= time.monotonic() - began < 30
        assert "block(s) 25-29" in str(caught.value) and "--blocks 25:30" in str(caught.value)
    finally:
        model.shutdown()


def test_sigterm_announces_offline_and_exits(partial_swarm):
    leaving = partial_swarm.add_peer("25:30", name="leaving")
    assert any(p["start"] == 25 and p["state"] == "online" for p in status(partial_swarm)["peers"])
    leaving.signal(signal.SIGTERM)
    assert leaving.process.wait(timeout=30) == 0
    assert "announcing OFFLINE" in leaving.log()
    states = [p["state"] for p in status(partial_swarm)["peers"] if p["start"] == 25]
    assert states == ["offline"]


def test_a_peer_moves_to_blocks_nobody_serves(local_model, chat_ids):
    with LocalSwarm() as swarm:
        mover = swarm.add_peer(None, "--num-blocks", "10", "--rebalance-period", "3", name="mover")
        assert "blocks 0:10" in mover.log()
        swarm.add_peers(("pinned-0", "0:10", ()), ("pinned-20", "20:30", ()))
        deadline = time.monotonic() + 120
        while "after moving" not in mover.log() and time.monotonic() < deadline:
            time.sleep(1)
        assert "Moving from blocks 0:10 to 10:20" in mover.log()
        report = status(swarm)
        online = sorted((p["start"], p["end"]) for p in report["peers"] if p["state"] == "online")
        assert online == [(0, 10), (10, 20), (20, 30)] and report["missing_blocks"] == []
        model = DistributedModelForCausalLM.from_pretrained("smollm2-135m", [swarm.initial_peers])
        try:
            produced = model.generate(chat_ids, max_new_tokens=16)
        finally:
            model.shutdown()
        assert produced.tolist() == local_model.generate(chat_ids, max_new_tokens=16, do_sample=False).tolist()


def test_a_bfloat16_peer_serves_a_float32_client(chat_ids, tokenizer):
    with LocalSwarm() as swarm:
        peer = swarm.add_peer("0:30", "--dtype", "bfloat16")
        assert "torch.bfloat16" in peer.log()
        model = DistributedModelForCausalLM.from_pretrained("smollm2-135m", [swarm.initial_peers])
        try:
            produced = model.generate(chat_ids, max_new_tokens=16)
            assert model.loop.run(model.sequence.refresh_spans(force=True))[0].info.dtype == "bfloat16"
        finally:
            model.shutdown()
    assert tokenizer.decode(produced[0, chat_ids.shape[1]:], skip_special_tokens=True) == "The capital of France is Paris."
