"""What a round trip between two processes costs on this machine when the far side computes before it answers.

A peer computes its blocks for some milliseconds between receiving a step and replying; meanwhile both processes
(and, for hivemind, both p2pd daemons) sleep. This measures the round trip minus the compute time, for:

- raw TCP, the reply computed on the event loop's own thread (asyncio streams, no p2pd);
- raw TCP, computed on a worker thread (`run_in_executor`, as a peer's compute thread does);
- a hivemind stream (`P2P.iterate_protobuf_handler`, through two p2pd daemons), computed on a worker thread;

each with a [1, 1, 576] float32 payload (one token of the default model's hidden states) and compute gaps of 0 ms
(back to back), 12 ms (about one peer's 10 blocks of the default model) and 35 ms (all 30). The compute is a busy
loop of exactly that long. It is the floor under a swarm hop: a peer's real work only adds to it.

    python benchmarks/stream_floor.py [--steps 200] [--gaps 0,12,35]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2

PAYLOAD = 1 * 1 * 576 * 4  # bytes of one token's hidden states
HEADER = 4  # the gap in microseconds, little-endian


def compute(gap_us: int) -> None:
    """Keep this thread busy for `gap_us` microseconds (a peer running its blocks)."""
    end = time.perf_counter() + gap_us / 1e6
    while time.perf_counter() < end:
        pass


async def tcp_server(ready: mp.Queue, threaded: bool) -> None:
    pool = ThreadPoolExecutor(1)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                message = await reader.readexactly(HEADER + PAYLOAD)
                gap = int.from_bytes(message[:HEADER], "little")
                if threaded:
                    await asyncio.get_running_loop().run_in_executor(pool, compute, gap)
                else:
                    compute(gap)
                writer.write(message)
                await writer.drain()
        except asyncio.IncompleteReadError:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    ready.put(server.sockets[0].getsockname()[1])
    await server.serve_forever()


async def hivemind_server(ready: mp.Queue) -> None:
    pool = ThreadPoolExecutor(1)
    p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])

    async def echo(requests, context: P2PContext):
        async for request in requests:
            await asyncio.get_running_loop().run_in_executor(pool, compute, int(request.metadata.decode()))
            yield runtime_pb2.ExpertResponse(tensors=request.tensors)

    await p2p.add_protobuf_handler("echo", echo, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True)
    ready.put((p2p.peer_id.to_bytes(), [str(maddr) for maddr in await p2p.get_visible_maddrs()]))
    await asyncio.Event().wait()


def serve(kind: str, ready: mp.Queue) -> None:
    torch.set_num_threads(1)
    asyncio.run(hivemind_server(ready) if kind == "hivemind" else tcp_server(ready, threaded=kind == "tcp-thread"))


async def tcp_client(port: int, gaps: list[int], steps: int) -> dict[int, list[float]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = bytes(PAYLOAD)
    results = {}
    for gap in gaps:
        times = []
        for _ in range(steps):
            began = time.perf_counter()
            writer.write(gap.to_bytes(HEADER, "little") + body)
            await writer.drain()
            await reader.readexactly(HEADER + PAYLOAD)
            times.append((time.perf_counter() - began) * 1e6 - gap)
        results[gap] = times  # the warm-up series is overwritten by the measured one
    writer.close()
    return results


async def hivemind_client(server: tuple[bytes, list[str]], gaps: list[int], steps: int) -> dict[int, list[float]]:
    peer_id, maddrs = server
    p2p = await P2P.create(initial_peers=maddrs)
    queue: asyncio.Queue = asyncio.Queue()

    async def requests():
        while True:
            yield await queue.get()

    replies = await p2p.iterate_protobuf_handler(PeerID(peer_id), "echo", requests(), runtime_pb2.ExpertResponse)
    tensor = serialize_torch_tensor(torch.zeros(1, 1, 576))
    results = {}
    for gap in gaps:
        times = []
        for _ in range(steps):
            began = time.perf_counter()
            await queue.put(runtime_pb2.ExpertRequest(metadata=str(gap).encode(), tensors=[tensor]))
            await replies.__anext__()
            times.append((time.perf_counter() - began) * 1e6 - gap)
        results[gap] = times
    await p2p.shutdown()
    return results


def measure(kind: str, gaps: list[int], steps: int) -> dict[int, list[float]]:
    ready: mp.Queue = mp.Queue()
    server = mp.Process(target=serve, args=(kind, ready), daemon=True)
    server.start()
    try:
        address = ready.get(timeout=60)
        client = hivemind_client if kind == "hivemind" else tcp_client
        return asyncio.run(client(address, [0, *gaps], steps))  # the first gap-0 series warms up
    finally:
        server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="round trips per gap")
    parser.add_argument("--gaps", default="0,12,35", help="compute gaps in ms, comma-separated")
    args = parser.parse_args()
    try:
        gaps = [int(float(gap) * 1000) for gap in args.gaps.split(",")]
    except ValueError:
        parser.error(f"--gaps: expected milliseconds separated by commas, e.g. 0,12,35, not {args.gaps!r}")
    if args.steps < 1 or min(gaps) < 0:
        parser.error("--steps must be at least 1 and every gap at least 0")
    kinds = {"tcp-loop": "raw TCP, compute on the loop", "tcp-thread": "raw TCP, compute on a thread",
             "hivemind": "hivemind stream, compute on a thread"}
    print(f"Round trip minus compute, [1, 1, 576] float32 each way, {args.steps} round trips per gap, "
          f"microseconds (median, p90)\n")
    header = f"{'transport':<38}" + "".join(f"{f'gap {gap / 1000:g} ms':>22}" for gap in gaps)
    print(header)
    print("-" * len(header))
    for kind, label in kinds.items():
        results = measure(kind, gaps, args.steps)
        cells = []
        for gap in gaps:
            times = sorted(results[gap])
            cells.append(f"{statistics.median(times):>12.0f} ({times[int(0.9 * len(times))]:>6.0f})")
        print(f"{label:<38}" + "".join(f"{cell:>22}" for cell in cells))


if __name__ == "__main__":
    main()
