"""Latency sketches: DDSketch (``ddsketch``) with 1 % relative accuracy, and its wire form.

A sketch is mergeable: the server adds the bin counts of sketches from many devices and
intervals and reads fleet quantiles off the sum, exact to the sketch's relative accuracy —
never an average of per-device percentiles. Latencies are positive, so only the positive store
travels; values below the mapping's smallest positive value count as zeros.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from ddsketch import DDSketch
from ddsketch.ddsketch import BaseDDSketch
from ddsketch.mapping import LogarithmicMapping
from ddsketch.store import DenseStore

from edge_agent.protocol.telemetry import LatencySketch

__all__ = [
    "RELATIVE_ACCURACY",
    "add_many",
    "from_wire",
    "merge_wire",
    "merge_wires",
    "new_sketch",
    "quantile",
    "to_wire",
]

RELATIVE_ACCURACY = 0.01


def new_sketch() -> BaseDDSketch:
    return DDSketch(RELATIVE_ACCURACY)


def add_many(sketch: BaseDDSketch, values: Sequence[float]) -> None:
    """Add latencies (never negative) at once: what ``sketch.add`` does value by value, with
    the keys computed by numpy. The serving path appends a latency to a list (tens of
    nanoseconds) and the list is folded in here now and then, instead of a ~1 µs ``add`` per
    request (several µs on a board whose caches the model has just flushed). A value on a
    bin's very edge may land one bin over (numpy's and libm's log differ by an ulp): within
    the sketch's relative accuracy, as every value is."""
    if not values:
        return
    v = np.asarray(values, dtype=np.float64)
    mapping = sketch._mapping
    positive = v[v > mapping.min_possible]
    if positive.size:
        # LogarithmicMapping.key (ddsketch 3.0.1): ceil(log2(v) * multiplier) + offset
        keys = np.ceil(np.log(positive) / math.log(2) * mapping._multiplier) + mapping._offset
        found, counts = np.unique(keys.astype(np.int64), return_counts=True)
        for key, count in zip(found.tolist(), counts.tolist(), strict=True):
            sketch._store.add(key, count)
    sketch._zero_count += int(v.size - positive.size)
    sketch._count += int(v.size)
    sketch._sum += float(v.sum())
    sketch._min = min(sketch._min, float(v.min()))
    sketch._max = max(sketch._max, float(v.max()))


def to_wire(sketch: BaseDDSketch) -> LatencySketch | None:
    """The sketch's wire form; None when it holds no value."""
    if sketch.count == 0:
        return None
    # ddsketch 3.0.1's DenseStore keeps bins[i] for key offset + i; the bins between the
    # smallest and largest key used are what carries the distribution.
    store = sketch._store
    lo, hi = store.min_key, store.max_key
    counts = (
        [] if store.count == 0 else [int(store.bins[k - store.offset]) for k in range(lo, hi + 1)]
    )
    return LatencySketch(
        relative_accuracy=sketch._mapping.relative_accuracy,
        zero_count=int(sketch._zero_count),
        key_offset=int(lo) if counts else 0,
        counts=counts,
        sum_ms=max(0.0, float(sketch.sum)),
        min_ms=max(0.0, float(sketch._min)),
        max_ms=max(0.0, float(sketch._max)),
    )


def from_wire(wire: LatencySketch) -> BaseDDSketch:
    """A sketch equal to the one ``wire`` was made from (counts, sum, min, max)."""
    store = DenseStore()
    for i, count in enumerate(wire.counts):
        if count:
            store.add(wire.key_offset + i, count)
    sketch = BaseDDSketch(
        LogarithmicMapping(wire.relative_accuracy), store, DenseStore(), wire.zero_count
    )
    sketch._sum = wire.sum_ms
    if wire.min_ms is not None and sketch.count:
        sketch._min = wire.min_ms
    if wire.max_ms is not None and sketch.count:
        sketch._max = wire.max_ms
    return sketch


def merge_wire(sketches: list[LatencySketch]) -> BaseDDSketch:
    """One sketch holding every value of ``sketches`` (all must share an accuracy)."""
    merged = merge_wires(sketches)
    return from_wire(merged) if merged is not None else new_sketch()


def merge_wires(sketches: list[LatencySketch]) -> LatencySketch | None:
    """The wire form of the merge, computed on the bin counts alone (the server merges
    thousands of sketches per second: array sums, not one store update per bin)."""
    # Holding a value: a zero count, or any bin (any() stops at the first; .count sums all).
    # Bins that are all zero add nothing (and a sketch of only such bins, which a device may
    # send, would leave nothing to trim to).
    present: list[LatencySketch] = []
    binned: list[LatencySketch] = []
    for w in sketches:
        has_bins = any(w.counts)
        if has_bins:
            binned.append(w)
        if has_bins or w.zero_count:
            present.append(w)
    if not present:
        return None
    accuracy = present[0].relative_accuracy
    if any(w.relative_accuracy != accuracy for w in present):
        raise ValueError("cannot merge sketches of different relative accuracy")
    counts: list[int] = []
    offset = 0
    if binned:
        offset = min(w.key_offset for w in binned)
        end = max(w.key_offset + len(w.counts) for w in binned)
        total = np.zeros(end - offset, np.int64)
        for w in binned:
            start = w.key_offset - offset
            total[start : start + len(w.counts)] += np.fromiter(w.counts, np.int64, len(w.counts))
        nonzero = np.flatnonzero(total)
        total = total[nonzero[0] : nonzero[-1] + 1]
        offset += int(nonzero[0])
        counts = total.tolist()
    mins = [w.min_ms for w in present if w.min_ms is not None]
    maxs = [w.max_ms for w in present if w.max_ms is not None]
    return LatencySketch(
        relative_accuracy=accuracy,
        zero_count=sum(w.zero_count for w in present),
        key_offset=offset,
        counts=counts,
        sum_ms=sum(w.sum_ms for w in present),
        min_ms=min(mins) if mins else None,
        max_ms=max(maxs) if maxs else None,
    )


def quantile(sketch: BaseDDSketch, q: float) -> float | None:
    value = sketch.get_quantile_value(q)
    return None if value is None else float(value)
