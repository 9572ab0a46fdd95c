"""The agent's reconnect backoff is jittered and bounded (a fleet that lost its broker at once
must not come back in lockstep)."""

from __future__ import annotations

import random

from edge_agent.link.mqtt import reconnect_delay_s


def test_the_delay_grows_with_attempts_up_to_the_cap() -> None:
    upper = [reconnect_delay_s(n, 60, lambda lo, hi: hi) for n in range(1, 14)]
    assert upper[0] == 1.5 and upper[1] == 2.25
    assert upper == sorted(upper) and max(upper) == 1.5**10  # 57.7 s: the exponent stops at 10
    assert reconnect_delay_s(12, 30, lambda lo, hi: hi) == 30
    assert all(reconnect_delay_s(n, 60, lambda lo, hi: lo) == 0 for n in range(1, 14))


def test_devices_that_lost_the_broker_together_spread_out() -> None:
    rng = random.Random(7)
    delays = [reconnect_delay_s(4, 60, rng.uniform) for _ in range(1000)]
    assert all(0 <= d <= 1.5**4 for d in delays)
    # Spread over the whole window, not clumped: each quarter holds about a quarter of them.
    quarters = [sum(q * 1.5**4 / 4 <= d < (q + 1) * 1.5**4 / 4 for d in delays) for q in range(4)]
    assert min(quarters) > 180, quarters
