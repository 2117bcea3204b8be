"""Tests of peers.dialback and peers.reachability: dial-back targets, verdicts and relay choice, no network."""

from __future__ import annotations

import asyncio
import hashlib
import random
from types import SimpleNamespace

import pytest
from hivemind.p2p import PeerID

from peers.dialback import DialBackReply, DialBackRequest, DialBackService, dial_targets
from peers.reachability import (
    MISSED_RENEWALS,
    HelperAnswer,
    RelayKeeper,
    helper_ids,
    judge,
    keep_relays,
    needs_relay,
    on_this_machine_only,
    public_peers,
    relay_candidates,
)
from swarm.protocol import pack, unpack
from swarm.records import PeerSpan, ServerInfo, ServerState


def peer(name: str) -> PeerID:
    return PeerID(b"\x12\x20" + hashlib.sha256(name.encode()).digest())


A, B, C = peer("a"), peer("b"), peer("c")


def reply(checked: bool = True, reachable: bool = False, relays: bool = True) -> DialBackReply:
    return DialBackReply(checked=checked, reachable=reachable, relays=relays)


# --- dial-back targets: only the IP the request came from ---


def test_targets_are_the_listening_ports_at_the_observed_address():
    listening = ["/ip4/10.77.1.2/tcp/4001/p2p/QmHome", "/ip4/127.0.0.1/tcp/4001", "/ip4/10.77.1.2/tcp/4002"]
    assert dial_targets(listening, "/ip4/10.77.2.1/tcp/53211") == ["/ip4/10.77.2.1/tcp/4001", "/ip4/10.77.2.1/tcp/4002"]


def test_no_targets_without_a_direct_connection_or_a_tcp_address():
    assert dial_targets(["/ip4/10.0.0.2/tcp/4001"], None) == []
    assert dial_targets(["/ip4/10.0.0.2/tcp/4001"], "/ip4/1.2.3.4/tcp/1/p2p/QmRelay/p2p-circuit") == []
    assert dial_targets(["/ip4/10.0.0.2/udp/4001/quic"], "/ip4/1.2.3.4/tcp/9") == []
    assert dial_targets(["/ip6/::1/tcp/4001"], "/ip4/1.2.3.4/tcp/9") == []  # another address family
    assert dial_targets(["/ip4/10.0.0.2/tcp/4001/p2p/QmR/p2p-circuit"], "/ip4/1.2.3.4/tcp/9") == []


def test_targets_are_capped():
    listening = [f"/ip4/10.0.0.2/tcp/{port}" for port in range(4000, 4020)]
    assert len(dial_targets(listening, "/ip4/1.2.3.4/tcp/9")) == 8


def test_requests_and_replies_survive_the_wire():
    request = DialBackRequest(addresses=["/ip4/10.0.0.2/tcp/4001"])
    assert unpack(pack(request), DialBackRequest) == request
    assert unpack(pack(reply(reachable=True)), DialBackReply).reachable


# --- verdicts ---


@pytest.mark.parametrize("replies, verdict", [
    ([reply(reachable=True), reply()], True),
    ([reply(), reply()], False),
    ([None, reply(checked=False)], None),
    ([], None),
    ([None, reply()], False),
])
def test_judge(replies, verdict):
    assert judge(replies) is verdict


@pytest.mark.parametrize("mode, reachable, relay", [
    ("auto", False, True), ("auto", True, False), ("auto", None, False),
    ("always", True, True), ("always", None, True), ("never", False, False),
])
def test_needs_relay(mode, reachable, relay):
    assert needs_relay(mode, reachable) is relay


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError):
        needs_relay("sometimes", False)


# --- relay choice ---


def test_relay_candidates_are_the_helpers_that_relay_in_the_order_asked():
    answers = [HelperAnswer(A, reply(relays=False)), HelperAnswer(B, None), HelperAnswer(C, reply()),
               HelperAnswer(peer("d"), reply(checked=False, relays=True))]
    assert relay_candidates(answers) == [C, peer("d")]


def test_a_relay_that_misses_renewals_is_replaced_by_the_next_candidate():
    d = peer("d")
    assert keep_relays([A, B], {A: 0, B: MISSED_RENEWALS - 1}, [A, B, C, d]) == ([A, B], [])
    assert keep_relays([A, B], {B: MISSED_RENEWALS}, [A, B, C, d]) == ([A], [C])  # never B again right away
    assert keep_relays([], {}, [C, d]) == ([], [C, d])


