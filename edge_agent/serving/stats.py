"""Counters of one loaded model, updated on every request: requests, errors, NaN/inf
responses and recent latencies. Probation reads them to judge a new version; the figures are
the serving path's, so they cost it as little as possible (see ``CHECK_BATCH``).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

__all__ = ["CHECK_BATCH", "CHECK_BATCH_BYTES", "ModelStats", "StatsSnapshot", "has_nonfinite"]


#: Outputs wait to be checked for NaN/inf together, up to this many or this many bytes (or
#: until the figures are read): one check of many small outputs costs about what one check of
#: a single output does on a board whose caches the model has just flushed (~30 µs), so a
#: check per request would be most of the serving path's overhead.
CHECK_BATCH = 64
CHECK_BATCH_BYTES = 1 << 20


class ModelStats:
    """Counters of one loaded model (thread-safe; updated on every request).

    Outputs handed to ``record`` are marked read-only: they are checked for NaN/inf in
    batches, so they must not change after the request returns them.
    """

    def __init__(self, keep: int = 1000) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.errors = 0
        self._nonfinite = 0
        self._latency_ms: deque[float] = deque(maxlen=keep)
        self._unchecked: list[dict[str, np.ndarray]] = []
        self._unchecked_bytes = 0

    @property
    def nonfinite(self) -> int:
        """Responses that had a NaN/inf output."""
        with self._lock:
            self._check_locked()
            return self._nonfinite

    def record(
        self,
        latency_ms: float | None,
        *,
        error: bool = False,
        outputs: dict[str, np.ndarray] | None = None,
    ) -> None:
        nbytes = 0
        if outputs is not None:
            for arr in outputs.values():
                arr.setflags(write=False)
                nbytes += arr.nbytes
        with self._lock:
            self.requests += 1
            self.errors += int(error)
            if latency_ms is not None:
                self._latency_ms.append(latency_ms)
            if outputs is not None:
                self._unchecked.append(outputs)
                self._unchecked_bytes += nbytes
                if (
                    len(self._unchecked) >= CHECK_BATCH
                    or self._unchecked_bytes >= CHECK_BATCH_BYTES
                ):
                    self._check_locked()

    def _check_locked(self) -> None:
        if not self._unchecked:
            return
        batch, self._unchecked, self._unchecked_bytes = self._unchecked, [], 0
        floats = [a.ravel() for out in batch for a in out.values() if a.dtype.kind in "fc"]
        if floats and not np.isfinite(np.concatenate(floats)).all():
            self._nonfinite += sum(has_nonfinite(out) for out in batch)

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            self._check_locked()
            lat = list(self._latency_ms)
            return StatsSnapshot(self.requests, self.errors, self._nonfinite, lat)


@dataclass(frozen=True)
class StatsSnapshot:
    requests: int
    errors: int
    nonfinite: int
    latency_ms: list[float]

    def p95(self) -> float | None:
        return float(np.percentile(self.latency_ms, 95)) if self.latency_ms else None

    def p50(self) -> float | None:
        return float(np.percentile(self.latency_ms, 50)) if self.latency_ms else None


def has_nonfinite(outputs: dict[str, np.ndarray]) -> bool:
    return any(a.dtype.kind in "fc" and not bool(np.isfinite(a).all()) for a in outputs.values())
