"""Generation with deep prompts: blocks add them at the right positions, peers take and check them, sessions send
them to every hop that needs them (replays and rollbacks included), receipts commit to them and spot checks re-run
with them.

Blocks and handlers are the real ones on a tiny llama; sessions and checks run over the in-process fake swarm
(tests/unit/fake_swarm.py), whose fake blocks add deep prompts as `swarm.blocks.BlockSpan` does.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from pathlib import Path

import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey

from fake_swarm import HIDDEN as FAKE_HIDDEN
from fake_swarm import FakePeer, FakeSwarm, run_blocks
from handler_kit import HIDDEN, NUM_BLOCKS, FakeContext, Stream, hidden, read_reply
from peers.batching import StepJob, take_decode_batch
from peers.receipts import ReceiptSigner
from reputation.checks import decode_receipt
from reputation.client import ClientTrust
from reputation.node import peer_id_of_key
from reputation.verify import receipt_problem
from swarm import protocol
from swarm.blocks import SpanInput
from swarm.config import ClientConfig
from swarm.errors import BadReceiptError
from swarm.hooks import ClientContext, HopStep, StepRecord
from swarm.network import Identity
from swarm.protocol import SpanRequest, StepRequest, inputs_digest, tensor_digest
from swarm.sequence import RemoteSequence
from swarm.session import InferenceSession
from swarm.transport import Reply
from test_spot_checker import FakeLocalBlocks, check, checker_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ATOL = 1e-5
LENGTH = 5  # deep prompts' length (positions 0..4 get them)
CFG = ClientConfig(initial_peers=(), missing_blocks_timeout=0.0, request_timeout=5.0, check_rate=0.0)


def deep(blocks: int = NUM_BLOCKS, length: int = LENGTH, size: int = HIDDEN, seed: int = 7) -> torch.Tensor:
    return 0.5 * torch.randn(blocks, length, size, generator=torch.Generator().manual_seed(seed))


def whole_run(span, x: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
    """The reference: blocks over the whole sequence at once, the prompts added to its first positions."""
    with torch.no_grad():
        return span.forward_train(x, SpanInput(None, 0), prompts=prompts)


# ---- blocks ---------------------------------------------------------------------------------------------------


def test_a_prefill_with_deep_prompts_equals_the_whole_sequence_run_whole_or_in_chunks(make_span):
    span, x, prompts = make_span(), hidden(2, 9, seed=1), deep()
    reference = whole_run(span, x, prompts)
    whole = span(x, span.new_cache(), SpanInput(None, 0), prompts=prompts)
    torch.testing.assert_close(whole, reference, atol=ATOL, rtol=0)
    # chunks [0:3] [3:4] [4:7] [7:9]: the prompts' length (5) straddles two of them, and the last needs none
    cache, pieces = span.new_cache(), []
    for first, end in ((0, 3), (3, 4), (4, 7), (7, 9)):
        pieces.append(span(x[:, first:end], cache, SpanInput(None, first), prompts=prompts))
    torch.testing.assert_close(torch.cat(pieces, dim=1), reference, atol=ATOL, rtol=0)
    without = whole_run(span, x, None)
    assert (without - reference).abs().max() > 1e-2  # the prompts change the output: this test can fail


# ---- the peer: scheduler and handler ---------------------------------------------------------------------------


def test_a_step_with_deep_prompts_is_never_batched_with_others():
    def job(prompts: torch.Tensor | None = None) -> StepJob:
        return StepJob(torch.zeros(1, 1, 4), None, SpanInput(None, 0), 0, 3, ("s", 0, 0), None, prompts)

    carrying = job(torch.zeros(3, 2, 4))
    queue = deque([job(), carrying, job()])
    assert len(take_decode_batch(queue, max_rows=8, max_steps=8)) == 2
    assert list(queue) == [carrying]
    assert take_decode_batch(queue, max_rows=8, max_steps=8) == [carrying]


def step_request(session: str, position: int, x: torch.Tensor, prompts: torch.Tensor | None, **fields):
    meta = StepRequest(session_id=session, start=0, end=NUM_BLOCKS, position=position, max_length=16,
                       prompts=prompts is not None, **fields)
    return protocol.make_request("", meta, x, *(() if prompts is None else (prompts,)))


@pytest.mark.parametrize("chunk", [512, 2])
def test_a_peer_adds_deep_prompts_in_a_session_and_its_receipt_commits_to_them(make_handler, chunk):
    handler = make_handler(prefill_chunk_tokens=chunk)
    key = RSAPrivateKey()
    handler.receipts = ReceiptSigner(key, peer_id_of_key(key), "tiny@test", "float32", "none")
    x, prompts = hidden(1, 13, seed=2), deep()
    reference = whole_run(handler.span, x, prompts)

    async def run():
        stream = Stream(handler)
        prefill = await stream.send(step_request("s", 0, x[:, :12], prompts))  # more than a decode step's tokens
        decode = await stream.send(step_request("s", 12, x[:, 12:], None))
        return prefill, decode

    (reply, tensors), (decoded, rest) = asyncio.run(run())
    assert reply.error is None and decoded.error is None, (reply.error, decoded.error)
    torch.testing.assert_close(torch.cat([tensors[0], rest[0]], dim=1), reference, atol=ATOL, rtol=0)
    if chunk == 2:
        assert handler.scheduler.stats.prefill_chunks == 6  # 12 tokens in chunks of 2; chunk [4:6] straddles 5
    receipt = decode_receipt(reply.receipt)
    assert receipt.input_digest == inputs_digest(x[:, :12], prompts) != tensor_digest(x[:, :12])
    assert decode_receipt(decoded.receipt).input_digest == tensor_digest(x[:, 12:])  # carried none


def test_a_forward_with_deep_prompts_equals_the_whole_sequence_run(make_handler):
    handler = make_handler()
    x, prompts = hidden(2, 7, seed=3), deep(blocks=2)
    request = protocol.make_request("", SpanRequest(start=1, end=3, prompts=True), x, prompts)
    reply, tensors = read_reply(asyncio.run(handler.rpc_forward(request, FakeContext())))
    assert reply.error is None, reply.error
    with torch.no_grad():
        expected = handler.span.forward_train(x, SpanInput(None, 0), 1, 3, prompts)
    torch.testing.assert_close(tensors[0], expected, atol=ATOL, rtol=0)


BAD_PROMPTS = {
    "too few blocks": lambda: deep(blocks=NUM_BLOCKS - 1),
    "other width": lambda: deep(size=HIDDEN + 1),
    "integers": lambda: deep().to(torch.int64),
    "not finite": lambda: deep().index_put_((torch.tensor(0), torch.tensor(1), torch.tensor(2)), torch.tensor(float("nan"))),
    "too long": lambda: deep(length=513),
    "two dimensions": lambda: deep()[0],
}


@pytest.mark.parametrize("case", sorted(BAD_PROMPTS))
def test_malformed_deep_prompts_are_a_bad_request_and_the_session_goes_on(make_handler, case):
    handler = make_handler()
    x = hidden(1, 6, seed=4)

    async def run():
        stream = Stream(handler)
        refused = await stream.send(step_request("s", 0, x, BAD_PROMPTS[case]()))
        served = await stream.send(step_request("s", 0, x, deep()))  # the same stream and session id, fine now
        return refused, served

    (refused, _), (served, tensors) = asyncio.run(run())
    assert refused.error is not None and refused.error.kind == "bad_request", refused.error
    assert served.error is None, served.error
    torch.testing.assert_close(tensors[0], whole_run(handler.span, x, deep()), atol=ATOL, rtol=0)


def test_prompts_past_their_length_missing_or_on_a_pushed_step_are_bad_requests(make_handler):
    handler = make_handler()
    x = hidden(1, 6, seed=5)

    async def run():
        stream = Stream(handler)
        opened = await stream.send(step_request("s", 0, x, deep()))
        late = await stream.send(step_request("s", 6, x[:, :1], deep()))  # position 6 >= length 5
        meta = StepRequest(session_id="s", start=0, end=NUM_BLOCKS, position=6, max_length=16, prompts=True)
        missing = await stream.send(protocol.make_request("", meta, x[:, :1]))
        pushed_meta = meta.model_copy(update={"position": 0, "pushed": True, "push_from": "QmX"})
        pushed = await stream.send(protocol.make_request("", pushed_meta, deep()))
        goes_on = await stream.send(step_request("s", 6, x[:, :1], None))
        return opened, late, missing, pushed, goes_on

    opened, late, missing, pushed, goes_on = (reply for reply, _ in asyncio.run(run()))
    assert opened.error is None and goes_on.error is None and goes_on.length == 7
    for reply in (late, missing, pushed):
        assert reply.error is not None and reply.error.kind == "bad_request", reply.error
    assert "position 6" in late.error.message and "pushed" in pushed.error.message


# ---- sessions over the fake swarm ----------------------------------------------------------------------------


PROMPT = torch.randn(1, 7, FAKE_HIDDEN, generator=torch.Generator().manual_seed(0))
DEEP = 0.5 * torch.randn(6, LENGTH, FAKE_HIDDEN, generator=torch.Generator().manual_seed(1))


def session_over(swarm: FakeSwarm, push: bool = False, trust: bool = False) -> tuple[InferenceSession, ClientTrust | None]:
    sequence = RemoteSequence(swarm, swarm, "fake", 6, CFG)
    if not trust:
        return InferenceSession(sequence, swarm, 64, push=push, deep_prompts=DEEP), None
    identity = Identity(Path("/nonexistent"), RSAPrivateKey(), temporary=True)
    layer = ClientTrust(ClientContext(swarm, sequence, identity, None, None, CFG))
    layer.checker.rng = random.Random(0)
    sequence.use_trust(layer.trust)
    return InferenceSession(sequence, swarm, 64, layer.observer, layer.verifier, push=push, deep_prompts=DEEP), layer


def recording(session: InferenceSession) -> list[torch.Tensor]:
    """Every step's output from now on, in order."""
    outputs, original = [], session.step

    async def recorded(*args, **kwargs):
        result = await original(*args, **kwargs)
        outputs.append(result.hidden)
        return result

    session.step = recorded
    return outputs


