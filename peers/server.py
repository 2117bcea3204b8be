"""A volunteer peer: load a span of blocks, serve RPCs, announce on the DHT until told to stop."""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from dataclasses import dataclass

import psutil
import torch
from hivemind import DHT
from hivemind.p2p import P2P, PeerID

import swarm
from peers.config import PeerConfig, parse_block_range
from peers.compression.footprint import block_footprint
from peers.compression.options import compression_tag
from peers.handler import BlockHandler, HandlerConfig, HandlerFactory
from peers.dialback import DialBackService
from peers.loading import build_span
from peers.memory import release_free_memory
from peers.forwarder import Forwarder
from peers.reachability import Reachability, RelayKeeper, join_network, public_peers
from peers.selection import choose_num_blocks, choose_span_start, rebalance_target
from peers.reputation_service import PeerReputation
from peers.status_log import TrustProvider, log_status
from swarm import records
from swarm.blocks import BlockSpan, SpanInput
from swarm.models import BlockCheckpoint, open_model
from swarm.network import Identity, create_dht, load_identity, signer_for
from swarm.periodic import BackgroundTasks, run_periodically, wait_or_stop
from swarm.records import ServerInfo, ServerState

logger = logging.getLogger(__name__)

MEMORY_FRACTION = 0.8  # share of free memory a peer may fill with weights and cache when choosing its size


@dataclass(frozen=True)
class Plan:
    start: int
    end: int
    cache_tokens: int


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """KV-cache bytes one token takes in one block."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_key_value_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    return psutil.virtual_memory().available


def plan_blocks(cfg: PeerConfig, checkpoint: BlockCheckpoint, model_config, dht: DHT) -> Plan:
    """Pick the span (given, or the least covered one of a size that fits) and the KV-cache room."""
    dtype, n = cfg.torch_dtype(), checkpoint.num_blocks
    stored_size = torch.empty(0, dtype=getattr(torch, checkpoint.manifest.torch_dtype)).element_size()
    dtype_size = torch.empty(0, dtype=dtype).element_size()
    footprint = block_footprint(model_config, checkpoint.block_nbytes(0) * dtype_size // stored_size, dtype_size, cfg)
    per_token = kv_bytes_per_token(model_config, dtype)
    free = int(available_memory(cfg.torch_device()) * MEMORY_FRACTION)
    if cfg.blocks is not None:
        start, end = parse_block_range(f"{cfg.blocks[0]}:{cfg.blocks[1]}", n)
    else:
        count = cfg.num_blocks or choose_num_blocks(
            footprint.per_block, per_token * cfg.max_length, free - footprint.fixed, n
        )
        count = min(count, n)
        spans = records.read_spans(dht, checkpoint.dht_prefix, n)
        start = choose_span_start(spans, n, count)
        end = start + count
    if cfg.cache_tokens is not None:
        cache_tokens = cfg.cache_tokens
    elif cfg.max_cache_bytes is not None:
        cache_tokens = max(1, cfg.max_cache_bytes // max(per_token * (end - start), 1))
    else:
        weights = footprint.fixed + footprint.per_block * (end - start)
        room = max(free - weights, 0) // 4  # a quarter of what is left after weights
        cache_tokens = max(cfg.max_length, room // max(per_token * (end - start), 1))
    return Plan(start, end, cache_tokens)


def measure_throughput(span: BlockSpan, hidden_size: int, cfg: PeerConfig, steps: int = 8, rounds: int = 3) -> float:
    """Block-steps per second for single-token decoding after a short prompt (best of a few rounds,
    so a neighbour's burst of work while this peer starts does not stick to its announcement)."""
    device, dtype = cfg.torch_device(), cfg.torch_dtype()
    best = float("inf")
    for _ in range(rounds):
        cache = span.new_cache()
        span(torch.randn(1, 16, hidden_size, device=device, dtype=dtype), cache, SpanInput(None, 0))
        began = time.perf_counter()
        for position in range(16, 16 + steps):
            span(torch.randn(1, 1, hidden_size, device=device, dtype=dtype), cache, SpanInput(None, position))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - began)
    del cache
    release_free_memory()  # the measurement's caches and temporaries (an nf4 span's dequantised weights)
    return span.num_blocks * steps / best


