"""`swarm-peer status`: the coverage summary under the peer table."""

import json

from peers.status import PeerRow, StatusReport, coverage_ranges, render_table


def row(peer: str, start: int, end: int, state: str = "online", rtt: float | None = 1.0) -> PeerRow:
    return PeerRow(peer, "", start, end, state, 10.0, "float32", rtt)


def test_coverage_counts_only_online_reachable_peers():
    report = StatusReport("m", "m@x", 6, (row("a", 0, 4), row("b", 2, 6), row("c", 0, 6, rtt=None),
                                          row("d", 0, 6, state="offline")), missing=())
    assert coverage_ranges(report) == [(0, 2, 1), (2, 4, 2), (4, 6, 1)]
    table = render_table(report)
    assert "coverage (blocks x online peers): 0:2 x1  2:4 x2  4:6 x1" in table
    assert "unreachable" in table and "All 6 blocks are served." in table.splitlines()


def test_a_gap_shows_as_zero_and_missing():
    report = StatusReport("m", "m@x", 4, (row("a", 0, 2),), missing=(2, 3))
    assert coverage_ranges(report) == [(0, 2, 1), (2, 4, 0)]
    assert "MISSING" in render_table(report)


def test_relayed_and_unreachable_peers_are_shown_as_such():
    home = PeerRow("h", "", 2, 6, "online", 10.0, "float32", 2.5, relays=("QmRelay",))
    hidden = PeerRow("n", "", 2, 6, "online", 10.0, "float32", None, reachable=False)
    report = StatusReport("m", "m@x", 6, (row("a", 0, 2), home, hidden), missing=())
    table = render_table(report)
    assert "relay QmRelay" in table.splitlines()[3] and "direct" in table.splitlines()[2]
    assert "none (NAT, no relay)" in table
    assert ("UNREACHABLE: peer n (blocks 2:6) cannot be dialled and uses no relay (behind NAT with --relay never); "
            "clients cannot use its blocks") in table.splitlines()
    assert "1 peer(s) behind NAT are reached through relays." in table.splitlines()
    assert json.loads(json.dumps(report.to_json()))["peers"][1]["relays"] == ["QmRelay"]


def test_compression_has_a_column_and_a_json_field():
    nf4 = PeerRow("q", "", 0, 6, "online", 10.0, "bfloat16", 1.0, compression="nf4")
    report = StatusReport("m", "m@x", 6, (row("a", 0, 6), nf4), missing=())
    header, dense_line, nf4_line = render_table(report).splitlines()[1:4]
    column = header.index("compression")
    assert header.split()[6] == "compression" and header.index("dtype") < column < header.index("rtt")
    assert dense_line[column:].split()[0] == "none" and nf4_line[column:].split()[0] == "nf4"
    assert [peer["compression"] for peer in json.loads(json.dumps(report.to_json()))["peers"]] == ["none", "nf4"]
