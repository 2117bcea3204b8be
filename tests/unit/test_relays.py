"""Tests of swarm.relays: the daemon flags and P2P options a node's relaying turns into, circuit addresses."""

from __future__ import annotations

from hivemind.p2p import P2P

from swarm.relays import (
    RelayLimits,
    Relaying,
    _p2p_with_flags,
    circuit_address,
    daemon_flags,
    is_circuit,
    p2p_options,
    relay_id,
)

RELAY = "/ip4/10.0.0.1/tcp/4001/p2p/QmRelayOne"
OTHER = "/ip4/10.0.0.2/tcp/4001/p2p/QmRelayTwo"


def test_a_direct_node_relays_with_the_documented_limits():
    flags = daemon_flags(Relaying())
    assert flags == {
        "relayService": True,
        "relayMaxReservations": 128,
        "relayMaxCircuits": 16,
        "relayBufferSize": 64 * 1024,
        "relayDataLimit": 4 * 2**30,
        "relayTimeLimit": "1800s",
    }
    assert p2p_options(Relaying()) == {}


def test_no_relay_service_turns_the_service_off_and_sets_no_limits():
    assert daemon_flags(Relaying(service=False)) == {"relayService": False}


def test_limits_are_passed_as_given():
    flags = daemon_flags(Relaying(limits=RelayLimits(max_reservations=3, max_circuits=2, buffer_bytes=1024,
                                                     data_bytes=10, seconds=60)))
    assert (flags["relayMaxReservations"], flags["relayMaxCircuits"], flags["relayBufferSize"],
            flags["relayDataLimit"], flags["relayTimeLimit"]) == (3, 2, 1024, 10, "60s")


def test_a_relayed_node_reserves_on_its_relays_announces_their_circuits_and_relays_for_nobody():
    relaying = Relaying(through=(RELAY, OTHER))
    assert relaying.relayed
    assert daemon_flags(relaying) == {"relayService": False, "relayDiscovery": False,
                                      "trustedRelays": f"{RELAY},{OTHER}"}
    assert p2p_options(relaying) == {
        "use_auto_relay": True,
        "force_reachability": "private",
        "announce_maddrs": [f"{RELAY}/p2p-circuit", f"{OTHER}/p2p-circuit"],
    }


def test_circuit_addresses():
    assert circuit_address(RELAY + "/") == f"{RELAY}/p2p-circuit"
    assert relay_id(f"{RELAY}/p2p-circuit") == "QmRelayOne"
    assert relay_id(f"{RELAY}/p2p-circuit/p2p/QmNode") == "QmRelayOne"
    assert relay_id(RELAY) is None
    assert relay_id("/p2p-circuit/p2p/QmNode") is None  # no relay named
    assert is_circuit(f"{RELAY}/p2p-circuit") and not is_circuit(RELAY)


def test_the_flagged_daemon_gets_the_extra_flags_last_so_they_win():
    flagged = _p2p_with_flags({"relayService": False, "relayDiscovery": False})
    assert issubclass(flagged, P2P)
    args = flagged._make_process_args("p2pd", relay=True, relayService=True)
    assert args == ["p2pd", "-relay=1", "-relayService=0", "-relayDiscovery=0"]
