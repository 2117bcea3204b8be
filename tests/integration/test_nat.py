"""A peer behind a real NAT (Linux network namespaces, peers.natlab) serves the swarm through relays.

    outside: bootstrap nodes `boot` and `relay2` (both relay), peer `outside` (blocks 0:15, relays too), the client
    home (behind a MASQUERADE router, nothing forwarded in): peer `home` (15:30, relays auto),
                                                            peer `hidden` (15:30, --relay never)

Needs root, `ip` and `iptables`; elsewhere the module is skipped with one line saying why.
"""

from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from peers import natlab
from peers.local import LocalSwarm, PeerProcess
from swarm import DistributedModelForCausalLM
from swarm.models import DEFAULT_MODEL

pytestmark = [pytest.mark.slow, pytest.mark.netns]

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def lab():
    reason = natlab.unavailable()
    if reason is not None:
        pytest.skip(f"NAT tests need network namespaces: {reason}")
    with natlab.NatLab() as built:
        yield built


@pytest.fixture(scope="module")
def nat_swarm(lab):
    with LocalSwarm(model=DEFAULT_MODEL, host="0.0.0.0", launcher=tuple(lab.command(lab.outside))) as swarm:
        boot = swarm.processes[0]
        relay2 = swarm.add_bootstrap("relay2", "--initial-peers", swarm.initial_peers)
        swarm.initial_peers += "," + relay2.addresses
        home_ns = lab.command(lab.home)
        peers = [swarm.add_peer("0:15", name="outside", wait=False),
                 swarm.add_peer("15:30", "--relay-renew-period", "2", name="home", wait=False, launcher=home_ns),
                 swarm.add_peer("15:30", "--relay", "never", name="hidden", wait=False, launcher=home_ns)]
        for peer in peers:
            swarm.wait_online(peer)
        yield SimpleNamespace(swarm=swarm, lab=lab, boot=boot, relay2=relay2, outside=peers[0], home=peers[1],
                              hidden=peers[2])


@pytest.fixture(scope="module")
def client(nat_swarm):
    """A client in the outside namespace (its DHT process and p2p daemon run there)."""
    model = natlab.call_in_namespace(nat_swarm.lab.outside, lambda: DistributedModelForCausalLM.from_pretrained(
        DEFAULT_MODEL, [nat_swarm.swarm.initial_peers], spot_checks=False))
    yield model
    model.shutdown()


def relay_in_use(client: DistributedModelForCausalLM, peer_id: str) -> str | None:
    """The relay the client reaches `peer_id` through now (None: it dials the peer directly)."""
    relays = client.transport.relays(next(s.peer_id for s in client.sequence.spans if str(s.peer_id) == peer_id))
    return str(relays[0]) if relays else None


def greedy(local_model, chat_ids):
    return local_model.generate(chat_ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


def test_a_peer_behind_nat_serves_through_a_relay_token_for_token(nat_swarm, client, local_model, chat_ids):
    with client.inference_session(max_length=chat_ids.shape[1] + NEW_TOKENS) as session:
        produced = client.generate(chat_ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, session=session)
        route = [str(h.peer_id) for h in session.route]
    assert produced.tolist() == greedy(local_model, chat_ids).tolist()
    assert route == [nat_swarm.outside.peer_id, nat_swarm.home.peer_id]
    assert relay_in_use(client, nat_swarm.home.peer_id) == nat_swarm.boot.peer_id
    assert (f"Reachable only through relay {nat_swarm.boot.peer_id}, {nat_swarm.relay2.peer_id} "
            "(nobody could dial it directly: NAT or firewall)") in nat_swarm.home.log()


def test_with_relays_off_the_swarm_reports_it_unreachable_and_routes_elsewhere(nat_swarm, client, local_model, chat_ids):
    hidden = nat_swarm.hidden
    assert "Not reachable: no helper could dial this peer and --relay never is set" in hidden.log()
    status = subprocess.run(
        nat_swarm.lab.command(nat_swarm.lab.outside, [sys.executable, "-m", "peers.cli", "status", "--model",
                                                      DEFAULT_MODEL, "--initial-peers", nat_swarm.swarm.initial_peers]),
        capture_output=True, text=True, timeout=120,
    )
    assert status.returncode == 0, status.stderr
    rows = {line.split()[1]: line for line in status.stdout.splitlines() if line[:1].isdigit()}
    assert "unreachable" in rows[hidden.peer_id] and "none (NAT, no relay)" in rows[hidden.peer_id]
    assert f"relay {nat_swarm.boot.peer_id},{nat_swarm.relay2.peer_id}" in rows[nat_swarm.home.peer_id]
    assert "direct" in rows[nat_swarm.outside.peer_id]
    assert (f"UNREACHABLE: peer {hidden.peer_id} (blocks 15:30) cannot be dialled and uses no relay "
            "(behind NAT with --relay never); clients cannot use its blocks") in status.stdout
    assert "All 30 blocks are served." in status.stdout
    with client.inference_session(max_length=chat_ids.shape[1] + NEW_TOKENS) as session:
        produced = client.generate(chat_ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, session=session)
        route = [str(h.peer_id) for h in session.route]
    assert hidden.peer_id not in route and route[-1] == nat_swarm.home.peer_id
    assert produced.tolist() == greedy(local_model, chat_ids).tolist()


class KillRelayAfter:
    """A streamer that SIGKILLs the relay of the client's connection to `peer_id` once `tokens` tokens arrived."""

    def __init__(self, client, relays: dict[str, PeerProcess], peer_id: str, tokens: int):
        self.client, self.relays, self.peer_id, self.tokens = client, relays, peer_id, tokens
        self.seen, self.killed = -1, None

    def put(self, value) -> None:
        self.seen += 1  # the first call carries the prompt
        if self.seen == self.tokens:
            self.killed = relay_in_use(self.client, self.peer_id)
            self.relays[self.killed].kill_group()

    def end(self) -> None:
        pass


def test_a_relay_killed_mid_generation_fails_over_to_the_other_relay_with_the_same_tokens(
        nat_swarm, client, local_model, chat_ids):
    relays = {nat_swarm.boot.peer_id: nat_swarm.boot, nat_swarm.relay2.peer_id: nat_swarm.relay2}
    home = nat_swarm.home.peer_id
    with client.inference_session(max_length=chat_ids.shape[1] + NEW_TOKENS) as session:
        killer = KillRelayAfter(client, relays, home, tokens=4)
        began = time.perf_counter()
        produced = client.generate(chat_ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, session=session,
                                   streamer=killer)
        seconds = time.perf_counter() - began
        events = list(session.inner.failovers)
        route = [str(h.peer_id) for h in session.route]
    assert killer.killed in relays
    assert produced.tolist() == greedy(local_model, chat_ids).tolist()
    assert [(e.peer_id, e.replacement) for e in events] == [(home, [home])]
    assert route == [nat_swarm.outside.peer_id, home]
    survivor = next(r for r in relays if r != killer.killed)
    assert relay_in_use(client, home) == survivor
    print(f"relay {killer.killed} killed after 4 tokens; fail-over took {events[0].seconds:.2f} s, "
          f"{NEW_TOKENS} tokens in {seconds:.1f} s")
    # the peer replaces the relay that went away (it renews every 2 s here; a relay missing two is replaced)
    replaced = (f"Reachable only through relay {survivor}, {nat_swarm.outside.peer_id} now "
                f"(relay {killer.killed} went away)")
    deadline = time.monotonic() + 60
    while replaced not in nat_swarm.home.log() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert replaced in nat_swarm.home.log()
