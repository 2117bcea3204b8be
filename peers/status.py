"""`swarm-peer status`: read the swarm's announcements, ping every peer, render the coverage."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from swarm import records, routing
from swarm.errors import format_block_spans
from swarm.models import open_model
from swarm.network import create_client_dht
from swarm.remote import call_info


@dataclass(frozen=True)
class PeerRow:
    peer_id: str
    public_name: str
    start: int
    end: int
    state: str
    throughput: float
    dtype: str
    rtt_ms: float | None  # None: did not answer


@dataclass(frozen=True)
class StatusReport:
    model: str
    dht_prefix: str
    num_blocks: int
    peers: tuple[PeerRow, ...]
    missing: tuple[int, ...]  # blocks no online, reachable peer serves

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "dht_prefix": self.dht_prefix,
            "num_blocks": self.num_blocks,
            "peers": [row.__dict__ for row in self.peers],
            "missing_blocks": list(self.missing),
        }


def collect_status(model: str, initial_peers: list[str]) -> StatusReport:
    checkpoint = open_model(model)
    dht = create_client_dht(initial_peers, checkpoint.dht_prefix, checkpoint.num_blocks)
    try:
        spans = records.read_spans(dht, checkpoint.dht_prefix, checkpoint.num_blocks)

        async def ping_all() -> list[float | None]:
            p2p = await dht.replicate_p2p()

            async def ping(span) -> float | None:
                try:
                    return (await call_info(p2p, span.peer_id, timeout=3.0))[1]
                except Exception:  # unreachable peers are shown as such, not raised
                    return None

            return list(await asyncio.gather(*(ping(s) for s in spans)))

        rtts = asyncio.run(ping_all())
    finally:
        dht.shutdown()
    rows = tuple(
        PeerRow(
            peer_id=str(s.peer_id),
            public_name=s.info.public_name,
            start=s.start,
            end=s.end,
            state=s.info.state.value,
            throughput=round(s.info.throughput, 1),
            dtype=s.info.dtype,
            rtt_ms=None if rtt is None else round(rtt * 1000, 2),
        )
        for s, rtt in sorted(zip(spans, rtts), key=lambda pair: (pair[0].start, pair[0].end, str(pair[0].peer_id)))
    )
    reachable = [s for s, rtt in zip(spans, rtts) if rtt is not None]
    missing = tuple(routing.missing_blocks(reachable, 0, checkpoint.num_blocks))
    return StatusReport(checkpoint.manifest.name, checkpoint.dht_prefix, checkpoint.num_blocks, rows, missing)


def coverage_ranges(report: StatusReport) -> list[tuple[int, int, int]]:
    """(start, end, peers) for consecutive blocks served by the same number of online, reachable peers."""
    counts = [0] * report.num_blocks
    for row in report.peers:
        if row.state == "online" and row.rtt_ms is not None:
            for block in range(row.start, min(row.end, report.num_blocks)):
                counts[block] += 1
    ranges: list[tuple[int, int, int]] = []
    for block, count in enumerate(counts):
        if ranges and ranges[-1][2] == count and ranges[-1][1] == block:
            ranges[-1] = (ranges[-1][0], block + 1, count)
        else:
            ranges.append((block, block + 1, count))
    return ranges


def render_table(report: StatusReport) -> str:
    header = ("blocks", "peer", "name", "state", "throughput", "dtype", "rtt")
    lines = [
        (
            f"{r.start}:{r.end}",
            r.peer_id,
            r.public_name or "-",
            r.state,
            f"{r.throughput:.1f}/s",
            r.dtype,
            "unreachable" if r.rtt_ms is None else f"{r.rtt_ms:.1f} ms",
        )
        for r in report.peers
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    out = [f"{report.model} ({report.num_blocks} blocks, DHT prefix {report.dht_prefix})"]
    out += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in (header, *lines)]
    if not report.peers:
        out.append("(no peer announces this model)")
    if report.num_blocks:
        cells = [f"{start}:{end} x{count}" for start, end, count in coverage_ranges(report)]
        out.append("coverage (blocks x online peers): " + "  ".join(cells))
    if report.missing:
        out.append(f"MISSING: no reachable online peer serves block(s) {format_block_spans(list(report.missing))}")
    else:
        out.append(f"All {report.num_blocks} blocks are served.")
    return "\n".join(out)
