"""A bootstrap node: a DHT node that others join, which also checks newcomers' reachability and relays for them."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Callable, Sequence

from peers.dialback import DialBackService
from peers.forwarder import Forwarder
from swarm.network import create_dht, load_identity, signer_for

logger = logging.getLogger(__name__)


def run_bootstrap(*, host: str, port: int, identity: Path | None, initial_peers: Sequence[str], relay_service: bool,
                  on_ready: Callable[[list[str]], None]) -> None:
    """Serve until SIGINT or SIGTERM; `on_ready` gets the node's multiaddrs once it is up."""
    ident = load_identity(identity)
    # Model-independent validation only: records under an owner's key must carry that owner's signature.
    dht = create_dht(initial_peers=initial_peers, host=host, port=port, identity=ident,
                     validators=[signer_for(ident)])

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        p2p = await dht.replicate_p2p()
        services = [DialBackService(relays=relay_service), *([Forwarder()] if relay_service else [])]
        for service in services:
            await service.add_p2p_handlers(p2p)
        on_ready([str(a) for a in dht.get_visible_maddrs()])
        relaying = "relays for peers that cannot be dialled" if relay_service else "relays for nobody"
        logger.info(f"Bootstrap node {dht.peer_id} is up ({relaying}); stop it with Ctrl+C")
        await stop.wait()
        for service in services:
            await service.remove_p2p_handlers(p2p)

    try:
        asyncio.run(serve())
    finally:
        dht.shutdown()
        if ident.temporary:
            ident.path.unlink(missing_ok=True)
