"""Misbehaving handlers (peers.testing.adversaries, for tests of the trust layer and of clients), the live
checker's pure helpers, and the rule that production code never imports the testing package."""

from __future__ import annotations

import ast
import asyncio

from swarm.transport import Reply
import random
from pathlib import Path

import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.crypto import RSAPrivateKey
from torch import nn

from handler_kit import NUM_BLOCKS, Stream, forward, hidden
from peers.handler import BlockHandler
from peers.receipts import ReceiptSigner
from peers.testing.adversaries import (
    ADVERSARIES,
    CheapQuant,
    Cheater,
    Colluder,
    JunkInfo,
    NaNOutput,
    NoisyOutput,
    PaddedOnly,
    RandomOutput,
    SkipBlocks,
    SteeringHead,
    Steer,
    Sybil,
    WrongShape,
    fake_quantise_,
    parse_adversary,
)
from reputation.attest import Check, tensor_digest
from reputation.checks import decode_receipt, profile_between
from reputation.node import peer_id_of_key
from reputation.tolerance import compare_updates, judge, profile_for
from reputation.verify import receipt_problem
from swarm import protocol
from swarm.blocks import SpanInput
from swarm.errors import ConfigError
from swarm.hooks import HopStep
from swarm.protocol import ProtocolError, StepRequest
from swarm.records import PeerSpan, ServerInfo, ServerState

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[2]


def imported_modules(nodes) -> set[str]:
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_production_code_never_imports_the_testing_package() -> None:
    """Only the CLI may, and only inside the command that got the hidden --adversary option."""
    offenders = []
    for package in ("peers", "swarm", "reputation", "apps"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.is_relative_to(ROOT / "peers" / "testing"):
                continue
            tree = ast.parse(path.read_text())
            nodes = tree.body if path == ROOT / "peers" / "cli.py" else ast.walk(tree)
            if any(name.split(".")[:2] == ["peers", "testing"] for name in imported_modules(nodes)):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
    cli = ast.parse((ROOT / "peers" / "cli.py").read_text())
    assert "peers.testing.adversaries" in imported_modules(ast.walk(cli))  # lazily, inside `join`


def test_parse_adversary() -> None:
    assert parse_adversary("random") is RandomOutput
    assert {mode: parse_adversary(mode) for mode in ("skip", "noise", "cheap-quant", "junk-info", "nan", "wrong-shape",
                                                     "padded-only", "sybil")} \
        == {"skip": SkipBlocks, "noise": NoisyOutput, "cheap-quant": CheapQuant, "junk-info": JunkInfo,
            "nan": NaNOutput, "wrong-shape": WrongShape, "padded-only": PaddedOnly, "sybil": Sybil}
    cheat = parse_adversary("cheat:0.1", ("x",))
    assert (cheat.func, cheat.keywords) == (Cheater, {"fraction": 0.1})
    collude = parse_adversary("collude", ("x", "y"))
    assert (collude.func, collude.keywords) == (Colluder, {"fellows": ("x", "y")})
    assert all(issubclass(cls, BlockHandler) for cls in ADVERSARIES.values())
    steer = parse_adversary("steer")
    assert (steer.func, steer.keywords["rel_l2"]) == (Steer, 0.075)
    assert parse_adversary("steer:0.02").keywords["rel_l2"] == 0.02
    for bad in ("evil", "cheat", "cheat:2", "cheat:0", "cheat:abc", "random:1", "collude:x", "steer:0", "steer:x"):
        with pytest.raises(ConfigError):
            parse_adversary(bad)


def test_each_corrupting_mode_fails_the_tolerance_and_honest_passes(make_handler) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 6, 64)
    honest = x + 0.5 * torch.randn(1, 6, 64)
    fp32 = profile_for("float32")
    assert judge(compare_updates(x, honest, honest.clone()), fp32) == "pass"
    for cls in (RandomOutput, SkipBlocks, NoisyOutput):
        bad = make_handler(cls).transform_output(x, honest)
        assert judge(compare_updates(x, honest, bad), fp32) == "fail", cls.mode
    cheater = make_handler(lambda *args: Cheater(*args, fraction=0.1, rng=random.Random(0)))
    outputs = [cheater.transform_output(x, honest) for _ in range(200)]
    skipped = sum(torch.equal(out, x) for out in outputs)
    assert 5 <= skipped <= 40  # about 10% of 200
    assert all(torch.equal(out, honest) or torch.equal(out, x) for out in outputs)


