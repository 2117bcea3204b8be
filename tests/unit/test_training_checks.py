"""The trust layer on training work (`reputation.training_checks`), over a fake swarm of signing peers: receipts
of training replies, their countersignatures, and backward spot checks that catch wrong gradients and pass
honest ones."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey

from fake_swarm import HIDDEN, FakePeer, FakeSwarm
from reputation.gradients import compare_gradients, gradient_profile
from reputation.node import ReputationConfig, ReputationNode
from reputation.tolerance import judge
from reputation.training_checks import TrainingChecker
from swarm.config import ClientConfig
from swarm.sequence import RemoteSequence
from swarm.training import RemoteBlocks, RemoteBlocksFunction

CFG = ClientConfig(initial_peers=(), missing_blocks_timeout=0.0, request_timeout=5.0)


def zeroed(grad: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(grad)


def setup(*peers: FakePeer, check_rate: float = 1.0, seeds: tuple[str, ...] = ()):
    swarm = FakeSwarm(*peers)
    sequence = RemoteSequence(swarm, swarm, "fake", 6, CFG)
    seed_ids = tuple(str(swarm.by_name(name).peer_id) for name in seeds)
    node = ReputationNode(RSAPrivateKey(), ReputationConfig(recompute_period=0.0, seeds=seed_ids))
    checker = TrainingChecker(node, swarm, sequence, rng=random.Random(0), check_rate=check_rate)
    sequence.use_trust(node)
    return swarm, sequence, node, checker, RemoteBlocks(sequence, swarm, observer=checker)


def train_pass(blocks: RemoteBlocks, checker: TrainingChecker, seed: int = 0) -> torch.Tensor:
    hidden = torch.randn(1, 4, HIDDEN, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)

    async def run() -> None:
        loop = asyncio.get_running_loop()

        def in_loop(coroutine):  # the autograd function runs coroutines; here, on this loop's executor thread
            return asyncio.run_coroutine_threadsafe(coroutine, loop).result()

        def step() -> None:
            out = RemoteBlocksFunction.apply(hidden, torch.empty(0), blocks, in_loop, None)
            (out ** 2).mean().backward()

        await loop.run_in_executor(None, step)
        await checker.drain()

    asyncio.run(run())
    return hidden.grad


PEERS = ("liar", 0, 3), ("a", 0, 3), ("a2", 0, 3), ("b", 3, 6)


def liar_swarm(seeds: tuple[str, ...] = ()):
    return setup(*(FakePeer(name, start, end, sign=True, corrupt_grad=zeroed if name == "liar" else None,
                            throughput=1000.0 if name == "liar" else 100.0) for name, start, end in PEERS), seeds=seeds)


def test_a_peer_returning_wrong_gradients_is_caught_and_blacklisted_by_trusted_referees():
    swarm, sequence, node, checker, blocks = liar_swarm(seeds=("a", "a2"))
    liar = str(swarm.by_name("liar").peer_id)
    for seed in range(3):
        train_pass(blocks, checker, seed)
        if node.is_blacklisted(liar):
            break
    assert node.is_blacklisted(liar) and checker.stats.faults == 1
    for name in ("a", "a2", "b"):
        assert not node.is_blacklisted(str(swarm.by_name(name).peer_id))
    assert checker.stats.unverifiable >= 1  # nobody else serves b's blocks: its backward cannot be checked...
    assert checker.stats.countersigned == sum(n for p, n in checker.stats.replies.items()
                                              if p != str(swarm.by_name("b").peer_id))  # ...nor credited


def test_untrusted_peers_alone_never_convict_a_backward():
    swarm, sequence, node, checker, blocks = liar_swarm()
    liar = str(swarm.by_name("liar").peer_id)
    train_pass(blocks, checker)
    assert checker.stats.inconclusive >= 1 and checker.stats.faults == 0 and not node.is_blacklisted(liar)


def test_a_pass_nobody_else_can_re_run_is_unverifiable_and_earns_nothing():
    swarm, sequence, node, checker, blocks = setup(FakePeer("a", 0, 3, sign=True), FakePeer("b", 3, 6, sign=True))
    train_pass(blocks, checker)
    assert checker.stats.checks == 0 and checker.stats.unverifiable == 4 and checker.stats.faults == 0  # 2 + 2


def shifted(output: torch.Tensor) -> torch.Tensor:
    """Wrong hidden states with right gradients: the output plus a constant (its gradient passes through)."""
    return output + 0.5 * output.detach().std()


def test_a_peer_returning_wrong_forward_outputs_with_honest_gradients_is_caught_by_forward_checks():
    swarm, sequence, node, checker, blocks = setup(
        *(FakePeer(name, start, end, sign=True, corrupt=shifted if name == "liar" else None,
                   throughput=1000.0 if name == "liar" else 100.0) for name, start, end in PEERS), seeds=("a", "a2"))
    liar = str(swarm.by_name("liar").peer_id)
    for seed in range(3):
        train_pass(blocks, checker, seed)
        if node.is_blacklisted(liar):
            break
    assert node.is_blacklisted(liar) and checker.stats.faults == 1 and checker.stats.forward_checks >= 1
    assert [verdict for subject, *_, verdict in checker.stats.comparisons if subject == liar].count("fail") == 1
    for name in ("a", "a2", "b"):
        assert not node.is_blacklisted(str(swarm.by_name(name).peer_id))


def test_a_training_reply_without_a_valid_receipt_is_refused_and_routed_around():
    swarm, sequence, node, checker, blocks = setup(
        FakePeer("unsigned", 0, 3, throughput=1000.0), FakePeer("a", 0, 3, sign=True), FakePeer("b", 3, 6, sign=True))
    grad = train_pass(blocks, checker)
    assert grad is not None and checker.stats.bad_receipts == 1
    assert node.is_blacklisted(str(swarm.by_name("unsigned").peer_id)) and blocks.failovers == 1


@pytest.mark.parametrize("scale, verdict", [(1.0, "pass"), (1.005, "pass"), (1.02, "inconclusive"), (1.5, "fail"), (0.0, "fail")])
def test_gradient_tolerances_pass_honest_rounding_and_fail_wrong_gradients(scale, verdict):
    torch.manual_seed(0)
    reference = torch.randn(2, 6, 16)
    other = reference * scale
    assert judge(compare_gradients(reference, other), gradient_profile(("float32", "none"), ("float32", "none"))) == verdict
    assert gradient_profile(("float32", "none"), ("bfloat16", "none")) is None  # as far apart as wrong gradients
    assert gradient_profile(("float32", "nf4"), ("float32", "none")) is None
