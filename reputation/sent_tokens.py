"""How many tokens a client sent through each hop of a session: the count it countersigns, which caps the credit
of the peer's receipts (a receipt claiming more is an inflation fault; reputation.node.ReputationNode.countersign).

The session counts every token it sends on a hop's stream, replays into a replacement peer and re-sent
histories included, and each step record carries that count (swarm.hooks.StepRecord.sent), in the receipts'
unit: batch x tokens, cumulative per stream. A peer's receipts count per stream too (the stream is the peer's
session), so an honest receipt never claims more than the record says. A new stream to the same hop (a reopened
peer) starts both counts again; the tally then follows the new stream.
"""

from __future__ import annotations

from dataclasses import dataclass

from swarm.hooks import StepRecord


@dataclass
class HopWork:
    """One (peer, blocks) hop of a session as the client counted it."""

    peer: str  # base58 peer id
    start: int
    end: int
    sent: int  # batch x tokens sent on the hop's stream, by this client's count
    receipt: str  # the hop's last receipt, base64 ("" if it never sent one)


class SentTokens:
    """Per session, per (peer, start, end): tokens sent and the last receipt. Called on the client's loop."""

    def __init__(self) -> None:
        self._sessions: dict[str, dict[tuple[str, int, int], HopWork]] = {}

    def observe(self, record: StepRecord) -> None:
        key = (str(record.peer_id), record.start, record.end)
        hops = self._sessions.setdefault(record.session_id, {})
        hop = hops.get(key)
        if hop is None or record.sent < hop.sent:  # the hop's first step, or a new stream to the same peer
            hop = hops[key] = HopWork(key[0], record.start, record.end, record.sent, "")
        hop.sent = record.sent
        if record.receipt:
            hop.receipt = record.receipt

    def close(self, session_id: str) -> list[HopWork]:
        """Every hop of the session, forgotten here."""
        return list(self._sessions.pop(session_id, {}).values())
