"""How many tokens a client sent through each hop of a session: the count it countersigns, which caps the credit
of the peer's receipts (a receipt claiming more is an inflation fault; reputation.node.ReputationNode.countersign).

Counted from the session's step records (swarm.hooks.StepRecord), in the receipts' unit: batch x new tokens per
step, cumulative. Inputs a hop was sent outside a recorded step (a replay into a replacement peer, the history
re-sent after an eviction) show in the next record's history: the history then starts with a tensor the tally
has not seen, and what precedes the step's own input was sent again. A history also starts anew after a
rollback, which sends nothing again; when a rollback and a re-send fall on the same step they cannot be told
apart, so those tokens count only towards the upper bound (`sent_at_most`) that decides an inflation fault,
never towards the credit. An honest peer's receipt thus never claims more than the bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swarm.hooks import StepRecord


@dataclass
class HopWork:
    """One (peer, blocks) hop of a session as the client counted it."""

    peer: str  # base58 peer id
    start: int
    end: int
    sent: int  # batch x tokens sent through the hop, by this client's count
    unsure: int  # batch x tokens that may have been sent again without being counted (see the module's docstring)
    receipt: str  # the hop's last receipt, base64 ("" if it never sent one)
    first: torch.Tensor | None = None  # the first chunk of the hop's history at the last record
    held: int = 0  # tokens the hop held after the last record

    @property
    def sent_at_most(self) -> int:
        return self.sent + self.unsure


class SentTokens:
    """Per session, per (peer, start, end): tokens sent and the last receipt. Called on the client's loop."""

    def __init__(self) -> None:
        self._sessions: dict[str, dict[tuple[str, int, int], HopWork]] = {}

    def observe(self, record: StepRecord) -> None:
        key = (str(record.peer_id), record.start, record.end)
        batch, new = int(record.inputs.shape[0]), int(record.inputs.shape[1])
        history = record.history or (record.inputs,)
        held = sum(int(chunk.shape[1]) for chunk in history)
        hops = self._sessions.setdefault(record.session_id, {})
        hop = hops.get(key)
        if hop is None:  # everything in the history went to this hop: a replay before its first step included
            hop = hops[key] = HopWork(key[0], record.start, record.end, batch * held, 0, "")
        else:
            if history[0] is not hop.first:  # the history was rebuilt: sent again, or trimmed by a rollback
                earlier = batch * max(held - new, 0)
                if record.position >= hop.held:
                    hop.sent += earlier
                else:
                    hop.unsure += earlier
            hop.sent += batch * new
        hop.first, hop.held = history[0], record.position + new
        if record.receipt:
            hop.receipt = record.receipt

    def close(self, session_id: str) -> list[HopWork]:
        """Every hop of the session, forgotten here."""
        return list(self._sessions.pop(session_id, {}).values())
