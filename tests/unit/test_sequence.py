"""Cooldowns of failing peers: growing on repeats, expiring, and keeping peers out of routes."""

from __future__ import annotations

import hashlib
import time

from hivemind.p2p import PeerID

from swarm import routing
from swarm.config import ClientConfig
from swarm.records import PeerSpan, ServerInfo, ServerState
from swarm.cooldowns import FIRST_COOLDOWN as BAN_SECONDS, MAX_COOLDOWN as MAX_BAN_SECONDS
from swarm.sequence import RemoteSequence


def peer(name: str) -> PeerID:
    return PeerID(b"\x12\x20" + hashlib.sha256(name.encode()).digest())


def sequence() -> RemoteSequence:
    return RemoteSequence(None, None, "m", 30, ClientConfig(initial_peers=()))


def test_ban_doubles_on_repeat_up_to_a_limit():
    seq = sequence()
    lengths = [seq.ban(peer("a")) for _ in range(10)]
    assert lengths[:3] == [BAN_SECONDS, 2 * BAN_SECONDS, 4 * BAN_SECONDS]
    assert lengths[-1] == MAX_BAN_SECONDS
    assert seq.banned() == {peer("a")}


def test_expired_bans_are_not_in_force(monkeypatch):
    seq = sequence()
    seq.ban(peer("a"))
    later = time.monotonic() + BAN_SECONDS + 1
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert seq.banned() == frozenset()


def test_route_prefers_peers_with_cache_room():
    def span(name: str, room: int) -> PeerSpan:
        return PeerSpan(peer(name), ServerInfo(state=ServerState.ONLINE, start=0, end=30, throughput=100.0, dtype="float32", cache_tokens_left=room))

    full, roomy = span("full", 10), span("roomy", 100_000)
    latencies = {full.peer_id: 0.001, roomy.peer_id: 0.050}
    assert routing.find_route([full, roomy], latencies, 0, 30)[0].peer_id == full.peer_id
    assert routing.find_route([full, roomy], latencies, 0, 30, needed_tokens=2048)[0].peer_id == roomy.peer_id
    # With nobody else, the full peer is still used rather than no route at all.
    assert routing.find_route([full], latencies, 0, 30, needed_tokens=2048)[0].peer_id == full.peer_id


def test_single_token_steps_measure_a_peers_real_speed():
    seq = sequence()
    seq.observe_step(peer("a"), blocks=10, tokens=1, seconds=0.1)
    assert abs(seq.measured_throughput[peer("a")] - 100.0) < 1e-6
    seq.observe_step(peer("a"), blocks=10, tokens=32, seconds=5.0)  # a prefill says nothing about decode speed
    assert abs(seq.measured_throughput[peer("a")] - 100.0) < 1e-6
    assert seq.evidence(peer("a")).throughput == seq.measured_throughput[peer("a")]
    assert seq.evidence(peer("b")).throughput is None