def test_helpers_are_the_initial_peers_then_a_few_public_peers_never_oneself():
    initial = [f"/ip4/10.0.0.1/tcp/1/p2p/{A}", f"/ip4/127.0.0.1/tcp/1/p2p/{A}", f"/ip4/10.0.0.2/tcp/1/p2p/{B}"]
    others = [peer(str(i)) for i in range(5)]
    helpers = helper_ids(initial, [A, B, C, *others], own=C, rng=random.Random(0))
    assert helpers[:2] == [A, B] and len(helpers) == 4 and C not in helpers
    assert set(helpers[2:]) <= set(others)


def test_a_swarm_on_one_machine_needs_no_check():
    assert on_this_machine_only("127.0.0.1", [f"/ip4/127.0.0.1/tcp/1/p2p/{A}", f"/ip6/::1/tcp/1/p2p/{B}"])
    assert not on_this_machine_only("0.0.0.0", [f"/ip4/127.0.0.1/tcp/1/p2p/{A}"])
    assert not on_this_machine_only("127.0.0.1", [f"/ip4/127.0.0.1/tcp/1/p2p/{A}", f"/ip4/10.0.0.1/tcp/1/p2p/{B}"])


def test_public_peers_are_online_direct_reachable_ones():
    def span(name: str, **fields) -> PeerSpan:
        info = dict(state=ServerState.ONLINE, start=0, end=1, throughput=1.0, dtype="float32") | fields
        return PeerSpan(peer(name), ServerInfo(**info))

    spans = [span("direct"), span("relayed", relays=["QmR"]), span("hidden", reachable=False),
             span("leaving", state=ServerState.OFFLINE)]
    assert public_peers(spans) == [peer("direct")]


def test_the_keeper_renews_replaces_a_relay_gone_quiet_and_says_so(monkeypatch):
    alive = {A, B, C}
    registered = []

    async def fake_register(p2p, relay):
        registered.append(relay)
        return relay in alive

    changes = []

    async def candidates():
        return [A, B, C]

    monkeypatch.setattr("peers.reachability.register", fake_register)
    keeper = RelayKeeper(p2p=None, relays=[A, B], candidates=candidates, on_change=changes.append)
    asyncio.run(keeper.renew())
    assert changes == [] and keeper.relays == [A, B]
    alive.discard(B)
    for _ in range(MISSED_RENEWALS):
        asyncio.run(keeper.renew())
    assert keeper.relays == [A, C] and changes == [[A, C]]


# --- the dial-back service, with a fake dialer and a fake daemon ---


class FakeP2P:
    def __init__(self, own: PeerID, connections: dict[PeerID, str]):
        self.peer_id = own
        self.connections = connections

    async def list_peers(self):
        return [SimpleNamespace(peer_id=p, addrs=[a]) for p, a in self.connections.items()]

    async def get_visible_maddrs(self, latest: bool = False):
        return [f"/ip4/10.77.2.2/tcp/4001/p2p/{self.peer_id}"]


def serve(service: DialBackService, request: DialBackRequest, requester: PeerID) -> DialBackReply:
    from hivemind.proto import runtime_pb2

    raw = runtime_pb2.ExpertRequest(uid="", metadata=pack(request))
    answer = asyncio.run(service.rpc_dial_back(raw, SimpleNamespace(remote_id=requester)))
    return unpack(answer.metadata, DialBackReply)


def test_the_service_dials_back_at_the_observed_address_and_says_whether_it_relays():
    dialled = []

    async def dialer(peer_id, addresses):
        dialled.append((peer_id, addresses))
        return False

    service = DialBackService(relays=True, dialer=dialer)
    service._p2p = FakeP2P(B, {A: "/ip4/10.77.2.1/tcp/53211"})
    answer = serve(service, DialBackRequest(addresses=["/ip4/10.77.1.2/tcp/4001"]), A)
    assert answer.checked and not answer.reachable and answer.relays
    assert dialled == [(A, ["/ip4/10.77.2.1/tcp/4001"])]


def test_the_service_refuses_a_requester_it_sees_only_through_a_relay():
    async def dialer(peer_id, addresses):
        raise AssertionError("must not dial")

    service = DialBackService(relays=True, dialer=dialer)
    service._p2p = FakeP2P(B, {A: f"/ip4/10.77.2.2/tcp/4001/p2p/{C}/p2p-circuit"})
    answer = serve(service, DialBackRequest(addresses=["/ip4/10.77.1.2/tcp/4001"]), A)
    assert not answer.checked and answer.error.startswith("no TCP address")
