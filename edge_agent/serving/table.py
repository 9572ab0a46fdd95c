"""The table of models being served: slot name → the loaded model answering for it.

Invariant: a request runs on the model that was active when it started. A swap replaces the
slot's reference atomically under a lock; the old model is closed only once its last
in-flight request has finished (reference counted), so a swap never fails a request. A shadow
candidate hangs off the active slot it runs beside (see :mod:`edge_agent.serving.shadow`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np

from edge_agent.bundle import Manifest
from edge_agent.protocol.status import VersionRef
from edge_agent.protocol.telemetry import Role, Workload
from edge_agent.runtimes import LoadedModel
from edge_agent.serving.feedback import (
    Answer,
    FeedbackStore,
    Key,
    answer_key,
    class_output,
    top1_of,
)
from edge_agent.serving.shadow import Shadow, ShadowRunner
from edge_agent.serving.stats import ModelStats, StatsSnapshot
from edge_agent.telemetry.drift import Baseline
from edge_agent.telemetry.figures import ModelTelemetry

__all__ = ["Lane", "MetricsSource", "ServingModel", "SlotTable"]


class MetricsSource(Protocol):
    """More figures for the local ``/metrics``: a Prometheus collector (``collect()`` yields
    metric families). prometheus-client itself is imported at the first scrape, not before:
    ~10 MiB that an agent nobody scrapes never needs."""

    def collect(self) -> Iterable[Any]: ...


class Lane:
    """One workload of a serving model (``batch``: files scored by ``edge-agent score``;
    ``stream``: a local stream's messages), counted apart from its online requests: its own
    request counters and telemetry, reported under the workload's role. What probation judges
    (errors, NaN/inf) counts every lane too (:meth:`ServingModel.health`)."""

    def __init__(self, serving: ServingModel, workload: Workload) -> None:
        self.serving = serving
        self.workload = workload
        self.ref = serving.ref
        self.stats = ModelStats()
        self.telemetry = ModelTelemetry(serving.telemetry.baseline, enabled=False)

    @property
    def finished(self) -> bool:
        return self.serving.finished


class ServingModel:
    """A loaded model plus the count of requests running on it."""

    def __init__(
        self,
        ref: VersionRef,
        manifest: Manifest,
        model: LoadedModel,
        baseline: Baseline | None = None,
    ) -> None:
        self.ref = ref
        self.manifest = manifest
        self.model = model
        #: Live requests, and the agent's own probes (kept apart: probes use fixed inputs).
        self.stats = ModelStats()
        self.probe_stats = ModelStats()
        #: Latency sketch and drift counts of live requests, for fleet telemetry (recording
        #: starts when a telemetry reporter tracks the model).
        self.telemetry = ModelTelemetry(baseline, enabled=False)
        #: The output whose top-1 class is the answer, and its classes (labels join to it).
        self.classes = class_output(
            manifest, {k: d.kind for k, d in (baseline.outputs if baseline else {}).items()}
        )
        #: Batch and stream workloads on it, counted apart (:meth:`SlotTable.lane`).
        self.lanes: dict[Workload, Lane] = {}
        #: The slot it serves, and its key for kept answers (set when it starts serving).
        self.slot: str | None = None
        self.answer_key: Key | None = None
        self._in_flight = 0
        self._retired = False
        self._lock = threading.Lock()

    def _hold(self) -> bool:
        """Count a request in, unless the model is retired (then the caller looks again)."""
        with self._lock:
            if self._retired:
                return False
            self._in_flight += 1
            return True

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1
            if self._retired and self._in_flight == 0:
                self.model.close()

    @property
    def finished(self) -> bool:
        """Retired, and its last request has finished: its figures are final."""
        with self._lock:
            return self._retired and self._in_flight == 0

    def retire(self) -> None:
        """Close the model as soon as no request is running on it; no new request starts on
        it from now on."""
        with self._lock:
            self._retired = True
            if self._in_flight == 0:
                self.model.close()

    def health(self) -> StatsSnapshot:
        """What probation judges: requests, errors and NaN/inf of every workload (a model
        that fails a stream's messages fails), latencies of online requests only (a batch's
        latency is not a request's)."""
        live = self.stats.snapshot()
        lanes = [lane.stats.snapshot() for lane in list(self.lanes.values())]
        return StatsSnapshot(
            live.requests + sum(s.requests for s in lanes),
            live.errors + sum(s.errors for s in lanes),
            live.nonfinite + sum(s.nonfinite for s in lanes),
            live.latency_ms,
        )

    def top1(self, outputs: dict[str, np.ndarray]) -> Answer | None:
        """The class of the answer's one row (an int), or of each of its rows, when it has a
        class output and few rows."""
        if self.classes is None:
            return None
        name, classes = self.classes
        return top1_of(outputs.get(name), classes)

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.ref.model,
            "version": self.ref.version,
            "bundle_sha256": self.ref.bundle_sha256,
            "runtime": self.ref.runtime,
            "precision": self.ref.precision,
            "inputs": [s.to_dict() for s in self.manifest.inputs],
            "outputs": [s.to_dict() for s in self.manifest.outputs],
            "preprocess": self.manifest.preprocess.to_dict() if self.manifest.preprocess else None,
        }


class SlotTable:
    """Slot name → the model serving it."""

    def __init__(self) -> None:
        self._slots: dict[str, ServingModel] = {}
        #: active slot → the candidate running beside it in shadow mode
        self._shadows: dict[str, Shadow] = {}
        self._runner: ShadowRunner | None = None
        self._lock = threading.Lock()
        #: Told of every model that starts answering requests (slot, role, model), and of every
        #: workload lane that starts on one: telemetry.
        self.on_serving: Callable[[str, Role, ServingModel | Lane], None] | None = None
        #: More Prometheus collectors for the local ``/metrics`` (the telemetry outbox's).
        self.collectors: list[MetricsSource] = []
        #: Request ids and kept answers for labels from applications (None: off).
        self.feedback: FeedbackStore | None = None

    def attach_shadow(
        self, shadow_slot: str, active_slot: str, serving: ServingModel, sample_rate: float
    ) -> ServingModel | None:
        """Run ``serving`` on a sample of ``active_slot``'s requests; returns (and retires) the
        model it replaces as that slot's shadow."""
        with self._lock:
            if self._runner is None:
                self._runner = ShadowRunner(on_answer=self._kept_shadow_answer)
            old = self._shadows.get(active_slot)
            self._shadows[active_slot] = Shadow(shadow_slot, serving, sample_rate)
        if self.on_serving is not None:
            self.on_serving(shadow_slot, "shadow", serving)
        if old is not None:
            old.serving.retire()
            return old.serving
        return None

    def detach_shadow(self, shadow_slot: str) -> None:
        with self._lock:
            found = [a for a, s in self._shadows.items() if s.slot == shadow_slot]
            gone = [self._shadows.pop(a) for a in found]
        for shadow in gone:
            shadow.serving.retire()

    def take_shadow(self, bundle_sha256: str) -> ServingModel | None:
        """Detach the shadow running ``bundle_sha256`` and hand it over loaded (not retired):
        a version staged beside the active one becomes the active one without loading it
        again (stage then activate)."""
        with self._lock:
            found = next(
                (
                    a
                    for a, s in self._shadows.items()
                    if s.serving.ref.bundle_sha256 == bundle_sha256
                ),
                None,
            )
            shadow = self._shadows.pop(found) if found is not None else None
        return shadow.serving if shadow is not None else None

    def shadow_report(self, shadow_slot: str) -> dict[str, Any] | None:
        with self._lock:
            shadow = next((s for s in self._shadows.values() if s.slot == shadow_slot), None)
            active = next((a for a, s in self._shadows.items() if s.slot == shadow_slot), None)
        if shadow is None:
            return None
        with shadow.lock:
            figures = shadow.stats.report()
        return {
            "of": active,
            "model": shadow.serving.ref.model,
            "version": shadow.serving.ref.version,
            "bundle_sha256": shadow.serving.ref.bundle_sha256,
            "sample_rate": shadow.sample_rate,
            **figures,
        }

    def offer_shadow(
        self,
        slot: str,
        feeds: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
        latency_ms: float,
        request_id: str | None = None,
    ) -> None:
        shadow = self._shadows.get(slot)  # a dict read: no lock on the hot path
        if shadow is not None and self._runner is not None:
            self._runner.offer(shadow, feeds, outputs, latency_ms, request_id)

    def _kept_shadow_answer(
        self, request_id: str, shadow_slot: str, serving: ServingModel, outputs: dict[str, Any]
    ) -> None:
        """A shadow answered a live request: keep its answer for the request's label too."""
        if self.feedback is not None:
            top1 = serving.top1(outputs)
            if top1 is not None:
                key = answer_key(shadow_slot, "shadow", serving.ref)
                self.feedback.keep_shadow(request_id, key, top1)

    def drain_shadows(self) -> None:
        if self._runner is not None:
            self._runner.drain()

    def swap(self, slot: str, new: ServingModel, *, retire_old: bool = True) -> ServingModel | None:
        """Make ``new`` serve ``slot`` and return the model it replaced, which is retired
        unless ``retire_old`` is False (probation keeps it loaded to switch back to)."""
        new.slot = slot
        new.answer_key = answer_key(slot, "active", new.ref)
        with self._lock:
            old = self._slots.get(slot)
            self._slots[slot] = new
        if self.on_serving is not None:
            self.on_serving(slot, "active", new)
        if old is not None and retire_old:
            old.retire()
        return old

    def lane(self, serving: ServingModel, workload: Workload) -> Lane:
        """``serving``'s lane for ``workload``, made (and its telemetry tracked) on first use."""
        lane = serving.lanes.get(workload)  # a dict read: no lock on the hot path
        if lane is not None:
            return lane
        with self._lock:
            lane = serving.lanes.get(workload)
            made = lane is None
            if lane is None:
                lane = serving.lanes[workload] = Lane(serving, workload)
        if made and self.on_serving is not None and serving.slot is not None:
            self.on_serving(serving.slot, workload, lane)
        return lane

    def remove(self, slot: str) -> None:
        with self._lock:
            old = self._slots.pop(slot, None)
        if old is not None:
            old.retire()

    def _resolve_locked(self, name: str) -> str | None:
        if name in self._slots:
            return name
        return next((s for s, m in self._slots.items() if m.ref.model == name), None)

    def resolve(self, name: str) -> str | None:
        """A slot name, or the model name a slot serves."""
        with self._lock:
            return self._resolve_locked(name)

    def acquire(self, name: str) -> ServingModel:
        """The model serving ``name``, held (not closed by a swap) until its ``_release()``."""
        # The hot path takes no table lock: a dict read is atomic, and a model that a swap has
        # retired in the meantime refuses the hold, so the request looks again.
        serving = self._slots.get(name)
        if serving is not None and serving._hold():
            return serving
        with self._lock:  # a model name rather than a slot's, or a slot being swapped
            slot = self._resolve_locked(name)
            # Whatever is in the table is not retired (swap and remove take it out first).
            held = self._slots.get(slot) if slot is not None else None
            if held is None or not held._hold():
                raise LookupError(name)
        return held

    @contextmanager
    def use(self, name: str) -> Iterator[ServingModel]:
        """The model serving ``name``, held for the duration of the block."""
        serving = self.acquire(name)
        try:
            yield serving
        finally:
            serving._release()

    def snapshot(self) -> dict[str, ServingModel]:
        with self._lock:
            return dict(self._slots)

    def close(self) -> None:
        with self._lock:
            slots, self._slots = self._slots, {}
        for serving in slots.values():
            serving.retire()