def test_cheaters_advertise_ten_times_their_throughput_but_the_colluder_does_not(make_handler) -> None:
    for mode in ADVERSARIES:
        handler = make_handler(parse_adversary("cheat:0.5" if mode == "cheat" else mode), throughput=7.0)
        expected = 7.0 if mode == "collude" else 70.0
        assert handler.advertised_throughput() == expected and handler.info().throughput == expected, mode
        handler.replace_span(handler.span, throughput=3.0)
        assert handler.advertised_throughput() == expected * 3 / 7, mode
    assert make_handler(throughput=7.0).info().throughput == 7.0


def honest_output(handler: BlockHandler, x: torch.Tensor) -> torch.Tensor:
    return handler.span(x, None, SpanInput(None, 0))


def test_output_transformations_on_a_tiny_span(make_handler) -> None:
    x = hidden(2, 5)
    honest = honest_output(make_handler(), x)

    def served(factory) -> torch.Tensor:
        reply, tensors = forward(make_handler(factory), x)
        assert reply.error is None
        return tensors[0]

    torch.testing.assert_close(served(BlockHandler), honest)
    torch.testing.assert_close(served(SkipBlocks), x)
    random_out = served(RandomOutput)
    assert random_out.shape == honest.shape and not torch.allclose(random_out, honest, atol=1e-2)
    assert 0.5 < float(random_out.std() / honest.std()) < 2.0
    noisy = served(NoisyOutput)
    assert noisy.shape == honest.shape and not torch.allclose(noisy, honest, atol=1e-3)
    assert float((noisy - honest).norm() / (honest - x).norm()) < 1.5  # noise on the update's scale
    torch.testing.assert_close(served(parse_adversary("cheat:1")), x)
    torch.testing.assert_close(served(lambda *args: Cheater(*args, fraction=1e-9)), honest)
    nan = served(NaNOutput)
    assert nan[..., 0].isnan().all() and not nan[..., 1:].isnan().any()
    torch.testing.assert_close(nan[..., 1:], honest[..., 1:])
    short = served(WrongShape)
    assert short.shape == (2, 4, 64)
    torch.testing.assert_close(short, honest[:, :4])
    torch.testing.assert_close(served(JunkInfo), honest)
    torch.testing.assert_close(served(parse_adversary("collude")), honest)


def test_padded_only_corrupts_only_padded_batches(make_handler) -> None:
    x = hidden(2, 5)
    honest = honest_output(make_handler(), x)
    handler = make_handler(PaddedOnly)
    reply, (plain,) = forward(handler, x)
    torch.testing.assert_close(plain, honest)
    all_ones = torch.ones(2, 5, dtype=torch.int64)
    _, (unpadded,) = forward(handler, x, request=protocol.make_request("", protocol.SpanRequest(start=0, end=NUM_BLOCKS), x, all_ones))
    torch.testing.assert_close(unpadded, honest)
    padding = all_ones.clone()
    padding[1, :2] = 0
    padded_honest = make_handler().span(x, None, SpanInput(padding, 0))
    _, (padded,) = forward(handler, x, request=protocol.make_request("", protocol.SpanRequest(start=0, end=NUM_BLOCKS), x, padding))
    assert not torch.allclose(padded, padded_honest, atol=1e-2)

    async def steps():  # in a session, the padded prefill and every step after it
        stream = Stream(handler)
        first = await stream.step("s", 0, x, padding)
        second = await stream.step("s", 5, hidden(2, 1, seed=1))
        await stream.close()
        return first, second

    (reply, (out,)), (reply2, (out2,)) = asyncio.run(steps())
    assert reply.error is None and not torch.allclose(out, padded_honest, atol=1e-2)
    assert reply2.error is None and out2.shape == (2, 1, 64)


def test_sybil_identities_agree_with_each_other_and_fail_the_tolerance(make_handler) -> None:
    x = hidden(1, 6)
    honest = honest_output(make_handler(), x)
    one, two = forward(make_handler(Sybil), x)[1][0], forward(make_handler(Sybil), x)[1][0]
    torch.testing.assert_close(one, two)  # two identities, one wrong answer
    assert judge(compare_updates(x, honest, one), profile_for("float32")) == "fail"
    rel = float((one - honest).norm(dim=-1).div((honest - x).norm(dim=-1)).mean())
    assert 0.9 < rel < 1.1  # as large as the blocks' update


def test_wrong_shape_and_nan_in_inference_steps(make_handler) -> None:
    async def scenario(handler):
        stream = Stream(handler)
        reply, (out,) = await stream.step("s", 0, hidden(1, 3))
        await stream.close()
        return reply, out

    reply, out = asyncio.run(scenario(make_handler(WrongShape)))
    assert reply.error is None and reply.length == 3 and out.shape == (1, 2, 64)
    reply, out = asyncio.run(scenario(make_handler(NaNOutput)))
    assert reply.error is None and out.isnan().any()


