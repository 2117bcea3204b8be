"""`swarm-peer health` (the container health check) and the peer's periodic status line, on a real peer."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from peers.local import LocalSwarm

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def health(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peers.cli", "health", *args], env=env, capture_output=True,
                          text=True, timeout=60)


def test_health_check_and_status_line(tmp_path):
    key, port = tmp_path / "peer.key", free_port()
    with LocalSwarm() as swarm:
        peer = swarm.add_peer("0:1", "--identity", str(key), "--port", str(port), "--status-interval", "1")
        checks = [("--port", str(port), "--identity", str(key)),
                  ("--port", str(port), "--identity", str(key), "--dht-only"),
                  ("--port", str(free_port()), "--identity", str(key), "--timeout", "3"),
                  ("--port", str(port), "--identity", str(tmp_path / "none.key"))]
        with ThreadPoolExecutor(len(checks)) as pool:  # separate processes, at once (each is mostly imports)
            served, dht_only, closed, missing = pool.map(lambda args: health(swarm.env, *args), checks)
        assert served.returncode == 0, served.stdout + served.stderr
        assert re.match(rf"healthy: peer {peer.peer_id} serves blocks 0:1 \(0 sessions", served.stdout)
        assert dht_only.returncode == 0
        assert closed.returncode == 1 and closed.stdout.startswith("unhealthy: node"), closed.stdout
        assert missing.returncode == 1 and "no identity file" in missing.stdout

        deadline = time.monotonic() + 30
        pattern = re.compile(r"status: 0 sessions, \d+ tokens served \(\+\d+ in 1 s\), cache 0/\d+ tokens \(0\.0%\), "
                             r"trust=n/a")
        while not pattern.search(peer.log()):
            assert time.monotonic() < deadline, peer.log()[-2000:]
            time.sleep(0.5)
