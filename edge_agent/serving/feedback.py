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
from typing import Any

import numpy as np

from edge_agent.bundle import Manifest
from edge_agent.contracts.errors import RequestError
from edge_agent.protocol.status import VersionRef
from edge_agent.protocol.telemetry import Role

__all__ = [
    "MAX_LABELS_PER_REQUEST",
    "MAX_ROWS_KEPT",
    "RESOLVE_EVERY",
    "Answer",
    "FeedbackStore",
    "Key",
    "LabelCounts",
    "Verdict",
    "answer_key",
    "class_output",
    "parse_feedback",
    "top1_of",
]

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


#: Answers kept as their output until this many have been, then their top-1 classes found
#: at once (the memory an output holds is bounded by this many).
RESOLVE_EVERY = 64


@dataclass(frozen=True, slots=True)
class _Pending:
    """An answer kept as the output its top-1 class will be found in."""

    out: np.ndarray
    classes: int


def top1_of(out: np.ndarray | None, classes: int) -> Answer | None:
    """The class of ``out``'s one row (an int), or of each of its rows (up to
    :data:`MAX_ROWS_KEPT`); None when it is not a class output of ``classes``."""
    if out is None or out.ndim == 0 or out.shape[-1] != classes:
        return None
    if out.size == classes:
        return int(out.argmax())
    rows = out.reshape(-1, classes)
    if rows.shape[0] > MAX_ROWS_KEPT:
        return None
    top: np.ndarray = rows.argmax(axis=1)
    return top


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
        #: One place per request id, by its sequence number (``seq % capacity``): (seq, kept
        #: at, the slot's key, its answer, or the output it is the top-1 class of while
        #: :data:`RESOLVE_EVERY` requests have not passed). A list slot, not a hash table:
        #: after a large model's inference the serving path's memory is cold, and each line
        #: it touches costs; the top-1 class is found later, for many answers at once. It
        #: grows to ``capacity`` as requests come (100,000 places are 0.8 MiB, which an idle
        #: device need not hold, issue 24).
        self._ring: list[tuple[int, float, Key, Answer | _Pending] | None] = []
        self._pending: list[int] = []
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

    def answered(
        self, key: Key | None, classes: tuple[str, int] | None, outputs: dict[str, np.ndarray]
    ) -> str:
        """The serving path's one call: a new request id, and the answer kept for it when the
        model has a class output (``classes``: its name and count). The outputs are read-only
        (the serving path's statistics froze them), so the top-1 class can wait."""
        seq = next(self._ids)
        if key is not None and classes is not None:
            out = outputs.get(classes[0])
            if out is not None:
                entry = (seq, self._clock(), key, _Pending(out, classes[1]))
                with self._lock:
                    self._place_locked(seq, entry)
                    self._pending.append(seq)
                    if len(self._pending) >= RESOLVE_EVERY:
                        self._resolve_locked()
        return self._prefix + format(seq, "x")

    def keep(self, request_id: str, key: Key, answer: Answer) -> None:
        """Keep ``answer`` as the active version's (``key``) to ``request_id``."""
        seq = self._seq_of(request_id)
        if seq is None:
            return
        entry = (seq, self._clock(), key, answer)
        with self._lock:
            self._place_locked(seq, entry)

    def _place_locked(self, seq: int, entry: tuple[int, float, Key, Answer | _Pending]) -> None:
        ring, at = self._ring, seq % self.capacity
        if at >= len(ring):  # doubling: a few copies on the way to capacity
            ring.extend([None] * (min(self.capacity, max(at + 1, 2 * len(ring))) - len(ring)))
        ring[at] = entry

    def _entry_locked(self, seq: int) -> tuple[int, float, Key, Answer | _Pending] | None:
        at = seq % self.capacity
        return self._ring[at] if at < len(self._ring) else None

    def keep_shadow(self, request_id: str, key: Key, answer: Answer) -> None:
        """A shadow's answer to a request the active version answered (and kept)."""
        seq = self._seq_of(request_id)
        with self._lock:
            if seq is None or self._kept_locked(seq, self._clock()) is None:
                return  # forgotten already, or not kept (no class output)
            self._shadows.setdefault(request_id, []).append((key, answer))
            if len(self._shadows) > self.capacity:
                self._shadows.popitem(last=False)

    def _seq_of(self, request_id: str) -> int | None:
        """The sequence number of one of this store's ids, in its one spelling; else None."""
        if not request_id.startswith(self._prefix):
            return None
        try:
            seq = int(request_id[len(self._prefix) :], 16)
        except ValueError:
            return None
        return seq if seq > 0 and request_id == self._prefix + format(seq, "x") else None

    def _kept_locked(self, seq: int, now: float) -> tuple[int, float, Key, Answer] | None:
        """The kept answer of request ``seq``, unless it was labelled, overwritten, expired
        or had no class to keep."""
        self._resolve_locked()
        entry = self._entry_locked(seq)
        if entry is None or entry[0] != seq or entry[1] < now - self.max_age_s:
            return None
        return entry  # type: ignore[return-value]  # resolved above

    def _resolve_locked(self) -> None:
        """Find the top-1 classes of the answers kept as outputs."""
        ring, capacity = self._ring, self.capacity
        for seq in self._pending:
            entry = ring[seq % capacity]  # placed: within the ring
            if entry is None or entry[0] != seq or not isinstance(entry[3], _Pending):
                continue
            answer = top1_of(entry[3].out, entry[3].classes)
            ring[seq % capacity] = None if answer is None else (*entry[:3], answer)
        self._pending.clear()

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
            self._refill_locked(now)
            if self._tokens < len(labels):
                self.refused["rate"] = self.refused.get("rate", 0) + len(labels)
                raise RequestError(
                    f"more than {self.max_labels_per_s:g} labels a second; retry later",
                    reason="too_many_labels",
                )
            joined: list[tuple[str, list[int], list[tuple[Key, Answer]]]] = []
            for rid, rows in labels:
                seq = self._seq_of(rid)
                kept = None if seq is None else self._kept_locked(seq, now)
                # The request's answers (the slot's, and a shadow's beside it), if this slot
                # answered it.
                mine: list[tuple[Key, Answer]] = []
                if kept is not None and kept[2][0] == slot:
                    mine = [(kept[2], kept[3]), *self._shadows.get(rid, [])]
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
            labelled: set[str] = set()
            for rid, rows, mine in joined:
                if not mine or rid in labelled:  # a second label for it in this request
                    late += 1
                    self._add_locked(late_key, 0, 0, 1)
                    continue
                seq = self._seq_of(rid)
                assert seq is not None  # it was kept
                self._ring[seq % self.capacity] = None  # one label per prediction
                labelled.add(rid)
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

    # --- reporting -------------------------------------------------------------------------------
    def counts(self, *, reset: bool) -> dict[Key, LabelCounts]:
        """Label counts since the last reset (the reporter's interval)."""
        with self._lock:
            out = {k: LabelCounts(c.labelled, c.correct, c.late) for k, c in self._counts.items()}
            if reset:
                self._counts.clear()
            return out

    def __len__(self) -> int:
        """Answers kept and not labelled, overwritten or expired (a walk of the store: for
        the metrics, not the serving path)."""
        with self._lock:
            self._resolve_locked()
        # Counted outside the lock (a gauge may be a request behind): the serving path
        # takes it, and a walk of 100,000 places takes milliseconds.
        horizon = self._clock() - self.max_age_s
        return sum(1 for e in self._ring if e is not None and e[1] >= horizon)

    def collector(self) -> _FeedbackCollector:
        return _FeedbackCollector(self)


class _FeedbackCollector:
    def __init__(self, store: FeedbackStore) -> None:
        self._store = store

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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