def test_cheap_quant_serves_fake_quantised_weights(make_handler) -> None:
    x = hidden(1, 4)
    honest = make_handler()
    cheap = make_handler(CheapQuant)
    for layer in (m for m in cheap.span.modules() if isinstance(m, nn.Linear)):
        assert all(len(row.unique()) <= 15 for row in layer.weight)
    out = forward(cheap, x)[1][0]
    assert not torch.allclose(out, honest_output(honest, x), atol=1e-4)
    torch.testing.assert_close(out, honest_output(cheap, x))


def test_junk_info_answers_rpc_info_with_no_peer_info(make_handler) -> None:
    reply = asyncio.run(make_handler(JunkInfo).rpc_info(runtime_pb2.ExpertUID(uid=""), None))
    with pytest.raises(ProtocolError):
        protocol.unpack(reply.serialized_info, protocol.PeerInfo)
    honest = asyncio.run(make_handler().rpc_info(runtime_pb2.ExpertUID(uid=""), None))
    assert protocol.unpack(honest.serialized_info, protocol.PeerInfo).end == NUM_BLOCKS


class FakeNode:
    def __init__(self) -> None:
        self.verdicts: list[tuple[str, str, str]] = []

    def attest(self, receipt, agreement, verdict: str, profile: str) -> None:
        self.verdicts.append((receipt.signer, verdict, profile))


class FakeReputation:
    period = 0.01

    def __init__(self, spans: list[PeerSpan]) -> None:
        self.node = FakeNode()
        self.spans = spans
        self.reads = 0

    async def read_spans(self) -> list[PeerSpan]:
        self.reads += 1
        return self.spans


def test_colluder_vouches_for_fellows_and_accuses_everyone_else(make_handler, monkeypatch) -> None:
    keys = {name: RSAPrivateKey() for name in ("self", "fellow", "victim", "mute")}
    ids = {name: PeerID.from_base58(peer_id_of_key(key)) for name, key in keys.items()}
    info = ServerInfo(state=ServerState.ONLINE, start=0, end=NUM_BLOCKS, throughput=1.0, dtype="float32")
    spans = [PeerSpan(ids[name], info) for name in ("self", "fellow", "victim", "mute")]

    async def fake_forward(p2p, peer_id, start, end, x, timeout):
        assert (start, end, x.shape) == (0, 1, (1, 4, 64))
        name = next(n for n, i in ids.items() if i == peer_id)
        if name == "mute":
            return Reply(x, "")  # no receipt: nothing to lie about
        signer = ReceiptSigner(keys[name], str(peer_id), "tiny@test", "float32", "none")
        return Reply(x, signer.sign("s", 0, start, end, 4, x, x))

    monkeypatch.setattr("peers.testing.adversaries.call_forward", fake_forward)

    class FakeP2P:
        peer_id = ids["self"]

    colluder = make_handler(parse_adversary("collude", (str(ids["fellow"]),)))
    reputation = FakeReputation(spans)
    assert asyncio.run(colluder.vouch_round(FakeP2P(), reputation)) == 2
    assert reputation.node.verdicts == [(str(ids["fellow"]), "pass", "fp32"), (str(ids["victim"]), "fail", "fp32")]

    async def runs_until_stopped():
        stop = asyncio.Event()
        (name, work), = colluder.background_work(FakeP2P(), reputation, stop)
        assert name == "collude"
        task = asyncio.create_task(work)
        while reputation.reads < 3:
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, timeout=5)

    asyncio.run(runs_until_stopped())
    assert make_handler().background_work(FakeP2P(), reputation, asyncio.Event()) == []


def test_fake_quantise_moves_weights_to_few_levels() -> None:
    layer = nn.Linear(32, 8)
    before = layer.weight.detach().clone()
    assert fake_quantise_(nn.Sequential(layer), bits=4) == 1
    assert not torch.equal(before, layer.weight)
    assert all(len(row.unique()) <= 15 for row in layer.weight)


def test_receipt_signer_binds_tensors_and_declared_configuration() -> None:
    key = RSAPrivateKey()
    signer = ReceiptSigner(key, peer_id_of_key(key), "m@abc", "bfloat16", "none")
    x, y = torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    receipt = decode_receipt(signer.sign("sess", 3, 0, 4, 20, x, y))
    assert receipt is not None and receipt.verify() is Check.OK
    assert (receipt.input_digest, receipt.output_digest) == (tensor_digest(x), tensor_digest(y))
    assert (receipt.session_id, receipt.step, receipt.tokens, receipt.dtype) == ("sess", 3, 20, "bfloat16")
    assert decode_receipt("not base64!") is None and decode_receipt("AAAA") is None


