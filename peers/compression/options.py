"""The compression options of a peer as pure values: checking them, and the tag it announces.

The tag goes into `ServerInfo.compression`, so clients and spot checks know what a peer runs and can pick
a tolerance for its outputs (the trust layer keys tolerance profiles off dtype + tag). Offloading does not
change outputs, so it is not part of the tag.
"""

from __future__ import annotations

from dataclasses import dataclass

from peers.config import PeerConfig
from swarm.errors import ConfigError
from swarm.tags import QUANT_KINDS  # the tags a peer may declare form a closed set (swarm.tags)

SVD_METHODS = ("plain", "activation-aware")
OFFLOAD_TIERS = ("none", "cpu", "disk")
_METHOD_SHORT = {"plain": "plain", "activation-aware": "aa"}


@dataclass(frozen=True)
class SvdSpec:
    """How to truncate each linear layer; exactly one of rank, energy, params is set."""

    method: str  # plain | activation-aware
    rank: int | None = None  # the same rank for every layer
    energy: float | None = None  # smallest rank whose singular values hold this fraction of sum(s^2)
    params: float | None = None  # rank that keeps this fraction of the layer's parameters

    @property
    def key(self) -> str:
        """Short canonical name, e.g. 'svd-energy0.95-aa'; names the cache of factorised blocks too."""
        if self.rank is not None:
            amount = f"rank{self.rank}"
        elif self.energy is not None:
            amount = f"energy{self.energy:g}"
        else:
            amount = f"params{self.params:g}"
        return f"svd-{amount}-{_METHOD_SHORT[self.method]}"


def svd_spec(cfg: PeerConfig) -> SvdSpec | None:
    """The SVD the peer applies, or None; raises ConfigError on contradictory or out-of-range options."""
    given = [name for name in ("svd_rank", "svd_energy", "svd_params") if getattr(cfg, name) is not None]
    if cfg.svd_method not in SVD_METHODS:
        raise ConfigError(f"unknown --svd-method {cfg.svd_method!r} (choose {' or '.join(SVD_METHODS)})")
    if not given:
        if cfg.svd_method != "plain":
            raise ConfigError("--svd-method needs --svd-rank, --svd-energy or --svd-params")
        return None
    if len(given) > 1:
        raise ConfigError("give one of --svd-rank, --svd-energy, --svd-params, not several")
    if cfg.svd_rank is not None and cfg.svd_rank < 1:
        raise ConfigError(f"--svd-rank must be at least 1, not {cfg.svd_rank}")
    if cfg.svd_energy is not None and not 0 < cfg.svd_energy <= 1:
        raise ConfigError(f"--svd-energy must be in (0, 1], not {cfg.svd_energy}")
    if cfg.svd_params is not None and not 0 < cfg.svd_params < 1:
        raise ConfigError(f"--svd-params must be in (0, 1), not {cfg.svd_params}")
    return SvdSpec(cfg.svd_method, cfg.svd_rank, cfg.svd_energy, cfg.svd_params)


def check_options(cfg: PeerConfig) -> None:
    """Raise ConfigError for options that cannot work together (before anything is loaded)."""
    svd_spec(cfg)
    if cfg.quant not in QUANT_KINDS:
        raise ConfigError(f"unknown --quant {cfg.quant!r} (choose int8 or nf4)")
    if cfg.offload not in OFFLOAD_TIERS:
        raise ConfigError(f"unknown --offload {cfg.offload!r} (choose cpu or disk)")
    if cfg.offload != "none" and cfg.quant != "none":
        raise ConfigError("--offload cannot be combined with --quant: quantised weights stay resident")
    if cfg.offload == "cpu" and not cfg.device.startswith("cuda"):
        raise ConfigError("--offload cpu keeps weights in host RAM for a GPU peer; with --device cpu use --offload disk")


def compression_tag(cfg: PeerConfig) -> str:
    """The canonical compression string a peer announces: 'none', 'nf4', 'int8', 'svd-energy0.95-aa',
    'svd-params0.5-plain+nf4', ... (dtype is announced separately)."""
    spec = svd_spec(cfg)
    parts = [spec.key] if spec else []
    if cfg.quant != "none":
        parts.append(cfg.quant)
    return "+".join(parts) or "none"
