"""Tests of swarm.errors: the exception tree and its one-line, actionable messages."""

from __future__ import annotations

import pytest

from swarm.errors import (
    ConfigError,
    MissingBlocksError,
    ModelError,
    RemoteError,
    SwarmConnectionError,
    SwarmError,
    UnknownModelError,
    UnsupportedModelError,
    format_block_spans,
)


@pytest.mark.parametrize(
    "blocks, text",
    [
        ([0, 1, 2, 7], "0-2, 7"),
        ([7, 2, 0, 1, 2], "0-2, 7"),  # unsorted, with a duplicate
        ([5], "5"),
        ([3, 4], "3-4"),
        ([1, 3, 5], "1, 3, 5"),
        ([10, 11, 12, 20, 21, 30], "10-12, 20-21, 30"),
        ([], ""),
    ],
)
def test_format_block_spans(blocks, text):
    assert format_block_spans(blocks) == text


def test_missing_blocks_error_names_the_spans_and_how_to_serve_them():
    error = MissingBlocksError("llama-tiny@1234", [14, 12, 13, 20])
    message = str(error)
    assert "12-14, 20" in message
    assert "llama-tiny@1234" in message
    assert "swarm-peer join --model llama-tiny@1234 --blocks 12:15" in message  # the first missing run, half-open
    assert "\n" not in message
    assert error.model == "llama-tiny@1234"
    assert error.missing == [14, 12, 13, 20]
    assert isinstance(error, SwarmError)


def test_missing_blocks_error_single_block():
    assert "--blocks 3:4" in str(MissingBlocksError("m", [3]))


def test_missing_blocks_error_keeps_its_own_copy():
    missing = [1, 2]
    error = MissingBlocksError("m", missing)
    missing.append(9)
    assert error.missing == [1, 2]


def test_remote_error_fields():
    error = RemoteError("QmPeer", "unknown_session", "no session abc")
    assert error.peer == "QmPeer"
    assert error.kind == "unknown_session"
    assert error.remote_message == "no session abc"
    assert str(error) == "peer QmPeer refused the request (unknown_session): no session abc"
    assert isinstance(error, SwarmError)


def test_exception_tree():
    assert issubclass(UnknownModelError, ModelError)
    assert issubclass(UnsupportedModelError, ModelError)
    for cls in (ModelError, ConfigError, SwarmConnectionError, MissingBlocksError, RemoteError):
        assert issubclass(cls, SwarmError)


def test_missing_blocks_error_names_peers_that_serve_them_but_cannot_be_dialled():
    message = str(MissingBlocksError("m", [15, 16], undialable=["QmHome"]))
    assert ("no reachable peer serves block(s) 15-16 of m (peer QmHome serves some but cannot be dialled: "
            "behind NAT without a relay)") in message
    assert "\n" not in message