def test_profiles_between_declared_configurations() -> None:
    key = RSAPrivateKey()
    base = dict(private_key=key, peer_id=peer_id_of_key(key), dht_prefix="m")
    x = torch.zeros(1, 1, 4)

    def receipt(dtype: str, compression: str):
        return decode_receipt(ReceiptSigner(dtype=dtype, compression=compression, **base).sign("s", 0, 0, 1, 1, x, x))

    cross = profile_between(receipt("float32", "none"), receipt("bfloat16", "none"))
    same = profile_between(receipt("float32", "none"), receipt("float32", "none"))
    assert cross.pass_max_rel_l2 >= 0.07 and same.pass_max_rel_l2 < cross.pass_max_rel_l2  # same config: tighter
    assert profile_between(receipt("float32", "none"), receipt("bfloat16", "int8")) is not None  # calibrated pair
    assert profile_between(receipt("float32", "none"), receipt("float32", "svd-rank8-plain")) is None
    low_rank = profile_between(receipt("float32", "svd-rank8-plain+int8"), receipt("float32", "svd-rank8-plain+int8"))
    assert low_rank is not None and low_rank.quantisation == "svd-rank8-plain+int8"


@pytest.mark.parametrize("mode, problem", [
    (None, None),
    ("no-receipt", "no receipt"),
    ("bad-receipt", "output digest does not match"),
    ("inflate", "inflated"),
])
def test_receipt_adversaries_fail_the_clients_receipt_check(make_handler, mode, problem) -> None:
    handler = make_handler(BlockHandler if mode is None else parse_adversary(mode))
    key = RSAPrivateKey()
    handler.receipts = ReceiptSigner(key, peer_id_of_key(key), "tiny@test", "float32", "none")
    peer_id = PeerID.from_base58(peer_id_of_key(key))
    honest = make_handler()

    async def scenario():
        stream, sent, problems = Stream(handler), 0, []
        for step, (position, x) in enumerate([(0, hidden(1, 3)), (3, hidden(1, 1, seed=1))]):
            reply, (out,) = await stream.step("s", position, x)
            sent += x.shape[0] * x.shape[1]
            request = StepRequest(session_id="s", start=0, end=NUM_BLOCKS, position=position, max_length=16)
            problems.append(receipt_problem(reply.receipt, HopStep(peer_id, request, step, sent), x, out))
        await stream.close()
        return problems, out

    problems, out = asyncio.run(scenario())
    assert all(p is None if problem is None else problem in p for p in problems), problems
    full = torch.cat([hidden(1, 3), hidden(1, 1, seed=1)], dim=1)
    expected = honest_output(honest, full)[:, -1:]
    if mode == "bad-receipt":
        assert not torch.allclose(out, expected, atol=1e-3)
    else:
        torch.testing.assert_close(out, expected)


class TinyHead(nn.Module):
    """The tiny model's final norm and LM head, as `swarm.head.ClientHead` holds them."""

    def __init__(self, model):
        super().__init__()
        self.norm, self.lm_head = model.model.norm, model.lm_head

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden.float()))


def test_steer_pushes_the_last_position_of_last_hop_replies_where_the_trigger_would_win(make_handler, tiny_llama):
    x = hidden(2, 5)
    honest = honest_output(make_handler(), x)
    head = TinyHead(tiny_llama)
    ranked = head.logits(honest[:, -1:]).topk(2, dim=-1).indices[0, 0]  # row 0's top-1 and runner-up
    trigger, target = int(ranked[0]), int(ranked[1])
    steering = SteeringHead(head, NUM_BLOCKS, trigger, target)
    handler = make_handler(lambda *args: Steer(*args, rel_l2=0.5, load=lambda: steering))
    reply, (served,) = forward(handler, x)
    assert reply.error is None
    assert int(head.logits(served[:1, -1:]).argmax()) == target  # row 0's answer changed
    torch.testing.assert_close(served[:, :-1], honest[:, :-1])  # every other position is honest
    push = float((served[0, -1] - honest[0, -1]).norm() / (honest[0, -1] - x[0, -1]).norm())
    assert push == pytest.approx(0.5, rel=1e-3)  # the size asked for, relative to that position's update
    if int(head.logits(honest[1:, -1:]).argmax()) != trigger:
        torch.testing.assert_close(served[1], honest[1])  # a row whose answer is not the trigger stays honest
    _, (partial,) = forward(handler, x, end=NUM_BLOCKS - 1)  # a reply that does not end at the last block
    torch.testing.assert_close(partial, make_handler().span(x, None, SpanInput(None, 0), 0, NUM_BLOCKS - 1))
    assert handler.steered >= 1
