"""Run the OpenAI-compatible API server until Ctrl+C (the body of `swarm-chat serve`)."""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from apps.api.app import create_app
from apps.api.backend import SwarmBackend
from swarm.config import STRICT

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    model: str  # alias, repo id or path; also the model name clients ask for
    initial_peers: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    max_length: int = 2048  # session length per request: prompt + new tokens
    default_max_tokens: int = 256  # new tokens when a chat request gives no max_tokens
    workers: int = 4  # requests generated at once (each in its own inference session)
    strict: bool = False  # check every step of every answer, and let every answer (streamed too) wait for its checks
    self_verify_bytes: int = 0  # memory for blocks the server loads to check hops no other peer serves (0: none)
    prompts: Path | None = None  # trained prompts (soft, maybe deep) for every request (swarm-tune's output)
    prompt_lookup: int = 0  # draft tokens per step (speculative decoding, one-row requests); 0: off


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


def serve(cfg: ServeConfig) -> None:
    from reputation.client import ClientTrust
    from swarm.client import DistributedModelForCausalLM

    # uvicorn re-raises the signal that stopped it; SIGTERM's default action would end the process before
    # the swarm client could stop its DHT process, so SIGTERM unwinds like Ctrl+C instead.
    signal.signal(signal.SIGTERM, _interrupt)
    strict = STRICT if cfg.strict else {}
    model = DistributedModelForCausalLM.from_pretrained(cfg.model, cfg.initial_peers, trust_layer=ClientTrust,
                                                        self_verify_bytes=cfg.self_verify_bytes, prompts=cfg.prompts,
                                                        **strict)
    backend = SwarmBackend(model, cfg.max_length, cfg.default_max_tokens, cfg.workers, strict=cfg.strict,
                           prompt_lookup=cfg.prompt_lookup)
    names = tuple(dict.fromkeys((cfg.model, model.checkpoint.manifest.name)))
    app = create_app(backend, names)
    logger.info(f"OpenAI-compatible API for {cfg.model} at http://{cfg.host}:{cfg.port}/v1")
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        backend.shutdown()
        model.shutdown()
