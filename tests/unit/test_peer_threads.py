"""`swarm-peer join --num-threads`: from the command line to the torch threads the compute thread uses."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from click.testing import CliRunner

import peers.server
from peers.cli import main
from peers.config import PeerConfig
from peers.server import use_threads


@pytest.fixture
def joined(monkeypatch) -> list[PeerConfig]:
    configs: list[PeerConfig] = []
    monkeypatch.setattr(peers.server, "run_peer", lambda cfg, factory: configs.append(cfg))
    return configs


def test_num_threads_reaches_the_peers_config(joined) -> None:
    result = CliRunner().invoke(main, ["join", "--blocks", "0:10", "--num-threads", "1"], env={"SWARM_NUM_THREADS": "4"})
    assert result.exit_code == 0, result.output
    assert joined[0].num_threads == 1  # the option wins over the environment


def test_num_threads_defaults_to_torchs_own_and_reads_the_environment(joined) -> None:
    assert CliRunner().invoke(main, ["join", "--blocks", "0:10"], env={"SWARM_NUM_THREADS": None}).exit_code == 0
    assert CliRunner().invoke(main, ["join", "--blocks", "0:10"], env={"SWARM_NUM_THREADS": "3"}).exit_code == 0
    assert [cfg.num_threads for cfg in joined] == [None, 3]


def test_zero_threads_is_refused_with_a_one_line_message(joined) -> None:
    result = CliRunner().invoke(main, ["join", "--blocks", "0:10", "--num-threads", "0"])
    assert result.exit_code == 2 and "--num-threads" in result.output and "Traceback" not in result.output
    assert not joined


def test_the_compute_thread_uses_the_peers_thread_count() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        use_threads(1)
        with ThreadPoolExecutor(max_workers=1) as compute:  # as the handler's compute thread
            assert compute.submit(lambda: (torch.ones(64, 64) @ torch.ones(64, 64), torch.get_num_threads())[1]
                                  ).result() == 1
        use_threads(None)  # the default leaves torch's setting alone
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
