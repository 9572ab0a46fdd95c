"""Timing several ways of doing one thing, side by side in one run (shared by benchmarks)."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["interleaved"]


def interleaved(
    fns: dict[str, Callable[[], object]], calls: int, *, block: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per call of each function, at least ``calls`` counted calls each. They take
    turns in blocks of ``block`` calls whose first ``warmup`` are not counted: each is measured
    warm, as under steady traffic, while the turns hand every function the same moments of a
    noisy machine."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    while any(len(got) < calls for got in samples.values()):
        for name, fn in fns.items():
            for i in range(block):
                t0 = time.perf_counter()
                fn()
                if i >= warmup:
                    samples[name].append(time.perf_counter() - t0)
    return samples
