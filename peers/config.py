"""The peer's configuration: built once from the command line, frozen, passed down."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from hivemind.utils.multiaddr import Multiaddr

from swarm.errors import ConfigError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class PeerConfig:
    model: str  # alias, Hugging Face repo id or local path
    initial_peers: tuple[str, ...]  # multiaddrs of peers already in the swarm (empty: start a new swarm)
    blocks: tuple[int, int] | None = None  # serve exactly blocks [start, end); None: choose
    num_blocks: int | None = None  # how many blocks to serve when choosing; None: as many as fit
    host: str = "0.0.0.0"  # interface the peer listens on
    port: int = 0  # TCP port (0: any free one)
    announce_maddrs: tuple[str, ...] = ()  # addresses others dial instead of the listening ones (a forwarded port)
    identity: Path | None = None  # RSA identity file; keeps the peer id across restarts
    device: str = "cpu"
    num_threads: int | None = None  # torch threads for the blocks on a CPU (None: torch's default, one per core)
    dtype: str = "auto"  # float32 | bfloat16 | float16 | auto (the checkpoint's dtype, see auto_dtype)
    max_length: int = 4096  # longest session accepted, in tokens
    cache_tokens: int | None = None  # KV-cache budget in tokens, batch x max_length per session (None: from memory)
    max_cache_bytes: int | None = None  # KV-cache budget in bytes, converted to tokens for the served blocks
    max_sessions: int = 64  # open sessions across all clients
    max_train_tokens: int = 8192  # largest training request, batch x tokens (0: inference only)
    batch_sessions: bool = True  # decode steps of sessions that wait together run as one batched forward
    prefill_chunk_tokens: int = 512  # longer prompts run in chunks, between other sessions' decode steps
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
        """The compute dtype; "auto" before `for_checkpoint` fixed it is the stored dtype of no checkpoint known,
        taken as float32 (as the default model's)."""
        if self.dtype == "auto":
            return DTYPES[auto_dtype(self.device, "float32")[0]]
        return DTYPES[self.dtype]

    def for_checkpoint(self, stored_dtype: str) -> PeerConfig:
        """This config with "auto" replaced by the dtype to compute in for a checkpoint stored in `stored_dtype`."""
        if self.dtype != "auto":
            return self
        bf16_ok = not self.device.startswith("cuda") or (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        chosen, why = auto_dtype(self.device, stored_dtype, bf16_ok)
        if why:
            logger.info(f"--dtype auto: {why}")
        return dataclasses.replace(self, dtype=chosen)

    def torch_device(self) -> torch.device:
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("--device cuda was given but no CUDA device is available to torch")
        return torch.device(self.device)


def auto_dtype(device: str, stored_dtype: str, cuda_bf16: bool = True) -> tuple[str, str | None]:
    """(dtype name, reason or None) that --dtype auto computes in: the checkpoint's own dtype (no copy at twice
    the size), unless the device runs it badly: float16 on CPU (slow kernels) becomes bfloat16 (same size),
    bfloat16 on a GPU without bfloat16 support becomes float16. A dtype no peer declares becomes float32."""
    if stored_dtype not in DTYPES:
        return "float32", f"the checkpoint is stored in {stored_dtype}; computing in float32"
    on_cuda = device.startswith("cuda")
    if stored_dtype == "float16" and not on_cuda:
        return "bfloat16", ("the checkpoint is float16, which CPUs run slowly; computing in bfloat16 (same size; "
                            "--dtype float32 keeps every float16 weight exact at twice the memory)")
    if stored_dtype == "bfloat16" and on_cuda and not cuda_bf16:
        return "float16", "the checkpoint is bfloat16, which this GPU does not support; computing in float16"
    return stored_dtype, None


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


def parse_announce_maddrs(values: Sequence[str]) -> tuple[str, ...]:
    """--announce-maddrs values (repeat, or comma/space-separated): multiaddrs with an explicit TCP port and no
    peer id, e.g. /ip4/203.0.113.5/tcp/31337 (p2pd adds the peer id, and cannot announce port 0)."""
    addresses: list[str] = []
    for part in " ".join(values).replace(",", " ").split():
        try:
            maddr = Multiaddr(part)
            protocols = {p.name: maddr.value_for_protocol(p.code) for p in maddr.protocols()}
        except Exception as e:  # multiaddr raises several error types for bad input
            raise ConfigError(f"invalid multiaddr {part!r}: {e}") from None
        if "p2p" in protocols:
            raise ConfigError(f"announced multiaddr {part!r}: leave out the peer id (/p2p/...); it is added")
        if protocols.get("tcp") in (None, "0"):
            raise ConfigError(f"announced multiaddr {part!r}: needs an explicit TCP port, e.g. /ip4/1.2.3.4/tcp/31337")
        addresses.append(part)
    return tuple(addresses)
