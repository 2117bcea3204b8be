"""The peer's configuration: built once from the command line, frozen, passed down."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from swarm.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class PeerConfig:
    model: str  # alias, Hugging Face repo id or local path
    initial_peers: tuple[str, ...]  # multiaddrs of peers already in the swarm (empty: start a new swarm)
    blocks: tuple[int, int] | None = None  # serve exactly blocks [start, end); None: choose
    num_blocks: int | None = None  # how many blocks to serve when choosing; None: as many as fit
    host: str = "0.0.0.0"  # interface the peer listens on
    port: int = 0  # TCP port (0: any free one)
    identity: Path | None = None  # RSA identity file; keeps the peer id across restarts
    device: str = "cpu"
    dtype: str = "auto"  # float32 | bfloat16 | float16 | auto (float32 on CPU, bfloat16 on CUDA)
    max_length: int = 4096  # longest session accepted, in tokens
    cache_tokens: int | None = None  # KV-cache budget in tokens, batch x max_length per session (None: from memory)
    max_cache_bytes: int | None = None  # KV-cache budget in bytes, converted to tokens for the served blocks
    max_sessions: int = 64  # open sessions across all clients
    max_train_tokens: int = 8192  # largest training request, batch x tokens (0: inference only)
    session_idle_timeout: float = 600.0  # seconds without a step before a session's cache is freed
    public_name: str = ""  # shown by `swarm-peer status`
    cache_dir: Path | None = None  # per-block model cache (None: $EFEDLLM_CACHE or ~/.cache/efedllm)
    refresh_period: float = 20.0  # seconds between DHT re-announcements
    rebalance_period: float = 120.0  # seconds between checks whether to move (0: never; pinned --blocks never move)
    drain_timeout: float = 60.0  # when moving, how long to let running sessions finish
    trusted_peers: tuple[str, ...] = ()  # peer ids of the pre-trusted seeds (bootstrap operators)
    gossip_period: float = 5.0  # seconds between gossip rounds
    svd_rank: int | None = None  # factorise every linear layer at this rank (peers.compression.svd)
    svd_energy: float | None = None  # ...or keep the singular values holding this fraction of the energy
    svd_params: float | None = None  # ...or keep this fraction of each layer's parameters
    svd_method: str = "plain"  # plain | activation-aware (whitened by calibration statistics first)
    quant: str = "none"  # none | int8 | nf4 (bitsandbytes)
    offload: str = "none"  # none | cpu | disk: where block weights live between uses (peers.offload)

    status_interval: float = 60.0  # seconds between status lines in the log (0: none)
    relay: str = "auto"  # auto: use relays only when nobody can dial this peer; always; never (peers.reachability)
    relay_service: bool = True  # relay for peers that cannot be dialled, when this one can (swarm.relays)
    relay_renew_period: float = 20.0  # seconds between renewals of this peer's relay registrations, if it has relays

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        return DTYPES[self.dtype]

    def torch_device(self) -> torch.device:
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("--device cuda was given but no CUDA device is available to torch")
        return torch.device(self.device)


def parse_block_range(text: str, num_blocks: int | None = None) -> tuple[int, int]:
    """'10:20' -> (10, 20); checked against the model's block count when known."""
    try:
        start_text, end_text = text.split(":")
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise ConfigError(f"invalid block range {text!r}: expected START:END, e.g. 0:10") from None
    if not 0 <= start < end:
        raise ConfigError(f"invalid block range {text!r}: need 0 <= START < END")
    if num_blocks is not None and end > num_blocks:
        raise ConfigError(f"invalid block range {text!r}: the model has only {num_blocks} blocks (0:{num_blocks})")
    return start, end
