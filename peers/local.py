"""A swarm of real peer processes on 127.0.0.1, for the demo, tests, benchmarks and examples.

Every process runs in its own session (process group), so stopping the swarm also stops each peer's
DHT process and p2pd daemon, even after a SIGKILL of the peer itself.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

logger = logging.getLogger(__name__)

ONLINE_LINE = re.compile(r"ONLINE: serving blocks (\d+):(\d+) of \S+ as (\S+)")


@dataclass
class PeerProcess:
    name: str
    process: subprocess.Popen
    log_path: Path
    peer_id: str | None = None
    addresses: str = ""  # a bootstrap node's multiaddrs, comma-separated

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def online(self) -> bool:
        """Alive, and it has announced its blocks (a restarted peer still loading is alive but not online)."""
        return self.alive() and ONLINE_LINE.search(self.log()) is not None

    def signal(self, sig: int) -> None:
        """Signal the peer's main process only (as a terminal's Ctrl+C or `docker stop` would)."""
        if self.alive():
            self.process.send_signal(sig)

    def kill_group(self) -> None:
        """SIGKILL the peer and every process it started (DHT process, p2pd)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


@dataclass
class LocalSwarm:
    """Start with `with LocalSwarm(...) as swarm:`; add peers with `swarm.add_peer("0:10")`."""

    model: str = "smollm2-135m"
    extra_env: dict[str, str] = field(default_factory=dict)
    log_dir: Path | None = None
    startup_timeout: float = 300.0  # seconds for a peer to load its blocks and come ONLINE
    initial_peers: str = ""
    host: str = "127.0.0.1"  # interface every node listens on
    launcher: tuple[str, ...] = ()  # prefix of every node's command, e.g. `ip netns exec NAME` (peers.natlab)
    peer_threads: int | None = None  # every peer's --num-threads (None: the peer's default, one per core)
    processes: list[PeerProcess] = field(default_factory=list)

    def __enter__(self) -> "LocalSwarm":
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="efedllm-swarm-"))
        self.start_bootstrap()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def env(self) -> dict[str, str]:
        env = {**os.environ, **self.extra_env, "PYTHONUNBUFFERED": "1"}
        if self.initial_peers:
            env["SWARM_INITIAL_PEERS"] = self.initial_peers
        return env

    def _spawn(self, name: str, args: Sequence[str], stdout=subprocess.DEVNULL,
               launcher: Sequence[str] | None = None) -> PeerProcess:
        log_path = self.log_dir / f"{name}.log"
        command = [*(self.launcher if launcher is None else launcher), sys.executable, "-m", "peers.cli", *args]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                command, stdout=stdout, stderr=log, stdin=subprocess.DEVNULL, env=self.env, start_new_session=True
            )
        peer = PeerProcess(name, process, log_path)
        self.processes.append(peer)
        return peer

    def start_bootstrap(self) -> None:
        try:
            self.initial_peers = self.add_bootstrap("bootstrap").addresses
        except RuntimeError:
            self.stop()
            raise
        logger.info(f"Bootstrap node at {self.initial_peers}")

    def add_bootstrap(self, name: str, *extra_args: str) -> PeerProcess:
        """Another bootstrap node (joined to the swarm's first one, if any); its multiaddrs in `.addresses`."""
        boot = self._spawn(name, ["bootstrap", "--host", self.host, *extra_args], stdout=subprocess.PIPE)
        line = boot.process.stdout.readline().decode().strip()
        if not line.startswith("SWARM_INITIAL_PEERS="):
            boot.kill_group()
            raise RuntimeError(f"bootstrap node {name} failed to start: {boot.log()[-2000:]}")
        boot.addresses = line.split("=", 1)[1]
        boot.peer_id = boot.addresses.split(",")[0].rsplit("/p2p/", 1)[-1]
        return boot

    def add_peer(self, blocks: str | None = None, *extra_args: str, wait: bool = True, name: str | None = None,
                 launcher: Sequence[str] | None = None) -> PeerProcess:
        args = ["join", "--model", self.model, "--host", self.host, *extra_args]
        if self.peer_threads is not None:
            args += ["--num-threads", str(self.peer_threads)]
        if blocks is not None:
            args += ["--blocks", blocks]
        peer = self._spawn(name or f"peer{len(self.processes)}", args, launcher=launcher)
        if wait:
            self.wait_online(peer)
        return peer

    def add_peers(self, *specs: tuple[str, str | None, Sequence[str]]) -> list[PeerProcess]:
        """Start peers given as (name, blocks, extra args) side by side, then wait until all are online."""
        peers = [self.add_peer(blocks, *args, wait=False, name=name) for name, blocks, args in specs]
        for peer in peers:
            self.wait_online(peer)
        return peers

    def wait_online(self, peer: PeerProcess, timeout: float | None = None) -> str:
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        while time.monotonic() < deadline:
            match = ONLINE_LINE.search(peer.log())
            if match:
                peer.peer_id = match.group(3)
                return peer.peer_id
            if not peer.alive():
                raise RuntimeError(f"{peer.name} exited with {peer.process.returncode}: {peer.log()[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"{peer.name} did not come online in time: {peer.log()[-3000:]}")

    def stop(self) -> None:
        """Ask every peer to leave (SIGINT), bootstrap node last, then make sure nothing is left behind."""
        for group in (self.processes[1:], self.processes[:1]):
            for peer in group:
                peer.signal(signal.SIGINT)
            deadline = time.monotonic() + 15
            for peer in group:
                try:
                    peer.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    logger.warning(f"{peer.name} did not stop in time; killing it")
                peer.kill_group()
        self.processes.clear()


@contextmanager
def swarm_or_local(blocks: Sequence[str] = ("0:10", "10:20", "20:30"), *peer_args: str,
                   model: str = "smollm2-135m") -> Iterator[str]:
    """Yield the initial peers of the swarm named by $SWARM_INITIAL_PEERS, or of a new local swarm whose
    peers serve `blocks` (each started with `peer_args`), stopped on exit. For examples and demos."""
    existing = os.environ.get("SWARM_INITIAL_PEERS", "")
    if existing:
        yield existing
        return
    with LocalSwarm(model=model) as swarm:
        peers = [swarm.add_peer(span, *peer_args, wait=False) for span in blocks]
        for peer in peers:
            swarm.wait_online(peer)
        yield swarm.initial_peers
