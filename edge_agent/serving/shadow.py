"""Shadow mode: a candidate model runs beside the active one on a sample of live requests.

Its outputs are never returned. A single background worker runs it on the same inputs after
the active model has answered, so a slow or broken candidate cannot delay a response; when the
worker falls behind, samples are dropped (and counted), never queued without bound. Reported
per shadow: samples, drops, errors, top-1 agreement (classifier-like outputs), the largest
absolute difference, and latency p50/p95 of both models on the same requests.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.contracts.errors import EdgefleetError

if TYPE_CHECKING:  # the table holds shadows; a shadow holds a model from the table
    from edge_agent.serving.table import ServingModel

log = logging.getLogger(__name__)

QUEUE_SIZE = 64


@dataclass
class ShadowStats:
    samples: int = 0
    dropped: int = 0
    errors: int = 0
    agree: int = 0
    compared_rows: int = 0
    max_abs_diff: float = 0.0
    active_ms: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    shadow_ms: deque[float] = field(default_factory=lambda: deque(maxlen=1000))

    def report(self) -> dict[str, Any]:
        def pct(values: deque[float], q: float) -> float | None:
            return round(float(np.percentile(values, q)), 3) if values else None

        return {
            "samples": self.samples,
            "dropped": self.dropped,
            "errors": self.errors,
            "top1_agreement": round(self.agree / self.compared_rows, 4)
            if self.compared_rows
            else None,
            "max_abs_diff": self.max_abs_diff,
            "active_p50_ms": pct(self.active_ms, 50),
            "shadow_p50_ms": pct(self.shadow_ms, 50),
            "active_p95_ms": pct(self.active_ms, 95),
            "shadow_p95_ms": pct(self.shadow_ms, 95),
        }


@dataclass
class Shadow:
    slot: str
    serving: ServingModel
    sample_rate: float
    stats: ShadowStats = field(default_factory=ShadowStats)
    lock: threading.Lock = field(default_factory=threading.Lock)


def compare(
    stats: ShadowStats, active: dict[str, np.ndarray], shadow: dict[str, np.ndarray]
) -> None:
    for name, a in active.items():
        s = shadow.get(name)
        if s is None or s.shape != a.shape:
            stats.errors += 1
            continue
        if a.dtype.kind == "f" and a.size:
            stats.max_abs_diff = max(stats.max_abs_diff, float(np.nanmax(np.abs(a - s))))
        if a.ndim == 2 and a.shape[1] > 1:
            stats.agree += int((a.argmax(1) == s.argmax(1)).sum())
            stats.compared_rows += a.shape[0]


#: Told of each answer a shadow gave to a request with an id: (request id, shadow slot,
#: the shadow's model, its outputs).
OnAnswer = Callable[[str, str, "ServingModel", dict[str, np.ndarray]], None]


class ShadowRunner:
    def __init__(self, on_answer: OnAnswer | None = None) -> None:
        self._on_answer = on_answer
        self._queue: queue.Queue[
            tuple[Shadow, dict[str, np.ndarray], dict[str, np.ndarray], float, str | None]
        ] = queue.Queue(QUEUE_SIZE)
        self._thread = threading.Thread(target=self._work, name="edge-agent-shadow", daemon=True)
        self._thread.start()

    def offer(
        self,
        shadow: Shadow,
        feeds: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
        active_ms: float,
        request_id: str | None = None,
    ) -> None:
        if random.random() >= shadow.sample_rate:
            return
        try:
            self._queue.put_nowait((shadow, feeds, outputs, active_ms, request_id))
        except queue.Full:
            with shadow.lock:
                shadow.stats.dropped += 1

    def drain(self, timeout_s: float = 5.0) -> None:
        """Wait until queued samples are processed (tests, reporting)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)

    def _work(self) -> None:
        while True:
            shadow, feeds, outputs, active_ms, request_id = self._queue.get()
            try:
                start = time.perf_counter()
                try:
                    result = shadow.serving.model.run(feeds)
                except EdgefleetError:
                    shadow.serving.stats.record(None, error=True)
                    with shadow.lock:
                        shadow.stats.samples += 1
                        shadow.stats.errors += 1
                    continue
                shadow_ms = (time.perf_counter() - start) * 1000
                # The shadow version's own figures, for fleet telemetry.
                shadow.serving.stats.record(shadow_ms, outputs=result)
                shadow.serving.telemetry.record(shadow_ms, feeds, result)
                with shadow.lock:
                    st = shadow.stats
                    st.samples += 1
                    st.active_ms.append(active_ms)
                    st.shadow_ms.append(shadow_ms)
                    compare(st, outputs, result)
                if request_id is not None and self._on_answer is not None:
                    self._on_answer(request_id, shadow.slot, shadow.serving, result)
            except Exception:  # the shadow must never take the agent down
                log.exception("shadow run failed")
            finally:
                self._queue.task_done()
