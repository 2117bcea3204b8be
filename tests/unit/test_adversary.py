"""Adversary modes (for testing the trust layer) and the live checker's pure helpers."""

from __future__ import annotations

import random

import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey
from torch import nn

from peers.adversary import Adversary, corrupt, fake_quantise_, parse_adversary
from peers.receipts import ReceiptSigner
from reputation.attest import Check, tensor_digest
from reputation.checks import decode_receipt, profile_between
from reputation.node import peer_id_of_key
from reputation.tolerance import compare_updates, judge, profile_for
from swarm.errors import ConfigError


def test_parse_adversary() -> None:
    assert parse_adversary("random") == Adversary("random")
    assert parse_adversary("cheat:0.1", ("x",)) == Adversary("cheat", 0.1, ("x",))
    for bad in ("evil", "cheat", "cheat:2", "cheat:abc", "random:1"):
        with pytest.raises(ConfigError):
            parse_adversary(bad)


def test_each_corrupting_mode_fails_the_tolerance_and_honest_passes() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 6, 64)
    honest = x + 0.5 * torch.randn(1, 6, 64)
    fp32 = profile_for("float32")
    assert judge(compare_updates(x, honest, honest.clone()), fp32) == "pass"
    for mode in ("random", "skip", "noise"):
        bad = corrupt(parse_adversary(mode), x, honest, random.Random(0))
        assert judge(compare_updates(x, honest, bad), fp32) == "fail", mode
    cheater = parse_adversary("cheat:0.1")
    outputs = [corrupt(cheater, x, honest, random.Random(seed)) for seed in range(200)]
    skipped = sum(torch.equal(out, x) for out in outputs)
    assert 5 <= skipped <= 40  # about 10% of 200
    assert all(torch.equal(out, honest) or torch.equal(out, x) for out in outputs)


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

    assert profile_between(receipt("float32", "none"), receipt("bfloat16", "none")).pass_max_rel_l2 >= 0.08
    assert profile_between(receipt("float32", "none"), receipt("float32", "nf4")) is None
    same = profile_between(receipt("float32", "nf4"), receipt("float32", "nf4"))
    assert same is not None and same.quantisation == "nf4"
