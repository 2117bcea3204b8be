"""SVD factorisation, compression options and tags, the factor store, bitsandbytes layers (no network)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peers.compression.options import SvdSpec, check_options, compression_tag, svd_spec
from peers.compression.store import FactorStore
from peers.compression.svd import (
    LowRankLinear, factorise, factorise_block, rank_for_energy, rank_for_params, saves_memory, shape_for_state,
)
from peers.config import PeerConfig
from swarm.errors import ConfigError


def config(**options) -> PeerConfig:
    return PeerConfig(model="smollm2-135m", initial_peers=(), **options)


def test_saves_memory_only_below_the_break_even_rank():
    assert saves_memory(1536, 576, 418)  # 418 * 2112 < 884736
    assert not saves_memory(1536, 576, 419)
    assert not saves_memory(192, 576, 144)  # a thin layer: rank 144 already costs as much as dense


def test_rank_for_params_keeps_the_fraction():
    rank = rank_for_params(1536, 576, 0.5)
    assert abs(rank * (1536 + 576) / (1536 * 576) - 0.5) < 0.01
    assert rank_for_params(10, 10, 1e-6) == 1


def test_rank_for_energy_is_the_smallest_rank_reaching_it():
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert rank_for_energy(s, 9 / 14) == 1
    assert rank_for_energy(s, 9 / 14 + 1e-3) == 2
    assert rank_for_energy(s, 0.99) == 3
    assert rank_for_energy(s, 1.0) == 3


def test_factorise_is_exact_for_a_low_rank_matrix_and_refuses_when_it_would_not_save():
    torch.manual_seed(0)
    weight = torch.randn(64, 8) @ torch.randn(8, 48)  # rank 8
    up, down = factorise(weight, SvdSpec("plain", rank=8))
    assert up.shape == (64, 8) and down.shape == (8, 48)
    assert torch.allclose(up @ down, weight, atol=1e-4)
    assert factorise(weight, SvdSpec("plain", rank=40)) is None  # 40 * 112 > 64 * 48


def test_activation_aware_beats_plain_on_the_inputs_it_was_calibrated_on():
    torch.manual_seed(0)
    weight = torch.randn(96, 64)
    scales = torch.logspace(1, -2, 64)  # inputs use a few directions strongly, most hardly at all
    inputs = torch.randn(2000, 64) * scales @ torch.linalg.qr(torch.randn(64, 64))[0]
    gram = inputs.double().T @ inputs.double()
    errors = {}
    for method in ("plain", "activation-aware"):
        up, down = factorise(weight, SvdSpec(method, rank=8), gram)
        errors[method] = ((inputs @ (weight - up @ down).T).norm() / (inputs @ weight.T).norm()).item()
    assert errors["activation-aware"] < 0.5 * errors["plain"], errors


def test_factorised_block_state_fits_a_reshaped_layer():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.Linear(64, 4, bias=False))
    state = factorise_block(layer.state_dict(), SvdSpec("plain", rank=4))
    assert "0.up.weight" in state and "0.up.bias" in state and "0.weight" not in state
    assert "2.weight" in state and "2.up.weight" not in state  # 4 * (64 + 4) > 64 * 4: stays dense
    with torch.device("meta"):
        target = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.Linear(64, 4, bias=False))
    shape_for_state(target, state)
    assert isinstance(target[0], LowRankLinear) and target[0].rank == 4
    target.load_state_dict(state, strict=True, assign=True)
    x = torch.randn(5, 32)
    assert target(x).shape == (5, 4)


@pytest.mark.parametrize(
    "options, tag",
    [
        ({}, "none"),
        ({"quant": "nf4"}, "nf4"),
        ({"quant": "int8"}, "int8"),
        ({"svd_energy": 0.95, "svd_method": "activation-aware"}, "svd-energy0.95-aa"),
        ({"svd_rank": 64}, "svd-rank64-plain"),
        ({"svd_params": 0.5, "quant": "nf4"}, "svd-params0.5-plain+nf4"),
        ({"offload": "disk"}, "none"),  # offloading does not change outputs
    ],
)
def test_compression_tag(options, tag):
    assert compression_tag(config(**options)) == tag


@pytest.mark.parametrize(
    "options, message",
    [
        ({"svd_rank": 8, "svd_energy": 0.9}, "not several"),
        ({"svd_energy": 1.5}, "--svd-energy must be in (0, 1]"),
        ({"svd_params": 1.0}, "--svd-params must be in (0, 1)"),
        ({"svd_rank": 0}, "at least 1"),
        ({"svd_method": "activation-aware"}, "needs --svd-rank"),
        ({"offload": "disk", "quant": "nf4"}, "cannot be combined"),
        ({"offload": "cpu"}, "--offload disk"),
        ({"quant": "int4"}, "unknown --quant"),
    ],
)
def test_bad_options_raise_config_error(options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        check_options(config(**options))


def test_svd_spec_is_none_without_svd_options():
    assert svd_spec(config()) is None
    assert svd_spec(config(svd_params=0.3)).key == "svd-params0.3-plain"


def test_factor_store_round_trip_leaves_no_temporary_files(tmp_path):
    store = FactorStore(tmp_path / "svd-rank4-plain")
    assert not store.has(3)
    store.save(3, {"a.up.weight": torch.ones(2, 3)})
    assert store.has(3) and torch.equal(store.load(3)["a.up.weight"], torch.ones(2, 3))
    assert [p.name for p in store.folder.iterdir()] == ["block3.safetensors"]


@pytest.mark.parametrize("kind, tolerance, max_bytes", [("int8", 0.01, 0.27), ("nf4", 0.12, 0.14)])
def test_bitsandbytes_layers_run_on_cpu_and_shrink_the_weights(kind, tolerance, max_bytes):
    from peers.compression.quant import quantise_layer

    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(256, 512, bias=False))
    x = torch.randn(3, 256)
    expected = layer(x)
    dense_bytes = 256 * 512 * 4
    quantise_layer(layer, kind, torch.float32, torch.device("cpu"))
    assert type(layer[0]) is not nn.Linear
    with torch.inference_mode():
        produced = layer(x)
    assert ((produced - expected).norm() / expected.norm()).item() < tolerance
    held = sum(v.numel() * v.element_size() for v in layer.state_dict().values() if torch.is_tensor(v))
    assert held < max_bytes * dense_bytes


def _whole_weight_layer(bnb, weight: torch.Tensor, kind: str) -> nn.Module:
    """A layer quantised as bitsandbytes does it itself, the whole weight at once when moved to the device."""
    out_features, in_features = weight.shape
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False, threshold=6.0)
        layer.weight = bnb.nn.Int8Params(weight.half(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight.float(), requires_grad=False, quant_type="nf4")
        layer.support_avx512bf16_for_cpu = not in_features % 64
    return layer.to("cpu").eval()


@pytest.mark.parametrize("kind", ["int8", "nf4"])
@pytest.mark.parametrize("shape", [(96, 128), (40, 100)])  # 100 inputs: rows that cannot hold whole nf4 blocks
def test_quantising_a_few_rows_at_a_time_gives_what_bitsandbytes_gives_at_once(monkeypatch, kind, shape):
    from peers.compression import quant

    bnb = quant._bitsandbytes()
    torch.manual_seed(2)
    weight = torch.randn(*shape, dtype=torch.bfloat16)
    monkeypatch.setattr(quant, "QUANT_CHUNK_WEIGHTS", 3 * shape[1] + 1)  # chunks of three rows in quantise_weight
    codes, _ = quant.quantised_rows(weight, kind, torch.device("cpu"), chunk_weights=3 * shape[1])
    layer = quant.quantise_weight(weight, None, kind, torch.bfloat16, torch.device("cpu")).eval()
    whole = _whole_weight_layer(bnb, weight, kind)
    assert torch.equal(codes, whole.weight.data) and torch.equal(layer.weight.data, whole.weight.data)
    if kind == "int8":
        assert torch.equal(layer.weight.SCB, whole.weight.SCB)
    else:
        ours, theirs = layer.weight.quant_state, whole.weight.quant_state
        assert torch.equal(ours.absmax, theirs.absmax) and torch.equal(ours.offset, theirs.offset)
        assert torch.equal(ours.state2.absmax, theirs.state2.absmax) and ours.dtype == theirs.dtype
    x = torch.randn(2, 5, shape[1], dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(layer(x), whole(x))
