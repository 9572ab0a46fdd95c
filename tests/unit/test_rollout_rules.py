"""The rollout engine's pure rules: the rate limit and its exponential ramp, the request's
checks, and the A/B verdict's statistics."""

from __future__ import annotations

from typing import Any

import pytest

from edge_agent.protocol.telemetry import LatencySketch
from edge_agent.telemetry.sketch import new_sketch, to_wire
from fleet_server.control.plane import StatusLimit
from fleet_server.errors import InvalidInputError
from fleet_server.rollouts.notifier import rate_allowance
from fleet_server.rollouts.spec import RampSpec, RateSpec, RolloutCreate
from fleet_server.rollouts.verdict import arm, compare
from fleet_server.telemetry.query import Totals


def test_no_limit_means_no_allowance_to_count() -> None:
    assert rate_allowance(RateSpec(), recent=10_000, succeeded=0) is None


def test_the_limit_counts_the_last_minute() -> None:
    rate = RateSpec(max_per_minute=50)
    assert rate_allowance(rate, recent=0, succeeded=0) == 50
    assert rate_allowance(rate, recent=45, succeeded=0) == 5
    assert rate_allowance(rate, recent=60, succeeded=0) == 0


def test_the_ramp_multiplies_the_rate_as_devices_succeed_up_to_the_limit() -> None:
    ramp = RampSpec(base_per_minute=10, increase_factor=2, after_succeeded=20)
    assert rate_allowance(RateSpec(ramp=ramp), recent=0, succeeded=0) == 10
    assert rate_allowance(RateSpec(ramp=ramp), recent=0, succeeded=19) == 10
    assert rate_allowance(RateSpec(ramp=ramp), recent=0, succeeded=20) == 20
    assert rate_allowance(RateSpec(ramp=ramp), recent=5, succeeded=60) == 75
    capped = RateSpec(max_per_minute=30, ramp=ramp)
    assert rate_allowance(capped, recent=0, succeeded=1000) == 30


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "version": "1", "selector": "site=a", **extra}


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"strategy": "canary", "stages": [50, 20, 100]}, "stages"),
        ({"strategy": "canary", "stages": [50, 101]}, "stages"),
        ({"strategy": "canary", "stages": [25, 50]}, "stages"),
        ({"stages": [50, 100]}, "stages"),
        ({"strategy": "ab"}, "bake_s"),
        ({"strategy": "shadow"}, "shadow_of"),
        ({"split_pct": 20}, "split_pct"),
        ({"selector": "a in (b"}, "selector"),
        ({"selector": None}, "devices"),
        ({"devices": ["d1"]}, "devices"),  # both a selector and devices
    ],
)
def test_rules_that_span_fields_name_the_field(extra: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInputError) as e:
        RolloutCreate.model_validate(body(**extra))
    assert e.value.fields.get("field") == field, e.value


def test_plans_by_strategy() -> None:
    assert RolloutCreate.model_validate(body()).plan()["stages"] == [100.0]
    canary = RolloutCreate.model_validate(body(strategy="canary")).plan()
    assert canary["stages"] == [1.0, 10.0, 50.0, 100.0]
    assert canary["gates"]["max_install_failure_pct"] == 0  # the default for staged rollouts
    ab = RolloutCreate.model_validate(body(strategy="ab", bake_s=60, split_pct=20)).plan()
    assert ab["stages"] == [20.0, 100.0]


def sketch_of(values: list[float]) -> LatencySketch | None:
    s = new_sketch()
    for v in values:
        s.add(v)
    return to_wire(s)


def test_a_faster_arm_wins_on_latency_with_confidence() -> None:
    a = arm("1", Totals(400, 0, sketch_of([2.0 + 0.01 * (i % 20) for i in range(400)])))
    b = arm("2", Totals(400, 0, sketch_of([1.0 + 0.01 * (i % 20) for i in range(400)])))
    verdict = compare(a, b, 0.95)
    assert verdict["winner"] == "b"
    assert verdict["comparison"]["latency"]["better"] == "b"
    assert verdict["comparison"]["latency"]["confidence"] > 0.999
    assert verdict["a"]["mean_ms"] == pytest.approx(2.095, rel=0.02)


def test_latencies_a_few_per_cent_apart_are_alike() -> None:
    """Thousands of requests make a 4 % difference statistically certain; it is within the
    tolerance, so it decides nothing (one device was busier), while 20 % still does."""
    base = [2.0 + 0.01 * (i % 20) for i in range(4000)]
    a = arm("1", Totals(4000, 0, sketch_of(base)))
    near = arm("2", Totals(4000, 0, sketch_of([v * 1.04 for v in base])))
    verdict = compare(a, near, 0.95)
    assert verdict["comparison"]["latency"]["better"] is None
    assert verdict["winner"] is None
    far = arm("2", Totals(4000, 0, sketch_of([v * 1.2 for v in base])))
    verdict = compare(a, far, 0.95)
    assert verdict["comparison"]["latency"]["better"] == "a"
    assert verdict["winner"] == "a"


def test_more_errors_lose_even_when_faster() -> None:
    a = arm("1", Totals(1000, 5, sketch_of([2.0] * 995)))
    b = arm("2", Totals(1000, 80, sketch_of([1.0] * 920)))
    verdict = compare(a, b, 0.95)
    assert verdict["winner"] == "a"
    assert verdict["comparison"]["error_rate"]["better"] == "a"


def test_no_difference_shown_keeps_a() -> None:
    values = [1.0 + 0.1 * (i % 10) for i in range(200)]
    verdict = compare(arm("1", Totals(200, 1, sketch_of(values))),
                      arm("2", Totals(200, 1, sketch_of(values))), 0.95)  # fmt: skip
    assert verdict["winner"] is None
    assert verdict["comparison"]["error_rate"]["confidence"] == 0.5


def test_the_status_bound_allows_a_burst_then_its_rate() -> None:
    now = [0.0]
    limit = StatusLimit(per_s=2.0, burst=5.0, clock=lambda: now[0])
    assert [limit.allow("a") for _ in range(7)] == [True] * 5 + [False] * 2
    assert limit.allow("b")  # each device has its own bucket
    now[0] = 1.0  # two tokens back
    assert [limit.allow("a") for _ in range(3)] == [True, True, False]
    now[0] = 100.0  # never more than the burst
    assert sum(limit.allow("a") for _ in range(10)) == 5
