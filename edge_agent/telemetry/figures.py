"""One serving model's telemetry for the current interval: its latency sketch and drift counts.

Request, error and NaN/inf counts are not kept here: they are the serving path's own counters
(:class:`~edge_agent.serving.stats.ModelStats`), read as differences between two harvests, so
the two can never disagree.

The cost is bounded: every successful request adds its latency to a list, folded into the
sketch 256 at a time (what is left is mostly one lock and the clock); drift counting (~15 µs
for a 16-feature request, ~80 µs for a 224x224 image) runs on a sample of requests whose rate
is chosen so that the measured time spent here stays within ``budget`` (default 2 %) of the
measured inference time. The rate in force is reported with the figures.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from edge_agent.protocol.telemetry import LatencySketch, TensorCounts
from edge_agent.telemetry.drift import Baseline, TensorDrift
from edge_agent.telemetry.sketch import add_many, new_sketch, to_wire

__all__ = ["DEFAULT_BUDGET", "IntervalFigures", "ModelTelemetry"]

DEFAULT_BUDGET = 0.02
#: The sampling rate is re-chosen after this many requests.
ADJUST_EVERY = 64
#: Latencies wait in a list and go into the sketch this many at a time.
FOLD_EVERY = 256
START_RATE = 0.125
#: The rate aims at this share of the budget: the costs it steers by are estimates.
HEADROOM = 0.8


@dataclass(frozen=True)
class IntervalFigures:
    latency_ms: LatencySketch | None
    sampled: int
    sample_rate: float
    inputs: dict[str, TensorCounts]
    outputs: dict[str, TensorCounts]


class ModelTelemetry:
    """Thread-safe: request threads record, the reporter peeks and harvests."""

    def __init__(
        self,
        baseline: Baseline | None,
        *,
        budget: float = DEFAULT_BUDGET,
        min_rate: float = 0.0,
        enabled: bool = True,
    ) -> None:
        self.baseline = baseline
        self.budget = budget
        #: The sampling rate never goes below this (1.0: count every request, whatever the
        #: cost — for tiny models whose drift matters more than their latency, and for tests).
        self.min_rate = min_rate
        #: Off, ``record`` returns at once: a model no reporter tracks costs nothing.
        self.enabled = enabled
        #: Totals since creation (never reset): telemetry's own time and inference time, for
        #: benchmarks and the agent's /metrics.
        self.spent_s = 0.0
        self.inference_s = 0.0
        self._lock = threading.Lock()
        self._sketch = new_sketch()
        self._latencies: list[float] = []
        self._sampled = 0
        self._inputs = _zeros(baseline.inputs if baseline else {})
        self._outputs = _zeros(baseline.outputs if baseline else {})
        # Sampling: start with one request in 8 (its costs unknown yet), then follow the
        # measured costs.
        counting = bool(baseline and (baseline.inputs or baseline.outputs))
        self.sample_rate = max(START_RATE, min_rate) if counting else 0.0
        self._credit = 1.0
        self._seen = 0
        self._infer_s = 0.0
        self._base_cost_s = 0.0
        self._drift_cost_s = 0.0
        self._drift_runs = 0

    def record(
        self, latency_ms: float, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]
    ) -> None:
        if not self.enabled:
            return
        start = time.perf_counter()
        with self._lock:
            # The latency waits in a list, folded into the sketch FOLD_EVERY at a time (and
            # before the figures are read): an append instead of a sketch update per request.
            latencies = self._latencies
            latencies.append(latency_ms)
            if len(latencies) >= FOLD_EVERY:
                self._fold_locked()
            self._credit += self.sample_rate
            sample = self._credit >= 1.0
            if sample:
                self._credit -= 1.0
            self.inference_s += latency_ms / 1000
            self._infer_s += latency_ms / 1000
            if not (sample and self.baseline is not None):
                # Most requests: everything they add is done, under one lock.
                self._drift_runs += int(sample)
                self._count_locked(time.perf_counter() - start, 0.0)
                return
        base_s = time.perf_counter() - start
        drift_start = time.perf_counter()
        assert self.baseline is not None
        try:
            counted = self.baseline.count(feeds, outputs)
        except (ValueError, TypeError, IndexError):  # a feed unlike the baseline's
            counted = ({}, {})
        drift_s = time.perf_counter() - drift_start
        with self._lock:
            for name, counts in counted[0].items():
                self._inputs[name] += counts
            for name, counts in counted[1].items():
                self._outputs[name] += counts
            self._sampled += 1
            self._drift_runs += 1
            self._drift_cost_s += drift_s
            self._count_locked(base_s, drift_s)

    def _count_locked(self, base_s: float, drift_s: float) -> None:
        self.spent_s += base_s + drift_s
        self._base_cost_s += base_s
        self._seen += 1
        if self._seen >= ADJUST_EVERY:
            self._adjust_locked()

    def _fold_locked(self) -> None:
        add_many(self._sketch, self._latencies)
        self._latencies = []

    def _adjust_locked(self) -> None:
        """Choose the rate so that base cost + rate x drift cost <= budget x inference."""
        if self._drift_runs and self.baseline is not None:
            per_request_infer = self._infer_s / self._seen
            per_request_base = self._base_cost_s / self._seen
            per_drift = self._drift_cost_s / self._drift_runs
            room = HEADROOM * self.budget * per_request_infer - per_request_base
            rate = room / per_drift if per_drift > 0 else 1.0
            # Never freeze at 0: a rate that starved keeps a trickle to measure costs by.
            self.sample_rate = float(min(1.0, max(rate, 1 / 4096, self.min_rate)))
        # Exponential forgetting: the costs follow the model's current load.
        self._seen //= 2
        self._infer_s /= 2
        self._base_cost_s /= 2
        self._drift_cost_s /= 2
        self._drift_runs //= 2

    def peek(self) -> IntervalFigures:
        """The interval's figures so far (for the crash-safe draft), without resetting."""
        with self._lock:
            return self._figures_locked()

    def harvest(self) -> IntervalFigures:
        """The interval's figures; the next interval starts empty."""
        with self._lock:
            figures = self._figures_locked()
            self._sketch = new_sketch()
            self._latencies = []
            self._sampled = 0
            for counts in (*self._inputs.values(), *self._outputs.values()):
                counts[:] = 0
            return figures

    def _figures_locked(self) -> IntervalFigures:
        self._fold_locked()
        return IntervalFigures(
            latency_ms=to_wire(self._sketch),
            sampled=self._sampled,
            sample_rate=round(self.sample_rate, 6),
            inputs=_counts(self._inputs, self.baseline.inputs if self.baseline else {}),
            outputs=_counts(self._outputs, self.baseline.outputs if self.baseline else {}),
        )


def _zeros(tensors: dict[str, TensorDrift]) -> dict[str, np.ndarray]:
    return {k: np.zeros(d.shape, np.int64) for k, d in tensors.items()}


def _counts(
    arrays: dict[str, np.ndarray], tensors: dict[str, TensorDrift]
) -> dict[str, TensorCounts]:
    return {
        name: TensorCounts(kind=tensors[name].kind, counts=counts.tolist())
        for name, counts in arrays.items()
    }