def use_threads(count: int | None) -> None:
    """Compute on `count` torch threads (None: torch's default). Every thread's torch work uses it, the compute
    thread's too."""
    if count is not None:
        torch.set_num_threads(count)
        logger.info(f"Computing on {count} torch thread(s)")


class Peer:
    def __init__(self, cfg: PeerConfig, handler_factory: HandlerFactory = BlockHandler):
        use_threads(cfg.num_threads)
        self.handler_factory = handler_factory  # BlockHandler, or a subclass that serves differently
        self.checkpoint = open_model(cfg.model, cache_dir=cfg.cache_dir)
        cfg = self.cfg = cfg.for_checkpoint(self.checkpoint.manifest.torch_dtype)  # --dtype auto: the stored one
        self.model_config = self.checkpoint.load_config()
        self.identity: Identity = load_identity(cfg.identity)
        self.signer = signer_for(self.identity)
        validators = records.make_validators(self.checkpoint.dht_prefix, self.checkpoint.num_blocks, self.signer)

        def start_node(client_mode: bool, port: int | None) -> DHT:
            return create_dht(
                initial_peers=cfg.initial_peers, host=cfg.host, port=cfg.port if port is None else port,
                announce_maddrs=cfg.announce_maddrs,
                identity=self.identity, validators=validators, client_mode=client_mode, check_identity=port is None,
            )

        self.reach: Reachability
        self.dht, self.reach, self._relay_candidates = join_network(
            start_node, mode=cfg.relay, host=cfg.host, initial_peers=cfg.initial_peers,
            public_peers=self._read_public_peers)
        self.subkey = records.owner_subkey(self.dht.peer_id, self.signer)
        # a directly reachable peer checks newcomers' reachability and relays for those nobody can dial
        direct = self.reach.reachable and not self.reach.relays
        self.dial_back = DialBackService(relays=cfg.relay_service) if direct else None
        self.forwarder = Forwarder() if direct and cfg.relay_service else None
        self.keeps_relays = bool(self.reach.relays) or (not self.reach.reachable and cfg.relay != "never")
        self._announce_now = False  # set when how the peer is reached changed: the upkeep announces at once
        self.handler: BlockHandler | None = None
        self.plan: Plan | None = None
        self.tasks = BackgroundTasks()  # what the peer runs beside its upkeep; all awaited on shutdown
        self.reputation = PeerReputation(cfg, self.identity, self.dht, self.checkpoint.dht_prefix, self.checkpoint.num_blocks)
        # this peer's trust as the seeds' view has it, for the status line (n/a without --trusted-peers)
        self.trust_provider: TrustProvider | None = lambda: self.reputation.node.trust_from_seeds(self.reputation.node.peer_id)

    @property
    def name(self) -> str:
        return self.checkpoint.manifest.name

    def announce(self, state: ServerState, ttl: float = records.RECORD_TTL) -> None:
        assert self.plan is not None
        info = ServerInfo(
            state=state,
            start=self.plan.start,
            end=self.plan.end,
            throughput=float(self.handler.advertised_throughput() if self.handler else 0.0),
            dtype=str(self.cfg.torch_dtype()).removeprefix("torch."),
            compression=compression_tag(self.cfg),
            cache_tokens_left=self.handler.info().cache_tokens_left if self.handler else self.plan.cache_tokens,
            version=swarm.__version__,
            public_name=self.cfg.public_name,
            relays=list(self.reach.relays),
            reachable=self.reach.reachable,
        )
        if not records.announce(self.dht, self.checkpoint.dht_prefix, range(self.plan.start, self.plan.end), info, self.subkey, ttl):
            logger.warning(f"Announcing {state.value} was not stored by any DHT node")

    async def serve(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        self.plan = await loop.run_in_executor(None, plan_blocks, self.cfg, self.checkpoint, self.model_config, self.dht)
        await loop.run_in_executor(None, self.announce, ServerState.JOINING)
        logger.info(f"Joining as {self.dht.peer_id} with blocks {self.plan.start}:{self.plan.end} of {self.name}")
        span = await loop.run_in_executor(
            None, build_span, self.checkpoint, self.model_config, self.plan.start, self.plan.end, self.cfg
        )
        throughput = measure_throughput(span, self.model_config.hidden_size, self.cfg)
        handler_cfg = HandlerConfig(
            dht_prefix=self.checkpoint.dht_prefix,
            dtype=self.cfg.torch_dtype(),
            device=self.cfg.torch_device(),
            hidden_size=self.model_config.hidden_size,
            max_length=self.cfg.max_length,
            max_sessions=self.cfg.max_sessions,
            session_idle_timeout=self.cfg.session_idle_timeout,
            max_train_tokens=self.cfg.max_train_tokens,
            batch_sessions=self.cfg.batch_sessions,
            prefill_chunk_tokens=self.cfg.prefill_chunk_tokens,
        )
        self.handler = self.handler_factory(span, handler_cfg, throughput, self.plan.cache_tokens)
        self.reputation.equip(self.handler, compression=compression_tag(self.cfg))
        p2p: P2P = await self.dht.replicate_p2p()
        await self.handler.add_p2p_handlers(p2p)
        for service in (self.dial_back, self.forwarder):
            if service is not None:
                await service.add_p2p_handlers(p2p)
        await self.reputation.start(p2p, stop)
        try:
            self.tasks.start(log_status(self.handler, stop, self.cfg.status_interval, self.trust_provider), name="status line")
            for name, work in self.handler.background_work(p2p, self.reputation, stop):
                self.tasks.start(work, name=name)
            if self.keeps_relays:
                keeper = RelayKeeper(p2p, [PeerID.from_base58(r) for r in self.reach.relays], self._candidate_relays,
                                     self._relays_changed, period=self.cfg.relay_renew_period)
                self.tasks.start(keeper.run(stop), name="relays")
            await loop.run_in_executor(None, self.announce, ServerState.ONLINE)
            logger.info(
                f"ONLINE: serving blocks {self.plan.start}:{self.plan.end} of {self.name} as {self.dht.peer_id} "
                f"({self.handler.advertised_throughput():.1f} block-steps/s, {self.cfg.torch_dtype()}) at "
                f"{' '.join(str(a) for a in self.dht.get_visible_maddrs())}"
            )
            await self.keep_serving(stop)
        finally:
            await self.tasks.close()
            logger.info("Shutting down: announcing OFFLINE")
            # Same TTL as ONLINE: the DHT keeps whichever record of a subkey expires last.
            await loop.run_in_executor(None, self.announce, ServerState.OFFLINE)
            await self.reputation.stop(p2p)
            await self.handler.remove_p2p_handlers(p2p)
            for service in (self.dial_back, self.forwarder):
                if service is not None:
                    await service.remove_p2p_handlers(p2p)
            self.handler.shutdown()

    async def keep_serving(self, stop: asyncio.Event) -> None:
        """Until `stop`: free idle sessions, re-announce every refresh period, and (unless pinned to
        --blocks) move now and then to where the swarm needs blocks most. A failed move ends the peer."""
        loop = asyncio.get_running_loop()
        rebalances = self.cfg.blocks is None and self.cfg.rebalance_period > 0
        announced = checked = time.monotonic()
        next_check = self._jittered(self.cfg.rebalance_period)
        failure: Exception | None = None

        async def upkeep() -> None:
            nonlocal announced, checked, next_check, failure
            self.handler.expire_idle_sessions()
            if rebalances and time.monotonic() - checked >= next_check:
                try:
                    await self.maybe_move(stop)
                except Exception as e:  # half-moved: the old blocks are gone, so the peer cannot serve on
                    failure = e
                    stop.set()
                    return
                checked, next_check = time.monotonic(), self._jittered(self.cfg.rebalance_period)
            if self._announce_now or time.monotonic() - announced >= self.cfg.refresh_period:
                self._announce_now = False
                await loop.run_in_executor(None, self.announce, ServerState.ONLINE)
                announced = time.monotonic()

        await run_periodically(
            upkeep, lambda: min(5.0, self.cfg.refresh_period, next_check), stop, name="peer upkeep", immediately=False
        )
        if failure is not None:
            raise failure

    def _read_public_peers(self, dht: DHT) -> list[PeerID]:
        return public_peers(records.read_spans(dht, self.checkpoint.dht_prefix, self.checkpoint.num_blocks))

    async def _candidate_relays(self) -> list[PeerID]:
        """Relays to try when one goes away: the helpers that relayed when this peer joined, then public peers."""
        loop = asyncio.get_running_loop()
        public = await loop.run_in_executor(None, self._read_public_peers, self.dht)
        return list(dict.fromkeys([*self._relay_candidates, *public]))

    def _relays_changed(self, relays: list[PeerID]) -> None:
        self.reach = Reachability(relays=tuple(map(str, relays)), reachable=bool(relays))
        self._announce_now = True

    @staticmethod
    def _jittered(period: float) -> float:
        """Checks at random offsets, so peers that joined together do not all move at once."""
        return period * random.uniform(0.75, 1.25) if period > 0 else float("inf")

    async def maybe_move(self, stop: asyncio.Event) -> None:
        """Move to the blocks the swarm needs most, if that helps by a clear margin (peers.selection)."""
        loop = asyncio.get_running_loop()
        spans = await loop.run_in_executor(None, records.read_spans, self.dht, self.checkpoint.dht_prefix, self.checkpoint.num_blocks)
        target = rebalance_target(spans, self.dht.peer_id, self.checkpoint.num_blocks)
        if target is None or stop.is_set():
            return
        old = self.plan
        new = Plan(target, target + (old.end - old.start), old.cache_tokens)
        logger.info(f"Moving from blocks {old.start}:{old.end} to {new.start}:{new.end}: the swarm needs them more")
        self.handler.draining = True
        deadline = time.monotonic() + self.cfg.drain_timeout
        while self.handler.sessions() and time.monotonic() < deadline:
            if await wait_or_stop(stop, 0.5):
                break
        await loop.run_in_executor(None, self.announce, ServerState.OFFLINE)
        self.plan = new
        self.handler.span.release()  # free the old blocks before loading the new ones
        span = await loop.run_in_executor(None, build_span, self.checkpoint, self.model_config, new.start, new.end, self.cfg)
        self.handler.replace_span(span, measure_throughput(span, self.model_config.hidden_size, self.cfg))
        self.handler.draining = False
        await loop.run_in_executor(None, self.announce, ServerState.ONLINE)
        logger.info(f"ONLINE: serving blocks {new.start}:{new.end} of {self.name} as {self.dht.peer_id} "
                    f"({self.handler.advertised_throughput():.1f} block-steps/s) after moving")

    def shutdown(self) -> None:
        self.dht.shutdown()
        if self.identity.temporary:
            self.identity.path.unlink(missing_ok=True)


def run_peer(cfg: PeerConfig, handler_factory: HandlerFactory = BlockHandler) -> None:
    """Run until SIGINT or SIGTERM, then leave the swarm cleanly."""
    peer = Peer(cfg, handler_factory)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await peer.serve(stop)

    try:
        asyncio.run(main())
    finally:
        peer.shutdown()
