"""Emulated WAN links on loopback: a TCP relay that delays every byte by a set one-way time.

`tc netem` is not available on the machines this project runs on, so a benchmark puts a `DelayRelay` in front of
each peer and has the peer announce the relay's address instead of its own (`swarm-peer join --announce-maddrs`).
Whoever dials the peer (clients and other peers) then crosses a link with that delay in each direction: a round
trip through one relay costs 2 x delay.

Each chunk read from one side is written to the other `delay` seconds after it was read (later if the optional
bandwidth cap queues it behind earlier chunks), in order. A reader and a writer task per direction share a queue
of (arrival time, bytes), so many chunks are in flight at once: the delay adds latency but does not cap throughput.
Timers run on the event loop, so a chunk arrives up to ~1 ms late (epoll's resolution), never early.

`python -m peers.testing.netem --delay-ms 10 --target PORT [--target PORT ...]` runs relays in a process of their
own (so whoever measures shares no event loop with them); `RelayProcess` starts and steers one (benchmarks/wan.py).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Sequence

logger = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024  # most bytes read (and delivered) as one chunk
MAX_CHUNKS_IN_FLIGHT = 256  # per direction; a full queue stops reading, as a full TCP window would


@dataclass(frozen=True)
class LinkConfig:
    delay: float = 0.0  # one-way delay in seconds, applied to each direction
    bandwidth: float | None = None  # bytes per second per direction of each connection; None: unlimited


@dataclass
class LinkClock:
    """When each chunk sent over one direction of a link arrives: a pure function of send times and sizes."""

    busy_until: float = 0.0  # when the bandwidth-capped sender finishes the chunks it has so far
    last_arrival: float = 0.0

    def arrival(self, now: float, size: int, config: LinkConfig) -> float:
        sent = now
        if config.bandwidth:
            sent = max(now, self.busy_until) + size / config.bandwidth
            self.busy_until = sent
        # never before the chunk ahead of it, even just after the delay was lowered: a link keeps its order
        self.last_arrival = max(self.last_arrival, sent + config.delay)
        return self.last_arrival


@dataclass
class RelayStats:
    connections: int = 0  # connections accepted and joined to the target
    bytes_to_target: int = 0
    bytes_from_target: int = 0


@dataclass
class DelayRelay:
    """Listens on `host:port` (0: any free port), joins each connection to `target_host:target_port` through a
    delayed link. `config` may be replaced while it runs; chunks read afterwards get the new one."""

    target_port: int
    config: LinkConfig = field(default_factory=LinkConfig)
    host: str = "127.0.0.1"
    port: int = 0
    target_host: str = "127.0.0.1"
    stats: RelayStats = field(default_factory=RelayStats)
    _server: asyncio.Server | None = field(default=None, repr=False)
    _connections: set[asyncio.Task] = field(default_factory=set, repr=False)

    async def start(self) -> int:
        """Start listening; the port listened on."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info(f"Relaying {self.host}:{self.port} -> {self.target_host}:{self.target_port} "
                    f"with {self.config.delay * 1000:g} ms each way")
        return self.port

    async def close(self) -> None:
        """Stop listening and cut every open connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> DelayRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _serve(self, near_reader: asyncio.StreamReader, near_writer: asyncio.StreamWriter) -> None:
        """One accepted connection (asyncio runs this as a task; `close` cancels it)."""
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            try:
                far_reader, far_writer = await asyncio.open_connection(self.target_host, self.target_port)
            except OSError as e:  # the target is not listening (yet): refuse, as the target itself would
                logger.debug(f"Relay {self.port}: cannot reach {self.target_host}:{self.target_port}: {e!r}")
                return
            self.stats.connections += 1
            tasks = [*self._pipe(near_reader, far_writer, to_target=True),
                     *self._pipe(far_reader, near_writer, to_target=False)]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for error in (t.exception() for t in done if not t.cancelled()):
                    if isinstance(error, OSError):  # one side went away (reset, broken pipe): cut the link
                        logger.debug(f"Relay {self.port}: link closed: {error!r}")
                    elif error is not None:
                        logger.warning(f"Relay {self.port}: link failed: {error!r}")
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                far_writer.close()
        finally:
            near_writer.close()
            self._connections.discard(task)

    def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
              to_target: bool) -> tuple[asyncio.Task, asyncio.Task]:
        """One direction of the link: a reader that stamps chunks with their arrival time, a writer that delivers them
        then (both owned by `_serve`, which awaits them)."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(MAX_CHUNKS_IN_FLIGHT)
        return asyncio.create_task(self._read(reader, queue, to_target)), asyncio.create_task(self._write(writer, queue))

    async def _read(self, reader: asyncio.StreamReader, queue: asyncio.Queue, to_target: bool) -> None:
        loop, clock = asyncio.get_running_loop(), LinkClock()
        while data := await reader.read(CHUNK_BYTES):
            await queue.put((clock.arrival(loop.time(), len(data), self.config), data))
            if to_target:
                self.stats.bytes_to_target += len(data)
            else:
                self.stats.bytes_from_target += len(data)
        await queue.put(None)  # end of stream, delivered after every chunk before it

    @staticmethod
    async def _write(writer: asyncio.StreamWriter, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while (item := await queue.get()) is not None:
            arrival, data = item
            if (wait := arrival - loop.time()) > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()  # half-close: the other direction may still be sending


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now: for a peer to listen on behind a relay started before it."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


# --- relays in a process of their own -------------------------------------------------------------------------

READY_LINE = "READY"


async def serve_relays(targets: Sequence[int], config: LinkConfig, host: str = "127.0.0.1") -> None:
    """Run one relay per target port until stdin closes; print `RELAY <port> <target port>` per relay, then READY.

    Commands on stdin, one per line: `delay MS` (every relay, from now on) answers `ok`; `stats` answers one JSON
    line {target port: RelayStats}.
    """
    relays = [DelayRelay(target, config, host=host, target_host=host) for target in targets]
    try:
        for relay in relays:
            print(f"RELAY {await relay.start()} {relay.target_port}", flush=True)
        print(READY_LINE, flush=True)
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        while line := (await stdin.readline()).decode().strip():
            command, *args = line.split()
            if command == "delay" and len(args) == 1:
                for relay in relays:
                    relay.config = dataclasses.replace(relay.config, delay=float(args[0]) / 1000)
                logger.info(f"Delay set to {args[0]} ms each way")
                print("ok", flush=True)
            elif command == "stats":
                print(json.dumps({r.target_port: dataclasses.asdict(r.stats) for r in relays}), flush=True)
            else:
                print(f"error: unknown command {line!r}", flush=True)
    finally:
        await asyncio.gather(*(relay.close() for relay in relays))


class RelayProcess:
    """`serve_relays` in a child process: `ports[target] -> relay port`, `set_delay`, `stats`; `close` ends it."""

    def __init__(self, targets: Sequence[int], delay_ms: float = 0.0, python: str = sys.executable):
        self.process = subprocess.Popen(
            [python, "-m", "peers.testing.netem", "--delay-ms", str(delay_ms),
             *(arg for target in targets for arg in ("--target", str(target)))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.ports: dict[int, int] = {}
        while (line := self.process.stdout.readline().strip()) != READY_LINE:
            if not line:
                self.close()
                raise RuntimeError("the relay process exited before it was ready")
            _, port, target = line.split()
            self.ports[int(target)] = int(port)

    def _ask(self, command: str) -> str:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def set_delay(self, delay_ms: float) -> None:
        if (answer := self._ask(f"delay {delay_ms}")) != "ok":
            raise RuntimeError(f"the relay process refused the delay: {answer}")

    def stats(self) -> dict[int, RelayStats]:
        return {int(target): RelayStats(**s) for target, s in json.loads(self._ask("stats")).items()}

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()  # EOF on stdin: the relays close their connections and the process exits
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> RelayProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=int, action="append", required=True, help="TCP port to relay to (repeat)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay of each link, in ms")
    parser.add_argument("--bandwidth-mbit", type=float, help="cap per direction of each connection, in Mbit/s")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on and to relay to")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    bandwidth = args.bandwidth_mbit * 1e6 / 8 if args.bandwidth_mbit else None
    asyncio.run(serve_relays(args.target, LinkConfig(args.delay_ms / 1000, bandwidth), args.host))


if __name__ == "__main__":
    main()
