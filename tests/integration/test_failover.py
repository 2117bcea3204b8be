"""Peers vanish mid-session, refuse over-limit work, serve many clients: sessions survive all of it."""

from __future__ import annotations

import signal
import threading
import time

import psutil
import pytest
import torch

from peers.local import LocalSwarm
from swarm import DistributedModelForCausalLM
from swarm.models import DEFAULT_MODEL
from swarm.protocol import StepRequest
from swarm.remote import InferenceStream, call_info

pytestmark = pytest.mark.slow


class KillAfter:
    """A streamer that SIGKILLs the peer serving `block` once `tokens` new tokens have arrived."""

    def __init__(self, swarm: LocalSwarm, session, block: int, tokens: int):
        self.swarm, self.session, self.block, self.tokens = swarm, session, block, tokens
        self.seen, self.killed = -1, None

    def put(self, value) -> None:
        self.seen += 1  # the first call carries the prompt
        if self.seen == self.tokens:
            hop = next(h for h in self.session.route if h.start <= self.block < h.end)
            victim = next(p for p in self.swarm.processes if p.peer_id == str(hop.peer_id))
            victim.kill_group()
            self.killed = victim.peer_id

    def end(self) -> None:
        pass


@pytest.fixture(scope="module")
def redundant_swarm():
    """Two peers for blocks 10:20, one each for 0:10 and 20:30."""
    with LocalSwarm(model=DEFAULT_MODEL) as swarm:
        peers = [swarm.add_peer(b, wait=False, name=n) for b, n in
                 (("0:10", "a"), ("10:20", "b1"), ("10:20", "b2"), ("20:30", "c"))]
        for peer in peers:
            swarm.wait_online(peer)
        yield swarm


def test_sigkill_mid_generation_is_survived_with_identical_tokens(redundant_swarm, local_model, chat_ids):
    expected = local_model.generate(chat_ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)
    model = DistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, [redundant_swarm.initial_peers])
    try:
        with model.inference_session(max_length=chat_ids.shape[1] + 64) as session:
            killer = KillAfter(redundant_swarm, session, block=15, tokens=20)
            produced = model.generate(chat_ids, max_new_tokens=64, min_new_tokens=64, session=session,
                                      streamer=killer)
            events = list(session.inner.failovers)
            route = session.route
    finally:
        model.shutdown()
    assert killer.killed is not None
    assert produced.tolist() == expected.tolist()
    assert [e.peer_id for e in events] == [killer.killed]
    assert events[0].blocks == (10, 20) and events[0].replacement and events[0].replacement[0] != killer.killed
    assert [(h.start, h.end) for h in route] == [(0, 10), (10, 20), (20, 30)]


def test_concurrent_sessions_match_solo_runs(client, tokenizer):
    prompts = [f"Write one sentence about the number {n}." for n in range(8)]
    encoded = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"] for p in prompts]
    solo = [client.generate(ids, max_new_tokens=12).tolist() for ids in encoded]
    together: list = [None] * len(encoded)
    # A stuck client: it opens a session on every peer of the route, then never sends another step.
    stuck = client.inference_session(max_length=64)
    stuck.step(client.head.embed(encoded[0]))

    def run(i: int) -> None:
        together[i] = client.generate(encoded[i], max_new_tokens=12).tolist()

    bundled_before = client.transport.bundled_steps
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(encoded))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    stuck.close()
    assert together == solo
    assert client.transport.bundled_steps > bundled_before  # their steps went to the peers in bundles


def test_concurrent_bundled_sessions_survive_a_sigkill_with_identical_tokens(redundant_swarm, local_model, tokenizer):
    questions = ["What is the capital of France?", "Name three colours.", "What is 2 plus 2?"]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"] for q in questions]
    expected = [local_model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False).tolist()
                for ids in prompts]
    redundant_swarm.add_peer("10:20", name="b3")  # a spare, whatever earlier tests killed
    model = DistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, [redundant_swarm.initial_peers])
    produced: list = [None] * len(prompts)
    try:
        sessions = [model.inference_session(max_length=ids.shape[1] + 32) for ids in prompts]
        killer = KillAfter(redundant_swarm, sessions[0], block=15, tokens=12)

        def run(i: int) -> None:
            produced[i] = model.generate(prompts[i], max_new_tokens=32, min_new_tokens=32, session=sessions[i],
                                         streamer=killer if i == 0 else None).tolist()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        failovers = [event for session in sessions for event in session.inner.failovers]
        bundled = model.transport.bundled_steps
        for session in sessions:
            session.close()
    finally:
        model.shutdown()
    assert killer.killed is not None and bundled > 0
    assert produced == expected  # no session lost, no token changed
    assert {event.peer_id for event in failovers} == {killer.killed}


@pytest.fixture(scope="module")
def limited_swarm():
    """Two full-model peers: `small` takes one session at a time, `roomy` takes many."""
    with LocalSwarm(model=DEFAULT_MODEL) as swarm:
        small = swarm.add_peer("0:30", "--max-sessions", "1", "--session-idle-timeout", "5", wait=False, name="small")
        roomy = swarm.add_peer("0:30", wait=False, name="roomy")
        for peer in (small, roomy):
            swarm.wait_online(peer)
        yield swarm, small, roomy


