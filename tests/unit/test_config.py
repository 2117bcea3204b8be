"""Tests of peers.config: the --blocks range and the peer's frozen configuration."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from peers.config import PeerConfig, auto_dtype, parse_announce_maddrs, parse_block_range
from swarm.errors import ConfigError


@pytest.mark.parametrize(
    "text, num_blocks, expected",
    [
        ("10:20", None, (10, 20)),
        ("10:20", 20, (10, 20)),
        ("0:1", 1, (0, 1)),
        (" 3 : 7 ", None, (3, 7)),  # int() strips whitespace
    ],
)
def test_valid_ranges(text, num_blocks, expected):
    assert parse_block_range(text, num_blocks) == expected


@pytest.mark.parametrize(
    "text, reason",
    [
        ("20:10", "START < END"),
        ("5:5", "START < END"),
        ("-1:3", "START < END"),
        ("a:b", "expected START:END"),
        ("5", "expected START:END"),
        ("1:2:3", "expected START:END"),
        ("", "expected START:END"),
        (":5", "expected START:END"),
        ("1.5:3", "expected START:END"),
    ],
)
def test_invalid_ranges(text, reason):
    with pytest.raises(ConfigError, match=reason) as info:
        parse_block_range(text)
    assert repr(text) in str(info.value)
    assert "\n" not in str(info.value)


def test_end_beyond_the_model_names_the_block_count():
    with pytest.raises(ConfigError, match=r"only 32 blocks \(0:32\)"):
        parse_block_range("30:33", num_blocks=32)


def test_config_is_frozen():
    cfg = PeerConfig(model="tiny", initial_peers=())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "device, dtype, expected",
    [
        ("cpu", "auto", torch.float32),
        ("cuda", "auto", torch.float32),
        ("cpu", "bfloat16", torch.bfloat16),
        ("cpu", "float16", torch.float16),
    ],
)
def test_torch_dtype(device, dtype, expected):
    assert PeerConfig(model="tiny", initial_peers=(), device=device, dtype=dtype).torch_dtype() == expected


@pytest.mark.parametrize(
    "device, stored, cuda_bf16, expected, explained",
    [
        ("cpu", "float32", True, "float32", False),  # the default model: token-exact tests rely on it
        ("cpu", "bfloat16", True, "bfloat16", False),  # a bf16 7B checkpoint stays at its size
        ("cuda", "bfloat16", True, "bfloat16", False),
        ("cuda:0", "float32", True, "float32", False),
        ("cuda", "float16", True, "float16", False),
        ("cpu", "float16", True, "bfloat16", True),  # CPUs run float16 slowly: same size, bfloat16
        ("cuda", "bfloat16", False, "float16", True),  # a GPU without bfloat16
        ("cpu", "float64", True, "float32", True),  # no peer declares float64
    ],
)
def test_auto_dtype_follows_the_checkpoint_where_the_device_runs_it(device, stored, cuda_bf16, expected, explained):
    chosen, why = auto_dtype(device, stored, cuda_bf16)
    assert chosen == expected and (why is not None) == explained


def test_for_checkpoint_fixes_auto_and_keeps_an_explicit_dtype(caplog):
    auto = PeerConfig(model="tiny", initial_peers=())
    assert auto.for_checkpoint("bfloat16").torch_dtype() == torch.bfloat16
    with caplog.at_level(logging.INFO, logger="peers.config"):
        assert auto.for_checkpoint("float16").dtype == "bfloat16"
    assert "--dtype auto" in caplog.text and "bfloat16" in caplog.text
    explicit = PeerConfig(model="tiny", initial_peers=(), dtype="float32")
    assert explicit.for_checkpoint("bfloat16") is explicit


def test_cuda_without_cuda_is_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device"):
        PeerConfig(model="tiny", initial_peers=(), device="cuda").torch_device()
    assert PeerConfig(model="tiny", initial_peers=()).torch_device() == torch.device("cpu")


def test_announced_addresses_accept_repeats_and_commas():
    assert parse_announce_maddrs(["/ip4/127.0.0.1/tcp/4000, /ip4/203.0.113.5/tcp/31337", "/ip6/::1/tcp/5"]) == (
        "/ip4/127.0.0.1/tcp/4000", "/ip4/203.0.113.5/tcp/31337", "/ip6/::1/tcp/5")
    assert parse_announce_maddrs([]) == ()


@pytest.mark.parametrize(
    "address, reason",
    [
        ("/ip4/1.2.3.4/tcp/0", "explicit TCP port"),  # p2pd cannot announce port 0
        ("/ip4/1.2.3.4", "explicit TCP port"),
        ("1.2.3.4:31337", "invalid multiaddr"),
        ("/ip4/127.0.0.1/tcp/4000/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", "leave out the peer id"),
    ],
)
def test_bad_announced_addresses_say_what_is_wrong(address, reason):
    with pytest.raises(ConfigError, match=reason):
        parse_announce_maddrs([address])
