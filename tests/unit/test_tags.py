"""The closed grammar of declared configurations (swarm.tags), and that peers only ever declare inside it."""

from __future__ import annotations

import itertools

import pytest

from peers.compression import compression_tag
from peers.config import PeerConfig
from swarm.tags import known_compression, known_dtype, split_compression


@pytest.mark.parametrize("tag, parts", [
    ("none", (None, "none")),
    ("int8", (None, "int8")),
    ("nf4", (None, "nf4")),
    ("svd-rank64-plain", ("svd-rank64-plain", "none")),
    ("svd-energy0.95-aa", ("svd-energy0.95-aa", "none")),
    ("svd-energy1-plain", ("svd-energy1-plain", "none")),
    ("svd-params0.5-plain+nf4", ("svd-params0.5-plain", "nf4")),
    ("svd-params1e-05-aa+int8", ("svd-params1e-05-aa", "int8")),
])
def test_known_tags_split_into_their_parts(tag, parts):
    assert known_compression(tag)
    assert split_compression(tag) == parts


@pytest.mark.parametrize("tag", [
    "", "None", "int4", "fp8", "gptq", "none+nf4", "int8+nf4", "svd", "svd-rank0-plain", "svd-rank064-plain",
    "svd-rank64-fancy", "svd-energy0.950-aa", "svd-energy1.5-aa", "svd-params1-plain", "svd-params0-plain",
    "svd-paramsnan-plain", "svd-rank64-plain+", "svd-rank64-plain+int4", "svd-rank64-plain+nf4+nf4", "x" * 65, 5,
])
def test_unknown_tags_are_refused(tag):
    assert not known_compression(tag)


def test_dtypes_form_a_closed_set():
    assert all(known_dtype(d) for d in ("float32", "bfloat16", "float16"))
    assert not any(known_dtype(d) for d in ("float64", "fp32", "int8", ""))


def _configs():
    svd = [{}, {"svd_rank": 8}, {"svd_rank": 1024}, {"svd_energy": 0.9}, {"svd_energy": 1.0},
           {"svd_params": 0.25}, {"svd_params": 0.333}, {"svd_params": 1e-5}]
    for amount, method, quant in itertools.product(svd, ("plain", "activation-aware"), ("none", "int8", "nf4")):
        if method != "plain" and not amount:
            continue
        yield {**amount, "svd_method": method, "quant": quant}


@pytest.mark.parametrize("options", list(_configs()), ids=str)
def test_every_tag_a_peer_can_declare_is_known(options):
    assert known_compression(compression_tag(PeerConfig(model="m", initial_peers=(), **options)))