def decode(session: InferenceSession, steps: int, rollback_to: int | None = None) -> torch.Tensor:
    """The prompt, then `steps` single tokens (each the last output); optionally rolled back to `rollback_to` and
    stepped once more from there. Returns every token's input, as the whole sequence the blocks saw."""
    async def scenario() -> torch.Tensor:
        inputs, fed = PROMPT, []
        for _ in range(steps + 1):
            output = (await session.step(inputs)).hidden
            fed.append(inputs)
            inputs = output[:, -1:]
        if rollback_to is not None:
            kept = torch.cat(fed, dim=1)[:, :rollback_to]
            redo = torch.cat(fed, dim=1)[:, rollback_to:]
            output = (await session.step(redo, position=rollback_to)).hidden
            fed = [kept, redo]
            assert_equals_reference(torch.cat(fed, dim=1), output)
        await session.close()
        return torch.cat(fed, dim=1)

    return asyncio.run(scenario())


def assert_equals_reference(sequence: torch.Tensor, last_output: torch.Tensor) -> None:
    expected = run_blocks(0, 6, sequence, prompts=DEEP)[:, -last_output.shape[1]:]
    torch.testing.assert_close(last_output, expected, atol=1e-6, rtol=0)


def test_a_session_sends_each_hop_its_prompts_on_the_prefill_only_and_matches_the_reference():
    swarm = FakeSwarm(FakePeer("a", 0, 2), FakePeer("b", 2, 6))
    session, _ = session_over(swarm)
    outputs = recording(session)
    sequence = decode(session, steps=3)
    assert_equals_reference(sequence, outputs[-1])
    assert_equals_reference(sequence[:, :PROMPT.shape[1]], outputs[0])
    assert [swarm.by_name(n).prompt_steps for n in "ab"] == [1, 1]


