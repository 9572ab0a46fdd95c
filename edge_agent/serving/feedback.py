"""Ground truth from the field: request ids, the predictions kept for them, labels joined.

Every prediction gets a request id (``X-Edgefleet-Request-Id``). For models with a
classifier-like output (:func:`class_output`), the agent keeps what it answered — the top-1
class of each row, never the inputs — in a bounded store (:class:`FeedbackStore`: at most
``capacity`` requests, none older than ``max_age_s``; the oldest go first). An application
that learns the truth later posts ``{request_id, label}`` to ``/v1/models/{name}:feedback``;
the label is joined to the kept prediction and counted per (slot, role, version): labelled
rows and correct ones. A label whose id is unknown, expired, already labelled, or kept for
another model is counted as ``late``.

A shadow that ran on the same request keeps its own answer under the same id, so one label
scores both the active version and the candidate beside it.

The counts are harvested into fleet telemetry by the reporter. The store itself lives in
memory: a restart forgets the kept predictions (their labels then count as late), never the
counted labels — the feedback route returns only once they are in the telemetry outbox's
durable draft.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_agent.bundle import Manifest
from edge_agent.contracts.errors import RequestError
from edge_agent.protocol.status import VersionRef

__all__ = [
    "MAX_LABELS_PER_REQUEST",
    "MAX_ROWS_KEPT",
    "Answer",
    "FeedbackStore",
    "Key",
    "LabelCounts",
    "Verdict",
    "answer_key",
    "class_output",
    "parse_feedback",
]

Role = Literal["active", "shadow"]
#: Rows of one request whose answers are kept (a larger batch keeps none: labels are per row).
MAX_ROWS_KEPT = 256
#: Labels one feedback request may carry.
MAX_LABELS_PER_REQUEST = 10_000
MAX_REQUEST_ID = 64


def class_output(manifest: Manifest, drift_kinds: dict[str, str]) -> tuple[str, int] | None:
    """The output whose top-1 class is the prediction, and its number of classes: the first
    output the drift baseline counts as ``top1``, else the first float output whose last
    dimension is a fixed count above 1; None for models with no such output."""
    specs = list(manifest.outputs)
    ordered = [s for s in specs if drift_kinds.get(s.name) == "top1"] + specs
    for spec in ordered:
        shape = list(spec.shape or [])
        last = shape[-1] if shape else None
        if isinstance(last, int) and last > 1 and str(spec.dtype).startswith("float"):
            return spec.name, last
    return None


#: (slot, role, model, version, bundle_sha256)
Key = tuple[str, Role, str, str, str]
#: One answer: the class of the request's one row (an int), or of each of its rows.
Answer = int | np.ndarray


def answer_key(slot: str, role: Role, ref: VersionRef) -> Key:
    return (slot, role, ref.model, ref.version, ref.bundle_sha256)


def _rows(answer: Answer) -> int:
    return 1 if isinstance(answer, int) else len(answer)


def _right(answer: Answer, truth: list[int]) -> int:
    if isinstance(answer, int):
        return int(answer == truth[0])
    return int((answer == np.asarray(truth)).sum())


@dataclass
class LabelCounts:
    labelled: int = 0
    correct: int = 0
    late: int = 0


@dataclass(frozen=True)
class Verdict:
    accepted: int
    correct: int
    late: int

    def to_json(self) -> dict[str, int]:
        return {"accepted": self.accepted, "correct": self.correct, "late": self.late}


def parse_feedback(body: Any) -> list[tuple[str, list[int]]]:
    """``{"request_id", "label"}`` or ``{"feedback": [...]}`` → [(request id, labels per row)].
    Raises RequestError naming the entry and field that is wrong; nothing is applied."""
    if not isinstance(body, dict):
        raise RequestError("feedback is a JSON object", reason="bad_feedback")
    if "feedback" in body:
        if set(body) != {"feedback"}:
            raise RequestError("a feedback batch holds only 'feedback'", reason="bad_feedback")
        entries = body["feedback"]
        if not isinstance(entries, list) or not entries:
            raise RequestError("'feedback' is a non-empty list", reason="bad_feedback")
    else:
        entries = [body]
    if len(entries) > MAX_LABELS_PER_REQUEST:
        raise RequestError(
            f"{len(entries)} labels in one request (limit {MAX_LABELS_PER_REQUEST})",
            reason="too_many_labels",
        )
    out: list[tuple[str, list[int]]] = []
    for i, entry in enumerate(entries):
        where = f"feedback[{i}]" if "feedback" in body else "feedback"
        if not isinstance(entry, dict) or set(entry) != {"request_id", "label"}:
            raise RequestError(
                f"{where}: give exactly 'request_id' and 'label'", reason="bad_feedback"
            )
        rid, label = entry["request_id"], entry["label"]
        if not isinstance(rid, str) or not 0 < len(rid) <= MAX_REQUEST_ID:
            raise RequestError(
                f"{where}.request_id: a string of 1..{MAX_REQUEST_ID} characters",
                reason="bad_feedback",
            )
        labels = label if isinstance(label, list) else [label]
        if not labels or len(labels) > MAX_ROWS_KEPT:
            raise RequestError(
                f"{where}.label: a class index, or a list of 1..{MAX_ROWS_KEPT}",
                reason="bad_label",
            )
        for value in labels:
            if isinstance(value, bool) or not isinstance(value, int):
                raise RequestError(
                    f"{where}.label: {value!r} is not a class index (an integer)",
                    reason="bad_label",
                )
        out.append((rid, labels))
    return out


class FeedbackStore:
    """Thread-safe: request threads keep predictions, the feedback route joins labels, the
    telemetry reporter harvests the counts."""

    def __init__(
        self,
        *,
        capacity: int = 100_000,
        max_age_s: float = 24 * 3600,
        max_labels_per_s: float = 1000.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = capacity
        self.max_age_s = max_age_s
        self.max_labels_per_s = max_labels_per_s
        self._clock = clock
        self._lock = threading.Lock()
        #: request id → (kept at, the slot's key, its answer): the hot path adds one tuple.
        self._kept: OrderedDict[str, tuple[float, Key, Answer]] = OrderedDict()
        #: request id → the answers of shadows that ran on it (a sample of requests).
        self._shadows: OrderedDict[str, list[tuple[Key, Answer]]] = OrderedDict()
        self._counts: dict[Key, LabelCounts] = {}
        #: Never reset: the agent's /metrics.
        self._totals: dict[Key, LabelCounts] = {}
        self.refused: dict[str, int] = {}
        self._prefix = os.urandom(6).hex()
        self._ids = itertools.count(1)
        # Token bucket for labels: max_labels_per_s, bursts of ten seconds' worth.
        self._tokens = max_labels_per_s * 10
        self._refilled = clock()
        #: Makes the counts so far durable (the telemetry reporter's checkpoint); the feedback
        #: route answers only after it returned.
        self.persist: Callable[[], None] = lambda: None

    # --- the predict path ------------------------------------------------------------------------
    def new_id(self) -> str:
        return self._prefix + format(next(self._ids), "x")

    def keep(self, request_id: str, key: Key, answer: Answer) -> None:
        """Keep ``answer`` as the active version's (``key``) to ``request_id``."""
        at = self._clock()
        with self._lock:
            kept = self._kept
            kept[request_id] = (at, key, answer)
            if len(kept) > self.capacity:
                kept.popitem(last=False)

    def keep_shadow(self, request_id: str, key: Key, answer: Answer) -> None:
        """A shadow's answer to a request the active version answered (and kept)."""
        with self._lock:
            if request_id not in self._kept:
                return  # forgotten already, or not kept (no class output)
            self._shadows.setdefault(request_id, []).append((key, answer))
            if len(self._shadows) > self.capacity:
                self._shadows.popitem(last=False)

    # --- labels ----------------------------------------------------------------------------------
    def label(
        self,
        slot: str,
        active: VersionRef,
        labels: Sequence[tuple[str, list[int]]],
        classes: int,
    ) -> Verdict:
        """Join ``labels`` to the predictions kept for ``slot``. Every label is checked before
        any is counted: a class out of range, a row count unlike the prediction's, or a flood
        past the rate bound is refused whole (RequestError), counting nothing."""
        for i, (_rid, rows) in enumerate(labels):
            for value in rows:
                if not 0 <= value < classes:
                    raise RequestError(
                        f"label {value} of entry {i} is not one of the model's {classes} "
                        f"classes (0..{classes - 1})",
                        reason="bad_label",
                    )
        now = self._clock()
        with self._lock:
            self._expire_locked(now)
            self._refill_locked(now)
            if self._tokens < len(labels):
                self.refused["rate"] = self.refused.get("rate", 0) + len(labels)
                raise RequestError(
                    f"more than {self.max_labels_per_s:g} labels a second; retry later",
                    reason="too_many_labels",
                )
            joined: list[tuple[str, list[int], list[tuple[Key, Answer]]]] = []
            for rid, rows in labels:
                kept = self._kept.get(rid)
                # The request's answers (the slot's, and a shadow's beside it), if this slot
                # answered it.
                mine: list[tuple[Key, Answer]] = []
                if kept is not None and kept[1][0] == slot:
                    mine = [(kept[1], kept[2]), *self._shadows.get(rid, [])]
                if mine and _rows(mine[0][1]) != len(rows):
                    raise RequestError(
                        f"request {rid} answered {_rows(mine[0][1])} row(s); "
                        f"its label has {len(rows)}",
                        reason="bad_label",
                    )
                joined.append((rid, rows, mine))
            self._tokens -= len(labels)
            accepted = correct_active = late = 0
            late_key = answer_key(slot, "active", active)
            for rid, rows, mine in joined:
                if not mine:
                    late += 1
                    self._add_locked(late_key, 0, 0, 1)
                    continue
                del self._kept[rid]  # one label per prediction
                self._shadows.pop(rid, None)
                accepted += 1
                for key, answer in mine:
                    right = _right(answer, rows)
                    self._add_locked(key, len(rows), right, 0)
                    if key[1] == "active":
                        correct_active += right
            return Verdict(accepted, correct_active, late)

    def _add_locked(self, key: Key, labelled: int, correct: int, late: int) -> None:
        for table in (self._counts, self._totals):
            c = table.setdefault(key, LabelCounts())
            c.labelled += labelled
            c.correct += correct
            c.late += late

    def _refill_locked(self, now: float) -> None:
        burst = self.max_labels_per_s * 10
        self._tokens = min(burst, self._tokens + (now - self._refilled) * self.max_labels_per_s)
        self._refilled = now

    def _expire_locked(self, now: float) -> None:
        horizon = now - self.max_age_s
        while self._kept:
            rid, kept = next(iter(self._kept.items()))
            if kept[0] >= horizon:
                break
            del self._kept[rid]
            self._shadows.pop(rid, None)

    # --- reporting -------------------------------------------------------------------------------
    def counts(self, *, reset: bool) -> dict[Key, LabelCounts]:
        """Label counts since the last reset (the reporter's interval)."""
        with self._lock:
            out = {k: LabelCounts(c.labelled, c.correct, c.late) for k, c in self._counts.items()}
            if reset:
                self._counts.clear()
            return out

    def __len__(self) -> int:
        with self._lock:
            return len(self._kept)

    def collector(self) -> Collector:
        return _FeedbackCollector(self)


class _FeedbackCollector(Collector):
    def __init__(self, store: FeedbackStore) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        labels = CounterMetricFamily(
            "edgefleet_agent_feedback_labels",
            "Labels from applications, by the version that answered and whether it was right",
            labels=["slot", "role", "version", "outcome"],
        )
        with self._store._lock:
            totals = list(self._store._totals.items())
            refused = dict(self._store.refused)
        for (slot, role, _model, version, _sha), c in totals:
            for outcome, n in (
                ("correct", c.correct),
                ("wrong", c.labelled - c.correct),
                ("late", c.late),
            ):
                labels.add_metric([slot, role, version, outcome], n)
        kept = GaugeMetricFamily(
            "edgefleet_agent_feedback_kept_predictions",
            "Predictions kept for labels (bounded by capacity and age)",
        )
        kept.add_metric([], len(self._store))
        refusals = CounterMetricFamily(
            "edgefleet_agent_feedback_refused_labels",
            "Labels refused (rate bound)",
            labels=["reason"],
        )
        for reason, n in refused.items():
            refusals.add_metric([reason], n)
        yield from (labels, kept, refusals)
