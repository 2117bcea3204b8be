"""The `swarm-peer` command: bootstrap a swarm, join it with a span of blocks, show its coverage."""

from __future__ import annotations

from swarm.runtime import prefer_passive_openmp, quiet_libraries

prefer_passive_openmp()  # before torch is imported

import json
import logging
import sys
from pathlib import Path

import click

from peers.config import DTYPES, PeerConfig, parse_announce_maddrs, parse_block_range
from swarm.errors import SwarmError
from swarm.models import DEFAULT_MODEL
from swarm.network import initial_peers_from, trusted_peers_from

logger = logging.getLogger(__name__)

INITIAL_PEERS_HELP = "Multiaddrs of peers in the swarm (repeat, or comma/space-separated). Default: $SWARM_INITIAL_PEERS."
TRUSTED_HELP = "Peer ids of pre-trusted seeds, e.g. the bootstrap operators (repeat, or comma-separated). Default: $SWARM_TRUSTED_PEERS."


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    quiet_libraries(verbose)


def fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


class SwarmCommand(click.Command):
    """Turns this project's errors into one line on stderr and exit code 2 (never a traceback)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SwarmError as e:
            fail(str(e))
        except KeyboardInterrupt:
            sys.exit(130)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """Serve blocks of a large language model to the swarm."""
    setup_logging(verbose)


ANNOUNCE_HELP = ("Tell others to dial these multiaddrs instead of the listening ones (repeat, or comma-separated), e.g. "
                 "/ip4/203.0.113.5/tcp/31337: a forwarded port, or an emulated WAN link (benchmarks/wan.py).")
RELAY_HELP = ("auto: through a relay only if nobody can dial this peer (checked as it joins); always; never "
              "($SWARM_RELAY).")
NUM_THREADS_HELP = ("Torch threads for the blocks on a CPU ($SWARM_NUM_THREADS; default: one per core). Peers that share a "
                    "machine compute in turn: give each its share of the cores (1 for three peers on 2 cores).")
NO_RELAY_SERVICE_HELP = "Do not relay for peers that cannot be dialled (by default every reachable node does)."


@main.command(cls=SwarmCommand)
@click.option("--host", default="0.0.0.0", show_default=True, envvar="SWARM_HOST", help="Interface to listen on ($SWARM_HOST).")
@click.option("--port", default=0, type=click.IntRange(0, 65535), envvar="SWARM_PORT", help="TCP port ($SWARM_PORT; default: any free port).")
@click.option("--identity", type=click.Path(dir_okay=False, path_type=Path), envvar="SWARM_IDENTITY", help="Identity file; keeps the peer id across restarts ($SWARM_IDENTITY).")
@click.option("--initial-peers", multiple=True, help="Join an existing DHT instead of starting a new one.")
@click.option("--no-relay-service", is_flag=True, help=NO_RELAY_SERVICE_HELP)
def bootstrap(host: str, port: int, identity: Path | None, initial_peers: tuple[str, ...], no_relay_service: bool) -> None:
    """Start a DHT node that others join; print SWARM_INITIAL_PEERS=<multiaddr> on stdout."""
    from peers.bootstrap import run_bootstrap

    def announce(addresses: list[str]) -> None:
        click.echo(f"SWARM_INITIAL_PEERS={','.join(addresses)}")
        sys.stdout.flush()

    run_bootstrap(host=host, port=port, identity=identity, initial_peers=initial_peers_from(initial_peers, {}),
                  relay_service=not no_relay_service, on_ready=announce)


@main.command(cls=SwarmCommand)
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Alias, Hugging Face repo id or local path.")
@click.option("--blocks", help="Serve exactly these blocks, START:END (END exclusive).")
@click.option("--num-blocks", type=click.IntRange(min=1), help="Serve this many blocks, where the swarm needs them most.")
@click.option("--initial-peers", multiple=True, help=INITIAL_PEERS_HELP)
@click.option("--host", default="0.0.0.0", show_default=True, envvar="SWARM_HOST", help="Interface to listen on ($SWARM_HOST).")
@click.option("--port", default=0, type=click.IntRange(0, 65535), envvar="SWARM_PORT", help="TCP port ($SWARM_PORT; default: any free port).")
@click.option("--announce-maddrs", multiple=True, help=ANNOUNCE_HELP)
@click.option("--identity", type=click.Path(dir_okay=False, path_type=Path), envvar="SWARM_IDENTITY", help="Identity file; keeps the peer id across restarts ($SWARM_IDENTITY).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--num-threads", type=click.IntRange(min=1), envvar="SWARM_NUM_THREADS", help=NUM_THREADS_HELP)
@click.option("--dtype", type=click.Choice(["auto", *DTYPES]), default="auto", show_default=True, help="auto: the checkpoint's dtype (float32 for the default model, bfloat16/float16 for most 7B checkpoints); a float16 checkpoint on CPU computes in bfloat16.")
@click.option("--max-length", default=4096, show_default=True, type=click.IntRange(min=1), help="Longest session accepted, in tokens.")
@click.option("--max-sessions", default=64, show_default=True, type=click.IntRange(min=1), help="Open sessions served at once.")
@click.option("--max-train-tokens", default=8192, show_default=True, type=click.IntRange(min=0), help="Largest training request (batch x tokens) served; 0: inference only.")
@click.option("--batch-sessions/--no-batch-sessions", default=True, show_default=True, help="Run decode steps of different sessions that wait together as one batched forward.")
@click.option("--prefill-chunk-tokens", default=512, show_default=True, type=click.IntRange(min=1), help="Run longer prompts in chunks of this many tokens, between other sessions' decode steps.")
@click.option("--cache-tokens", type=click.IntRange(min=1), help="KV-cache budget in tokens (sessions reserve batch x max length). Default: from free memory.")
@click.option("--max-cache-gb", type=click.FloatRange(min=0, min_open=True), help="KV-cache budget in GiB, instead of --cache-tokens.")
@click.option("--session-idle-timeout", default=600.0, show_default=True, type=click.FloatRange(min=1), help="Seconds without a step before a session's cache is freed.")
@click.option("--rebalance-period", default=120.0, show_default=True, type=click.FloatRange(min=0), help="Seconds between checks whether moving would help the swarm (0: never). Peers given --blocks never move.")
@click.option("--public-name", default="", help="A name shown in `swarm-peer status`.")
@click.option("--svd-rank", type=int, help="Replace each linear layer by rank-R factors (where that saves memory).")
@click.option("--svd-energy", type=float, help="Keep the singular values holding this fraction of the energy, e.g. 0.95.")
@click.option("--svd-params", type=float, help="Keep this fraction of each linear layer's parameters, e.g. 0.5.")
@click.option("--svd-method", type=click.Choice(["plain", "activation-aware"]), default="plain", show_default=True,
              help="activation-aware: whiten by calibration-text activations before truncating.")
@click.option("--quant", type=click.Choice(["none", "int8", "nf4"]), default="none", show_default=True,
              help="Quantise weights with bitsandbytes.")
@click.option("--offload", type=click.Choice(["none", "cpu", "disk"]), default="none", show_default=True,
              help="Keep weights in host RAM (GPU peer) or on disk; bring them in block by block.")
@click.option("--trusted-peers", multiple=True, help=TRUSTED_HELP)
@click.option("--gossip-period", default=5.0, show_default=True, type=click.FloatRange(min=0.1), help="Seconds between exchanges of attestations with other peers.")
@click.option("--adversary", hidden=True, help="Misbehave on purpose, for tests: random, skip, noise, cheap-quant, cheat:Q, "
              "collude, junk-info, nan, wrong-shape, padded-only, sybil, steer:R (peers.testing.adversaries).")
@click.option("--fellows", hidden=True, default="", help="Comma-separated peer ids a colluding adversary vouches for.")
@click.option("--status-interval", default=60.0, show_default=True, type=click.FloatRange(min=0), help="Seconds between status lines in the log (0: none).")
@click.option("--relay", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True, envvar="SWARM_RELAY", help=RELAY_HELP)
@click.option("--no-relay-service", is_flag=True, help=NO_RELAY_SERVICE_HELP)
@click.option("--relay-renew-period", hidden=True, default=20.0, type=click.FloatRange(min=0.1),
              help="Seconds between renewals of relay registrations (a relay gone for two is replaced).")
def join(model, blocks, num_blocks, initial_peers, host, port, announce_maddrs, identity, device, num_threads, dtype,
         max_length, max_sessions, max_train_tokens, batch_sessions, prefill_chunk_tokens, cache_tokens, max_cache_gb,
         session_idle_timeout, rebalance_period, public_name,
         svd_rank, svd_energy, svd_params, svd_method, quant, offload, trusted_peers, gossip_period,
         adversary, fellows, status_interval, relay, no_relay_service, relay_renew_period) -> None:
    """Load a span of blocks and serve it until Ctrl+C or SIGTERM."""
    from peers.compression import check_options
    from peers.handler import BlockHandler
    from peers.server import run_peer

    if blocks and num_blocks:
        raise click.UsageError("give --blocks or --num-blocks, not both")
    if cache_tokens and max_cache_gb:
        raise click.UsageError("give --cache-tokens or --max-cache-gb, not both")
    cfg = PeerConfig(
        model=model,
        initial_peers=tuple(initial_peers_from(initial_peers)),
        blocks=parse_block_range(blocks) if blocks else None,
        num_blocks=num_blocks,
        host=host,
        port=port,
        announce_maddrs=parse_announce_maddrs(announce_maddrs),
        identity=identity,
        device=device,
        num_threads=num_threads,
        dtype=dtype,
        max_length=max_length,
        cache_tokens=cache_tokens,
        max_cache_bytes=None if max_cache_gb is None else int(max_cache_gb * 2**30),
        max_sessions=max_sessions,
        max_train_tokens=max_train_tokens,
        batch_sessions=batch_sessions,
        prefill_chunk_tokens=prefill_chunk_tokens,
        session_idle_timeout=session_idle_timeout,
        rebalance_period=rebalance_period,
        public_name=public_name,
        svd_rank=svd_rank,
        svd_energy=svd_energy,
        svd_params=svd_params,
        svd_method=svd_method,
        quant=quant,
        offload=offload,
        trusted_peers=trusted_peers_from(trusted_peers),
        gossip_period=gossip_period,
        status_interval=status_interval,
        relay=relay,
        relay_service=not no_relay_service,
        relay_renew_period=relay_renew_period,
    )
    check_options(cfg)
    handler_factory = BlockHandler
    if adversary is not None:  # a bad --adversary fails here, before the model loads
        from peers.testing.adversaries import parse_adversary

        handler_factory = parse_adversary(adversary, tuple(f for f in fellows.replace(",", " ").split() if f),
                                          model=cfg.model, cache_dir=cfg.cache_dir)
    run_peer(cfg, handler_factory)


@main.command(cls=SwarmCommand)
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Alias, Hugging Face repo id or local path.")
def fetch(model: str) -> None:
    """Download (if needed) and convert a model into the per-block cache, then exit."""
    from swarm.models import open_model

    checkpoint = open_model(model)
    click.echo(f"{checkpoint.manifest.name}: {checkpoint.num_blocks} blocks in {checkpoint.path}")


def swarm_view_options(command):
    """The options of the commands that look at the swarm from outside (status, rewards)."""
    for option in reversed((
        click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Alias, Hugging Face repo id or local path."),
        click.option("--initial-peers", multiple=True, help=INITIAL_PEERS_HELP),
        click.option("--trusted-peers", multiple=True, help=TRUSTED_HELP),
        click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table."),
    )):
        command = option(command)
    return command


@main.command(cls=SwarmCommand)
@swarm_view_options
def status(model: str, initial_peers: tuple[str, ...], trusted_peers: tuple[str, ...], as_json: bool) -> None:
    """Show which peers serve which blocks: state, throughput, round-trip time and trust."""
    from peers.status import collect_status, render_table

    report = collect_status(model, initial_peers_from(initial_peers), trusted_peers_from(trusted_peers))
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else render_table(report))


@main.command(cls=SwarmCommand)
@swarm_view_options
def rewards(model: str, initial_peers: tuple[str, ...], trusted_peers: tuple[str, ...], as_json: bool) -> None:
    """Show the reward standings: credit for countersigned work, weighted by trust (gathered by gossip)."""
    from peers.status import collect_standings, render_rewards

    standings = collect_standings(model, initial_peers_from(initial_peers), trusted_peers_from(trusted_peers))
    if as_json:
        click.echo(json.dumps([row.__dict__ for row in standings], indent=2))
    else:
        click.echo(render_rewards(standings))


@main.command(cls=SwarmCommand)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the peer is reachable at from here.")
@click.option("--port", required=True, type=click.IntRange(1, 65535), envvar="SWARM_PORT", help="The peer's TCP port ($SWARM_PORT).")
@click.option("--identity", required=True, type=click.Path(dir_okay=False, path_type=Path), envvar="SWARM_IDENTITY", help="The peer's identity file ($SWARM_IDENTITY).")
@click.option("--dht-only", is_flag=True, help="Only check that the DHT node answers (a bootstrap node).")
@click.option("--timeout", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
def health(host: str, port: int, identity: Path, dht_only: bool, timeout: float) -> None:
    """Exit 0 if the peer on this machine answers (and serves blocks), else 1: a container health check."""
    from peers.health import check_health

    result = check_health(host, port, identity, dht_only, timeout)
    click.echo(("healthy: " if result.healthy else "unhealthy: ") + result.message)
    sys.exit(0 if result.healthy else 1)


if __name__ == "__main__":
    main()
