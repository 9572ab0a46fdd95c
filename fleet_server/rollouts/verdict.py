"""A/B verdicts: which arm is better on error rate and on latency, and how sure that is.

Arm A is the cohort's devices that keep the version they had; arm B those that got the
candidate. Each arm's figures are its version's telemetry over the hold: for B, tagged with
this rollout; for A, tagged with the rollout that brought A's version (devices outside the
cohort that got that version from the same rollout count too: rollups are not per device).

- Error rate: a two-proportion z-test.
- Online accuracy, when applications sent labels back (at least :data:`MIN_LABELS` per arm):
  a two-proportion z-test on right / labelled, higher is better.
- Latency: mean and variance read off the merged DDSketch (bin values at the sketch's 1 %),
  compared with Welch's statistic (normal approximation; arms of hundreds of requests) on the
  difference beyond :data:`LATENCY_TOLERANCE` of the faster mean: with hundreds of requests a
  difference of a few per cent (one device busier than the other) is "certain", and it is not
  a reason to keep a worse model or to ship a slower one.

The confidence of a comparison is the one-sided normal probability that the arm that looks
better is better. The verdict is B when B is better on some figure with at least
``min_confidence`` and worse on none with that confidence; A when B is worse on some figure
with that confidence; none otherwise (no difference shown: A is kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ddsketch.mapping import LogarithmicMapping

from edge_agent.protocol.telemetry import LatencySketch
from fleet_server.telemetry.query import Totals

__all__ = ["LATENCY_TOLERANCE", "MIN_LABELS", "Arm", "arm", "compare"]

#: Each arm needs this many labelled predictions before accuracy is compared.
MIN_LABELS = 30
#: Mean latencies closer than this share of the faster one count as alike.
LATENCY_TOLERANCE = 0.10


@dataclass(frozen=True)
class Arm:
    version: str
    requests: int
    errors: int
    mean_ms: float | None
    var_ms2: float | None
    p95_ms: float | None
    labelled: int = 0
    correct: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.errors / self.requests if self.requests else None,
            "labelled": self.labelled,
            "correct": self.correct,
            "accuracy": self.correct / self.labelled if self.labelled else None,
            "mean_ms": _round(self.mean_ms),
            "p95_ms": _round(self.p95_ms),
        }


def _round(value: float | None) -> float | None:
    return round(value, 4) if value is not None else None


def arm(version: str, figures: Totals) -> Arm:
    mean, var, p95 = _moments(figures.latency)
    return Arm(version, figures.requests, figures.errors, mean, var, p95,
               figures.labelled, figures.correct)  # fmt: skip


def _moments(sketch: LatencySketch | None) -> tuple[float | None, float | None, float | None]:
    if sketch is None or sketch.count < 2:
        return None, None, None
    mapping = LogarithmicMapping(sketch.relative_accuracy)
    values = [mapping.value(sketch.key_offset + i) for i in range(len(sketch.counts))]
    n = sketch.count
    mean = sketch.sum_ms / n
    var = sum(c * (v - mean) ** 2 for c, v in zip(sketch.counts, values, strict=True))
    var += sketch.zero_count * mean**2
    target, seen, p95 = 0.95 * (n - 1), sketch.zero_count, 0.0
    for c, v in zip(sketch.counts, values, strict=True):
        seen += c
        if seen > target:
            p95 = v
            break
    return mean, var / (n - 1), p95


def _phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def _side(z: float | None) -> tuple[str | None, float | None]:
    """(the arm that looks better, the confidence it is) for z = (A's figure - B's) / se,
    where lower is better."""
    if z is None:
        return None, None
    if z == 0:
        return None, 0.5
    return ("b" if z > 0 else "a"), round(_phi(abs(z)), 6)


def compare(a: Arm, b: Arm, min_confidence: float) -> dict[str, Any]:
    figures: dict[str, Any] = {"a": a.to_json(), "b": b.to_json()}
    z_err: float | None = None
    if a.requests and b.requests:
        pa, pb = a.errors / a.requests, b.errors / b.requests
        pooled = (a.errors + b.errors) / (a.requests + b.requests)
        se = math.sqrt(pooled * (1 - pooled) * (1 / a.requests + 1 / b.requests))
        z_err = (pa - pb) / se if se > 0 else 0.0
    z_lat: float | None = None
    if a.mean_ms is not None and b.mean_ms is not None and a.var_ms2 is not None:
        assert b.var_ms2 is not None
        se = math.sqrt(a.var_ms2 / a.requests + b.var_ms2 / b.requests)
        lead = a.mean_ms - b.mean_ms  # B's lead (lower is better)
        beyond = max(0.0, abs(lead) - LATENCY_TOLERANCE * min(a.mean_ms, b.mean_ms))
        z_lat = math.copysign(beyond, lead) / se if se > 0 else 0.0
    z_acc: float | None = None
    if a.labelled >= MIN_LABELS and b.labelled >= MIN_LABELS:
        pa, pb = a.correct / a.labelled, b.correct / b.labelled
        pooled = (a.correct + b.correct) / (a.labelled + b.labelled)
        se = math.sqrt(pooled * (1 - pooled) * (1 / a.labelled + 1 / b.labelled))
        z_acc = (pb - pa) / se if se > 0 else 0.0  # higher is better: B's lead
    verdicts: dict[str, dict[str, Any]] = {}
    for name, z in (("error_rate", z_err), ("latency", z_lat), ("accuracy", z_acc)):
        better, confidence = _side(z)
        verdicts[name] = {"better": better, "confidence": confidence}
    figures["comparison"] = verdicts
    sure = [v for v in verdicts.values() if (v["confidence"] or 0) >= min_confidence]
    if any(v["better"] == "a" for v in sure):
        winner: str | None = "a"
    elif any(v["better"] == "b" for v in sure):
        winner = "b"
    else:
        winner = None
    figures["winner"] = winner
    figures["min_confidence"] = min_confidence
    return figures
