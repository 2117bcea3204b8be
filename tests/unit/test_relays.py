"""Tests of relaying (swarm.relays, peers.forwarder, swarm.remote): registrations, limits, relay order; no network."""

from __future__ import annotations

import hashlib

import pytest
from hivemind.p2p import PeerID

from peers.forwarder import Registry, RelayRefused, StreamBudget
from swarm.protocol import pack, unpack
from swarm.relays import RegisterReply, RelayLimits
from swarm.remote import RELAY_DOWN_SECONDS, HivemindTransport


def peer(name: str) -> PeerID:
    return PeerID(b"\x12\x20" + hashlib.sha256(name.encode()).digest())


HOME, OTHER = peer("home"), peer("other")


def test_a_registration_lasts_its_ttl_unless_renewed():
    registry = Registry(ttl=60.0)
    assert registry.register(HOME, now=0.0) == RegisterReply(ok=True, ttl=60.0)
    assert registry.target(str(HOME), now=59.0) == HOME
    registry.register(HOME, now=50.0)  # renewed
    assert registry.target(str(HOME), now=100.0) == HOME
    with pytest.raises(RelayRefused, match="not registered"):
        registry.target(str(HOME), now=111.0)


def test_only_registered_peers_are_forwarded_to():
    registry = Registry()
    with pytest.raises(RelayRefused, match="not registered"):
        registry.target(str(OTHER), now=0.0)
    with pytest.raises(RelayRefused, match="not a peer id"):
        registry.target("0OIl!", now=0.0)


def test_registrations_are_capped():
    registry = Registry(RelayLimits(max_registered=1))
    assert registry.register(HOME, 0.0).ok
    refused = registry.register(OTHER, 0.0)
    assert not refused.ok and "already forwards to 1 peers" in refused.error
    assert registry.register(HOME, 1.0).ok  # renewing is always fine


def test_streams_are_capped_per_peer_and_in_all():
    registry = Registry(RelayLimits(max_streams_per_peer=2, max_streams=3))
    for _ in range(2):
        registry.open_stream(HOME)
    with pytest.raises(RelayRefused, match="2 streams to"):
        registry.open_stream(HOME)
    registry.open_stream(OTHER)
    with pytest.raises(RelayRefused, match="already forwards 3 streams"):
        registry.open_stream(OTHER)
    registry.close_stream(HOME)
    registry.open_stream(OTHER)
    assert dict(registry.streams) == {HOME: 1, OTHER: 2}


def test_a_stream_is_capped_in_bytes_and_time():
    budget = StreamBudget(RelayLimits(max_stream_bytes=100, max_stream_seconds=10.0), began=0.0)
    budget.spend(100, now=1.0)
    with pytest.raises(RelayRefused, match="100 bytes"):
        budget.spend(1, now=1.0)
    with pytest.raises(RelayRefused, match="10 s"):
        StreamBudget(RelayLimits(max_stream_seconds=10.0), began=0.0).spend(1, now=11.0)


def test_register_replies_survive_the_wire():
    assert unpack(pack(RegisterReply(ok=False, error="full")), RegisterReply) == RegisterReply(ok=False, error="full")


def test_a_relay_that_failed_is_tried_last_for_a_while(monkeypatch):
    first, second = peer("relay1"), peer("relay2")
    transport = HivemindTransport(p2p=None, relays_of=lambda peer_id: [first, second] if peer_id == HOME else [])
    assert transport.relays(OTHER) == []
    assert transport.relays(HOME) == [first, second]
    clock = [1000.0]
    monkeypatch.setattr("swarm.remote.time.monotonic", lambda: clock[0])
    transport.relay_failed(HOME, first)
    assert transport.relays(HOME) == [second, first]
    clock[0] += RELAY_DOWN_SECONDS + 1
    assert transport.relays(HOME) == [first, second]