def test_busy_peer_refuses_with_a_typed_error_and_the_client_goes_elsewhere(limited_swarm, chat_ids):
    swarm, small, roomy = limited_swarm
    model = DistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, [swarm.initial_peers])
    try:
        small_id = next(s.peer_id for s in model.loop.run(model.sequence.refresh_spans()) if str(s.peer_id) == small.peer_id)
        roomy_id = next(s.peer_id for s in model.sequence.spans if str(s.peer_id) == roomy.peer_id)

        async def occupy_and_steer():
            holder = InferenceStream(model.p2p, small_id)  # another client takes small's only slot
            await holder.step(StepRequest(session_id="holder", start=0, end=30, position=0, max_length=8),
                              torch.zeros(1, 1, 576))
            await model.sequence.probe.ping_all([s.peer_id for s in model.sequence.spans], force=True)
            model.sequence.probe.latencies[roomy_id].rtt = 5.0  # make `small` the cheaper route
            return holder

        holder = model.loop.run(occupy_and_steer())
        with model.inference_session(max_length=64) as session:
            model.generate(chat_ids, max_new_tokens=4, session=session)
            events = list(session.inner.failovers)
            route = session.route
        model.loop.run(holder.close())
    finally:
        model.shutdown()
    assert [e.peer_id for e in events] == [small.peer_id]
    assert events[0].reason.startswith("busy: this peer already serves its maximum of 1 sessions")
    assert [str(h.peer_id) for h in route] == [roomy.peer_id]


def test_idle_sessions_are_freed_and_resumed_by_replay(limited_swarm, local_model, chat_ids):
    swarm, small, _ = limited_swarm
    model = DistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, [swarm.initial_peers])
    try:
        small_id = next(s.peer_id for s in model.loop.run(model.sequence.refresh_spans()) if str(s.peer_id) == small.peer_id)
        model.sequence.cooldowns.clear()
        for other in model.sequence.spans:
            if other.peer_id != small_id:
                model.sequence.ban(other.peer_id)  # route through `small`, whose idle timeout is 5 s
        with model.inference_session(max_length=128) as session:
            first = model.generate(chat_ids, max_new_tokens=8, min_new_tokens=8, session=session)
            time.sleep(12)  # > idle timeout + the peer's 5 s sweep
            second = model.generate(first[:, -1:], max_new_tokens=8, min_new_tokens=8, session=session)
            events = list(session.inner.failovers)
        full = torch.cat([first, second[:, 1:]], dim=1)
    finally:
        model.shutdown()
    assert "Freed 1 idle session(s)" in small.log()
    assert [e.reason.split(":")[0] for e in events] == ["unknown_session"]
    expected = local_model.generate(chat_ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert full.tolist() == expected.tolist()


def test_peer_memory_returns_to_idle_after_sessions_end(limited_swarm):
    swarm, _, roomy = limited_swarm
    process = psutil.Process(roomy.process.pid)
    model = DistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, [swarm.initial_peers])
    try:
        roomy_id = next(s.peer_id for s in model.loop.run(model.sequence.refresh_spans()) if str(s.peer_id) == roomy.peer_id)
        idle = process.memory_info().rss

        async def fill_caches(count: int) -> list[InferenceStream]:
            streams = []
            for i in range(count):
                stream = InferenceStream(model.p2p, roomy_id)
                await stream.step(StepRequest(session_id=f"big{i}", start=0, end=30, position=0, max_length=1024),
                                  torch.randn(2, 600, 576), timeout=300)
                streams.append(stream)
            return streams

        streams = model.loop.run(fill_caches(3), timeout=600)
        busy = process.memory_info().rss
        for stream in streams:
            model.loop.run(stream.close())
        time.sleep(2)
        after = process.memory_info().rss
        info, _ = model.loop.run(call_info(model.p2p, roomy_id))
    finally:
        model.shutdown()
    kv_bytes = 3 * 30 * 2 * 600 * 2 * 3 * 64 * 4  # sessions x blocks x batch x tokens x (k, v) x heads x dim x fp32
    print(f"peer RSS: idle {idle / 2**20:.0f} MiB, with 3 sessions {busy / 2**20:.0f} MiB "
          f"(KV caches {kv_bytes / 2**20:.0f} MiB), after they ended {after / 2**20:.0f} MiB")
    assert busy - idle > 0.8 * kv_bytes
    assert info.sessions == 0
    assert after - idle < 0.25 * (busy - idle)


def test_restart_with_the_same_identity_keeps_the_peer_id(tmp_path):
    identity = tmp_path / "peer.id"
    with LocalSwarm(model=DEFAULT_MODEL) as swarm:
        first = swarm.add_peer("0:5", "--identity", str(identity), name="first")
        first.signal(signal.SIGINT)
        assert first.process.wait(timeout=60) == 0
        second = swarm.add_peer("0:5", "--identity", str(identity), name="second")
        assert second.peer_id == first.peer_id
