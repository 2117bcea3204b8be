"""The peer's once-a-minute status line."""

from peers.status_log import StatusSnapshot, format_status


def test_status_line_names_sessions_tokens_cache_and_trust():
    line = format_status(StatusSnapshot(sessions=2, tokens_served=1500, tokens_recent=300, cache_used=1024,
                                        cache_total=4096, trust=None), period=60)
    assert line == "status: 2 sessions, 1500 tokens served (+300 in 60 s), cache 1024/4096 tokens (25.0%), trust=n/a"
    with_trust = format_status(StatusSnapshot(0, 0, 0, 0, 0, trust=0.75), period=60)
    assert with_trust.endswith("cache 0/0 tokens (0.0%), trust=0.750")


def test_status_line_says_how_many_steps_ran_batched_once_any_did():
    line = format_status(StatusSnapshot(3, 90, 90, 0, 10, None, batched_steps=40, largest_batch=3), period=60)
    assert line.endswith("trust=n/a, 40 steps batched (up to 3 at once)")