def test_a_rollback_below_the_prompts_length_sends_them_again():
    swarm = FakeSwarm(FakePeer("a", 0, 3), FakePeer("b", 3, 6))
    session, _ = session_over(swarm)
    decode(session, steps=2, rollback_to=3)  # asserts the redone step against the reference
    assert [swarm.by_name(n).prompt_steps for n in "ab"] == [2, 2]


def test_a_replacement_peer_with_other_span_boundaries_gets_its_own_prompts_in_the_replay():
    swarm = FakeSwarm(FakePeer("a", 0, 3, fail_after=2), FakePeer("b", 3, 6),
                      FakePeer("c", 0, 2, throughput=10.0), FakePeer("d", 2, 3, throughput=10.0))
    session, _ = session_over(swarm)
    outputs = recording(session)
    sequence = decode(session, steps=3)
    assert len(session.failovers) == 1 and session.failovers[0].blocks == (0, 3)
    assert sorted(session.failovers[0].replacement) == sorted(str(swarm.by_name(n).peer_id) for n in "cd")
    assert [swarm.by_name(n).prompt_steps for n in "cd"] == [1, 1]  # the replay carried their own blocks' prompts
    assert_equals_reference(sequence, outputs[-1])


def test_decode_steps_after_the_prompts_still_push_and_receipts_verify_with_prompts():
    swarm = FakeSwarm(*(FakePeer(n, s, e, sign=True) for n, s, e in (("a", 0, 2), ("b", 2, 4), ("c", 4, 6))))
    session, layer = session_over(swarm, push=True, trust=True)
    outputs = recording(session)
    sequence = decode(session, steps=3)
    assert_equals_reference(sequence, outputs[-1])
    assert session.pushed_steps == 3 and session.push_fallbacks == 0  # every decode step (none carried prompts)
    assert layer.checker.stats.bad_receipts == 0


