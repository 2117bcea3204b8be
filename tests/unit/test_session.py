"""The input history a session keeps per hop, for replay after a fail-over."""

from __future__ import annotations

import torch

from swarm.session import _Hop


def make_hop() -> _Hop:
    return _Hop(route=None, stream=None)


def test_history_concatenates_steps_in_order():
    hop = make_hop()
    prefill, step = torch.randn(1, 5, 4), torch.randn(1, 1, 4)
    hop.record(prefill, 0)
    hop.record(step, 5)
    assert hop.held == 6
    assert torch.equal(hop.history(6), torch.cat([prefill, step], dim=1))
    assert torch.equal(hop.history(3), prefill[:, :3])
    assert hop.history(0) is None


def test_rollback_trims_the_history_before_appending():
    hop = make_hop()
    prefill, wrong, right = torch.randn(1, 5, 4), torch.randn(1, 3, 4), torch.randn(1, 2, 4)
    hop.record(prefill, 0)
    hop.record(wrong, 5)
    hop.record(right, 4)  # rolled back to position 4
    assert hop.held == 6
    assert torch.equal(hop.history(6), torch.cat([prefill[:, :4], right], dim=1))
    hop.record(prefill, 0)  # a new prefill forgets everything
    assert hop.held == 5 and torch.equal(hop.history(5), prefill)

