"""`swarm-peer status`: read the swarm's announcements, ping every peer, render the coverage."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import random

from hivemind.p2p import PeerID
from hivemind.utils.crypto import RSAPrivateKey

from reputation.attest import Attestation
from reputation.node import PeerStanding, ReputationConfig, ReputationNode
from swarm import records, routing
from swarm.errors import format_block_spans
from swarm.models import open_model
from swarm.network import create_client_dht
from swarm.remote import HivemindTransport


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
    trust: float | None = None  # relative trust (1.0 = average) from gossiped attestations; None: never checked
    blacklisted: bool = False
    accused: bool = False  # a verdict against it awaits this view's own checks
    relays: tuple[str, ...] = ()  # peer ids of the relays it is reachable through (empty: dialled directly)
    reachable: bool = True  # False: it announced that nobody can dial it and it uses no relay
    compression: str = "none"  # the announced compression tag (swarm.tags): none, int8, nf4, svd-...

    @property
    def reach(self) -> str:
        """How clients reach the peer, for the table."""
        if not self.reachable:
            return "none (NAT, no relay)"
        return "relay " + ",".join(self.relays) if self.relays else "direct"


@dataclass(frozen=True)
class StatusReport:
    model: str
    dht_prefix: str
    num_blocks: int
    peers: tuple[PeerRow, ...]
    missing: tuple[int, ...]  # blocks no online, reachable peer serves
    trusted: bool = False  # trust anchored in --trusted-peers (else every checker weighs the same)

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "dht_prefix": self.dht_prefix,
            "num_blocks": self.num_blocks,
            "peers": [row.__dict__ for row in self.peers],
            "missing_blocks": list(self.missing),
        }


async def gather_reputation(p2p, spans, trusted_peers: tuple[str, ...], fanout: int = 3) -> ReputationNode:
    """A throwaway reputation node filled by gossip from a few online peers.

    Without trusted seeds, every signer of an attestation is taken as a seed (equal weight); only
    --trusted-peers gives verdicts to rely on. This node checks nobody, so a "fail" verdict shows here as an
    accusation (ACCUSED), never as a blacklist: no signer's word alone convicts anyone, not even a seed's.
    """
    from reputation.gossip import SenderBudget, exchange

    online = [s for s in spans if s.info.state == records.ServerState.ONLINE]
    gathered = ReputationNode(RSAPrivateKey(), ReputationConfig(seeds=trusted_peers))
    for span in random.sample(online, min(fanout, len(online))):
        try:
            await exchange(gathered, p2p, span.peer_id, SenderBudget())
        except Exception:  # an unreachable peer only means less to show
            continue
    seeds = trusted_peers or tuple(sorted({
        Attestation.decode(data).checker for kind, data in gathered.messages(limit=10**9) if kind == "attestation"
    }))
    node = ReputationNode(RSAPrivateKey(), ReputationConfig(seeds=seeds))
    node.learn_peers(str(s.peer_id) for s in spans)
    for kind, data in gathered.messages(limit=10**9):
        node.ingest(kind, data)
    return node


def collect_status(model: str, initial_peers: list[str], trusted_peers: tuple[str, ...] = ()) -> StatusReport:
    checkpoint = open_model(model)
    dht = create_client_dht(initial_peers, checkpoint.dht_prefix, checkpoint.num_blocks)
    try:
        spans = records.read_spans(dht, checkpoint.dht_prefix, checkpoint.num_blocks)

        async def ping_all() -> tuple[list[float | None], ReputationNode]:
            p2p = await dht.replicate_p2p()
            relays = {s.peer_id: [PeerID.from_base58(r) for r in s.info.relays] for s in spans}
            transport = HivemindTransport(p2p, relays_of=lambda peer_id: relays.get(peer_id, []))

            async def ping(span) -> float | None:
                try:
                    return (await transport.info(span.peer_id, timeout=3.0))[1]
                except Exception:  # unreachable peers are shown as such, not raised
                    return None

            rtts = list(await asyncio.gather(*(ping(s) for s in spans)))
            return rtts, await gather_reputation(p2p, spans, trusted_peers)

        rtts, node = asyncio.run(ping_all())
    finally:
        dht.shutdown()
    standings = {row.peer_id: row for row in node.standings() if row.passes or row.fails or row.blacklisted or row.accused}
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
            trust=round(standings[str(s.peer_id)].trust, 3) if str(s.peer_id) in standings else None,
            blacklisted=bool(standings.get(str(s.peer_id)) and standings[str(s.peer_id)].blacklisted),
            accused=bool(standings.get(str(s.peer_id)) and standings[str(s.peer_id)].accused),
            relays=tuple(s.info.relays),
            reachable=s.info.reachable,
            compression=s.info.compression,
        )
        for s, rtt in sorted(zip(spans, rtts), key=lambda pair: (pair[0].start, pair[0].end, str(pair[0].peer_id)))
    )
    reachable = [s for s, rtt in zip(spans, rtts) if rtt is not None]
    missing = tuple(routing.missing_blocks(reachable, 0, checkpoint.num_blocks))
    return StatusReport(
        checkpoint.manifest.name, checkpoint.dht_prefix, checkpoint.num_blocks, rows, missing, bool(trusted_peers)
    )


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
    header = ("blocks", "peer", "name", "state", "throughput", "dtype", "compression", "rtt", "reached", "trust")
    lines = [
        (
            f"{r.start}:{r.end}",
            r.peer_id,
            r.public_name or "-",
            r.state,
            f"{r.throughput:.1f}/s",
            r.dtype,
            r.compression,
            "unreachable" if r.rtt_ms is None else f"{r.rtt_ms:.1f} ms",
            r.reach,
            "BLACKLISTED" if r.blacklisted else "ACCUSED" if r.accused else ("-" if r.trust is None else f"{r.trust:.2f}"),
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
    for r in report.peers:
        if r.state == "online" and not r.reachable:
            out.append(f"UNREACHABLE: peer {r.peer_id} (blocks {r.start}:{r.end}) cannot be dialled and uses no relay "
                       "(behind NAT with --relay never); clients cannot use its blocks")
    relayed = sum(1 for r in report.peers if r.state == "online" and r.relays)
    if relayed:
        out.append(f"{relayed} peer(s) behind NAT are reached through relays.")
    if report.missing:
        out.append(f"MISSING: no reachable online peer serves block(s) {format_block_spans(list(report.missing))}")
    else:
        out.append(f"All {report.num_blocks} blocks are served.")
    if not report.trusted:
        out.append("Trust: no --trusted-peers given, so every checker weighs the same.")
    return "\n".join(out)


def collect_standings(model: str, initial_peers: list[str], trusted_peers: tuple[str, ...] = ()) -> list[PeerStanding]:
    """Reward standings as gossip tells them: every peer's trust, verdicts and credit."""
    checkpoint = open_model(model)
    dht = create_client_dht(initial_peers, checkpoint.dht_prefix, checkpoint.num_blocks)
    try:
        spans = records.read_spans(dht, checkpoint.dht_prefix, checkpoint.num_blocks)

        async def gather() -> ReputationNode:
            return await gather_reputation(await dht.replicate_p2p(), spans, trusted_peers)

        node = asyncio.run(gather())
    finally:
        dht.shutdown()
    return node.standings()


def render_rewards(standings: list[PeerStanding]) -> str:
    header = ("peer", "trust", "passed", "faults", "vested", "pending", "status")
    lines = [
        (r.peer_id, f"{r.trust:.2f}", str(r.passes), str(r.fails), f"{r.vested:.0f}", f"{r.pending:.0f}",
         "BLACKLISTED" if r.blacklisted else "ACCUSED" if r.accused else "ok")
        for r in standings
    ]
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines)]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in (header, *lines)]
    if not standings:
        out.append("(no attestations or countersigned work gathered yet)")
    out.append("Credit: tokens x blocks from receipts clients countersigned, at most what each client sent, weighted "
               "by the client's trust and the peer's; pending credit vests after 10 min, and a blacklisted peer "
               "forfeits it. ACCUSED: a verdict against it awaits this view's own checks.")
    return "\n".join(out)