def test_a_receipt_that_leaves_the_prompts_out_is_refused():
    peer = FakePeer("a", 0, 3, sign=True)
    x = torch.randn(1, 6, FAKE_HIDDEN)
    meta = StepRequest(session_id="s", start=0, end=3, position=0, max_length=16, prompts=True)
    sent = HopStep(peer.peer_id, meta, 0, 6, DEEP[:3])
    output = run_blocks(0, 3, x, prompts=DEEP[:3])
    assert receipt_problem(peer.receipt(x, output, 0, 3, "s", 0, 6, prompts=DEEP[:3]), sent, x, output) is None
    problem = receipt_problem(peer.receipt(x, output, 0, 3, "s", 0, 6), sent, x, output)
    assert problem is not None and "deep prompts" in problem
    assert receipt_problem(peer.receipt(x, output, 0, 3, "s", 0, 6, prompts=DEEP[:3] + 1), sent, x, output)
    _, layer = session_over(FakeSwarm(peer), trust=True)
    with pytest.raises(BadReceiptError):  # the client's verifier refuses it too
        layer.verifier.verify(sent, x, Reply(output, peer.receipt(x, output, 0, 3, "s", 0, 6)))


# ---- spot checks -----------------------------------------------------------------------------------------------


def deep_session_step(swarm: FakeSwarm, subject: FakePeer, chunks: tuple[int, ...] = (7, 1, 1)) -> StepRecord:
    """The last step of a deep-prompt session on `subject` alone, as the session's observer sees it: the prefill
    carried the prompts of its blocks, the later steps none."""
    prompts = DEEP[subject.start : subject.end]
    stream = swarm.open_stream(subject.peer_id)
    g = torch.Generator().manual_seed(3)
    history, position = [], 0
    for size in chunks:
        inputs = torch.randn(1, size, FAKE_HIDDEN, generator=g)
        carried = prompts if position < LENGTH else None
        meta = StepRequest(session_id="d", start=subject.start, end=subject.end, position=position,
                           max_length=sum(chunks), prompts=carried is not None)
        reply = asyncio.run(stream.step(meta, inputs, prompts=carried))
        history.append(inputs)
        position += size
    return StepRecord("d", subject.peer_id, subject.start, subject.end, position - size, inputs, reply.output,
                      tuple(history), False, reply.receipt, prompts=prompts)


@pytest.mark.parametrize("chunks", [(7,), (7, 1, 1)])
def test_spot_checks_rerun_deep_prompt_sessions_and_catch_a_peer_that_ignores_the_prompts(chunks):
    swarm = FakeSwarm(*(FakePeer(n, 0, 3, sign=True) for n in ("checker", "ref1", "ref2")),
                      FakePeer("honest", 0, 3, sign=True), FakePeer("dropper", 0, 3, sign=True, ignore_prompts=True))
    checker, node = checker_for(swarm)
    assert check(checker, deep_session_step(swarm, swarm.by_name("honest"), chunks)) == "pass"
    checker_peer = swarm.by_name("checker")
    assert checker_peer.prompt_steps + swarm.by_name("ref1").prompt_steps >= 1  # the re-run carried the prompts
    assert check(checker, deep_session_step(swarm, swarm.by_name("dropper"), chunks)) == "fail"
    node.refresh(force=True)
    assert node.is_blacklisted(str(swarm.by_name("dropper").peer_id))
    assert not node.is_blacklisted(str(swarm.by_name("honest").peer_id))


def test_a_long_deep_prompt_history_is_rechecked_in_chunks_with_its_prompts():
    swarm = FakeSwarm(*(FakePeer(n, 0, 3, sign=True) for n in ("checker", "ref1", "ref2", "honest")))
    checker, node = checker_for(swarm)
    checker.chunk_bytes = 3 * FAKE_HIDDEN * 4  # 3 tokens a message: the prompts' length straddles two of them
    assert check(checker, deep_session_step(swarm, swarm.by_name("honest"), (7, 1, 1))) == "pass"
    assert checker.stats.chunked == 1
    # the checker's receipt (of its last message, which carried no prompts) matched too: both earn a pass
    assert sorted(row.passes for row in node.standings() if row.passes) == [1, 1]


@pytest.mark.parametrize("ignore, outcome", [(False, "pass"), (True, "fail")])
def test_a_local_check_of_a_deep_prompt_session_adds_the_prompts(ignore, outcome):
    swarm = FakeSwarm(FakePeer("alone", 0, 3, sign=True, ignore_prompts=ignore), FakePeer("elsewhere", 3, 6, sign=True))
    checker, _ = checker_for(swarm)
    checker.local = FakeLocalBlocks(budget_blocks=3)
    assert check(checker, deep_session_step(swarm, swarm.by_name("alone"))) == outcome
    assert checker.stats.local == 1
