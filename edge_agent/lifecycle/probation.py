"""Probation: after a switch, watch the new version before committing to it.

Checked, from live requests and from periodic probes with the bundle's self-test inputs:
errors (the runtime failed a request), NaN/inf outputs, and latency p95 against the prior
version's. Latency is compared like with like: live p95 against the prior's live p95 when both
saw enough requests, otherwise probe p95 against the prior's probe p95 measured on the same
inputs before the switch.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class ProbationPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    window_s: float = Field(default=30.0, ge=0)
    probe_interval_s: float = Field(default=1.0, gt=0)
    #: Errors per request above which the new version is rolled back.
    max_error_rate: float = Field(default=0.01, ge=0, le=1)
    #: Roll back on any NaN/inf output.
    allow_nonfinite: bool = False
    #: New p95 may be at most this multiple of the prior's (plus ``latency_slack_ms``).
    max_latency_ratio: float = Field(default=2.0, gt=1)
    latency_slack_ms: float = Field(default=0.5, ge=0)
    min_latency_samples: int = Field(default=20, ge=1)


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

    def since(self, earlier: StatsSnapshot) -> StatsSnapshot:
        n = self.requests - earlier.requests
        return StatsSnapshot(
            n,
            self.errors - earlier.errors,
            self.nonfinite - earlier.nonfinite,
            self.latency_ms[-n:] if n > 0 else [],
        )

    def p95(self) -> float | None:
        return float(np.percentile(self.latency_ms, 95)) if self.latency_ms else None


def has_nonfinite(outputs: dict[str, np.ndarray]) -> bool:
    return any(a.dtype.kind in "fc" and not bool(np.isfinite(a).all()) for a in outputs.values())


@dataclass(frozen=True)
class Breach:
    reason: str  # error_rate / nonfinite_outputs / latency_regression
    message: str
    figures: dict[str, float]


def check_health(
    live: StatsSnapshot, probes: StatsSnapshot, policy: ProbationPolicy
) -> Breach | None:
    """Errors and NaN/inf: judged at any time, so a bad version goes at the first sign."""
    requests = live.requests + probes.requests
    errors = live.errors + probes.errors
    nonfinite = live.nonfinite + probes.nonfinite
    if not policy.allow_nonfinite and nonfinite:
        return Breach(
            "nonfinite_outputs",
            f"{nonfinite} of {requests} responses had NaN/inf outputs",
            {"nonfinite": nonfinite, "requests": requests},
        )
    if requests and errors / requests > policy.max_error_rate:
        return Breach(
            "error_rate",
            f"{errors} of {requests} requests failed ({errors / requests:.1%} > "
            f"{policy.max_error_rate:.1%})",
            {"errors": errors, "requests": requests, "error_rate": errors / requests},
        )
    return None


def live_comparable(
    live: StatsSnapshot, prior_live: StatsSnapshot | None, policy: ProbationPolicy
) -> bool:
    """Enough live requests on both versions to compare their latency on real traffic."""
    enough = policy.min_latency_samples
    return (
        prior_live is not None
        and len(live.latency_ms) >= enough
        and len(prior_live.latency_ms) >= enough
    )


def check_latency(
    live: StatsSnapshot,
    prior_live: StatsSnapshot | None,
    probes: StatsSnapshot,
    prior_probe_p95_ms: float | None,
    policy: ProbationPolicy,
) -> Breach | None:
    if live_comparable(live, prior_live, policy):
        assert prior_live is not None
        new, old, basis = live.p95(), prior_live.p95(), "live"
    else:
        new, old, basis = probes.p95(), prior_probe_p95_ms, "probe"
    if new is None or old is None:
        return None
    limit = old * policy.max_latency_ratio + policy.latency_slack_ms
    if new > limit:
        return Breach(
            "latency_regression",
            f"{basis} latency p95 {new:.2f} ms vs {old:.2f} ms for the prior version "
            f"(limit {limit:.2f} ms)",
            {"p95_ms": new, "prior_p95_ms": old, "ratio": new / old if old else float("inf")},
        )
    return None
