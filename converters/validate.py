"""The parity gate: does a compiled artifact still agree with the original model?

The artifact is loaded in its target runtime (the one the agent uses) and run on the validation
set next to the fp32 ONNX in onnxruntime. Recorded: max abs error and relative L2 error per
output and overall, and per declared output kind a fitting measure: top-1 agreement for class
scores (and, undeclared, for [batch, classes] outputs), cosine similarity for embeddings, box
recall at IoU 0.5 for boxes, relative error for regression outputs;
artifact size, and median host latency of both. Each check is compared with its threshold; an
artifact that fails any of them is not bundled, and the report says which check failed with
the numbers.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from converters.data import Dataset
from edge_agent.contracts.errors import ConversionError, EdgefleetError
from edge_agent.runtimes import LoadedModel


class OutputKind(StrEnum):
    """What an output holds, declared at upload; each is gated by a fitting measure."""

    #: Today's heuristic: top-1 agreement for [batch, classes] outputs, errors for all.
    AUTO = "auto"
    #: Class scores or logits: top-1 agreement (the last axis is the classes).
    CLASS_SCORES = "class_scores"
    #: Vectors compared by direction: cosine similarity of each (the last axis).
    EMBEDDING = "embedding"
    #: Values that matter as numbers: relative L2 error of the output.
    REGRESSION = "regression"
    #: Boxes (x1, y1, x2, y2) on the last axis: the share that keep IoU >= 0.5 (recall).
    BOXES = "boxes"


@dataclass(frozen=True)
class Thresholds:
    """None disables a check."""

    max_abs_error: float | None = None
    max_rel_l2: float | None = None
    min_top1_agreement: float | None = None
    #: For outputs declared ``embedding``: the smallest cosine similarity of any vector.
    min_cosine_similarity: float | None = 0.99
    #: For outputs declared ``boxes``: the share of boxes that keep IoU >= 0.5.
    min_box_recall: float | None = 0.9

    def merged(self, overrides: dict[str, float | None] | None) -> Thresholds:
        if not overrides:
            return self
        known = set(THRESHOLD_NAMES)
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConversionError(
                f"unknown parity threshold(s) {unknown}; known: {sorted(known)}",
                reason="bad_thresholds",
            )
        values = {k: getattr(self, k) for k in known}
        values.update(overrides)
        return Thresholds(**values)


@dataclass
class Outputs:
    """Concatenated outputs over a dataset, and the per-call latencies (ms)."""

    arrays: dict[str, np.ndarray]
    latencies_ms: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.latencies_ms) if self.latencies_ms else 0.0


def run_dataset(model: LoadedModel, data: Dataset, *, warmup: int = 2) -> Outputs:
    """Run ``model`` on each of ``data``'s feeds; the outputs are stacked on a new leading
    axis (one entry per sample, whatever their rank). Non-finite outputs are kept (the gate
    reports them) but a runtime error is raised as :class:`ConversionError`."""
    feeds = list(data.feeds())
    try:
        for f in feeds[:warmup]:
            model.run(f)
        parts: dict[str, list[np.ndarray]] = {}
        latencies = []
        for f in feeds:
            start = time.perf_counter()
            result = model.run(f)
            latencies.append((time.perf_counter() - start) * 1e3)
            for name, value in result.items():
                parts.setdefault(name, []).append(value)
    except EdgefleetError as e:
        raise ConversionError(
            f"the artifact fails on the validation set: {e.message}", reason="artifact_unusable"
        ) from e
    try:
        stacked = {k: np.stack(v) for k, v in parts.items()}
    except ValueError as e:  # a dynamic output shape that changes from feed to feed
        raise ConversionError(
            f"the model's outputs change shape from one sample to the next ({e})",
            reason="artifact_unusable",
        ) from e
    return Outputs(stacked, latencies)


THRESHOLD_NAMES = (
    "max_abs_error",
    "max_rel_l2",
    "min_top1_agreement",
    "min_cosine_similarity",
    "min_box_recall",
)


def _cosine_min(ref: np.ndarray, got: np.ndarray) -> float:
    a = ref.reshape(-1, ref.shape[-1]) if ref.ndim else ref.reshape(1, 1)
    b = got.reshape(-1, got.shape[-1]) if got.ndim else got.reshape(1, 1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(norms > 0, np.sum(a * b, axis=1) / np.maximum(norms, 1e-30), 1.0)
    return float(cos.min()) if cos.size else 1.0


def _area(boxes: np.ndarray) -> np.ndarray:
    area: np.ndarray = np.abs((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    return area


def _box_recall(ref: np.ndarray, got: np.ndarray) -> float:
    a, b = ref.reshape(-1, 4), got.reshape(-1, 4)
    width = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    height = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = width * height
    union = _area(a) + _area(b) - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1e-30), 1.0)
    return float(np.mean(iou >= 0.5)) if iou.size else 1.0


def _classifier_like(array: np.ndarray) -> bool:
    """Stacked [samples, batch, classes] outputs of a [batch, classes] output."""
    return array.ndim == 3 and array.shape[2] > 1


def compare(
    reference: Outputs,
    candidate: Outputs,
    *,
    thresholds: Thresholds,
    artifact: Path,
    source_size: int,
    samples: int,
    origin: str,
    evaluated_in: str,
    kinds: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The parity report (JSON-ready). ``report["passed"]`` says whether it may be bundled;
    ``report["failed"]`` lists each failed check as ``"name value vs threshold"``."""
    outputs: dict[str, dict[str, Any]] = {}
    failed: list[str] = []
    # Over the outputs judged by absolute and relative error (auto, regression); None when
    # every output is judged by its own measure (top-1, cosine, recall): no such check then.
    worst_abs: float | None = None
    worst_rel: float | None = None
    top1: list[float] = []
    cosines: list[float] = []
    recalls: list[float] = []
    for name, ref in reference.arrays.items():
        got = candidate.arrays.get(name)
        if got is None:
            failed.append(
                f"output {name!r} is missing (artifact outputs: {sorted(candidate.arrays)})"
            )
            continue
        if got.shape != ref.shape:
            failed.append(
                f"output {name!r} has shape {list(got.shape)}, the original {list(ref.shape)}"
            )
            continue
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        # NaN/inf where the original is finite is a failure; where the original itself is
        # not finite there is nothing to compare (catching a broken model is probation's job).
        ref_ok, got_ok = np.isfinite(ref64), np.isfinite(got64)
        finite = bool(np.array_equal(ref_ok, got_ok))
        both = ref_ok & got_ok
        diff = np.where(both, got64 - ref64, 0.0)
        abs_err = float(np.max(np.abs(diff))) if finite and diff.size else 0.0
        norm = float(np.linalg.norm(np.where(both, ref64, 0.0)))
        rel = float(np.linalg.norm(diff) / max(norm, 1e-12)) if finite else 0.0
        entry: dict[str, Any] = {"max_abs_error": abs_err, "rel_l2_error": rel, "finite": finite}
        if not finite:
            failed.append(f"output {name!r} has NaN or infinite values where the original has none")
        kind = OutputKind((kinds or {}).get(name, OutputKind.AUTO))
        entry["kind"] = kind.value
        if kind == OutputKind.CLASS_SCORES or (kind == OutputKind.AUTO and _classifier_like(ref)):
            agreement = float(np.mean(np.argmax(got64, axis=-1) == np.argmax(ref64, axis=-1)))
            entry["top1_agreement"] = agreement
            top1.append(agreement)
        elif kind == OutputKind.EMBEDDING and finite:
            entry["min_cosine_similarity"] = _cosine_min(ref64, got64)
            cosines.append(entry["min_cosine_similarity"])
        elif kind == OutputKind.BOXES and finite:
            if ref.shape[-1] != 4:
                failed.append(f"output {name!r} is declared boxes but its last axis is not 4")
            else:
                entry["box_recall"] = _box_recall(ref64, got64)
                recalls.append(entry["box_recall"])
        outputs[name] = entry
        if kind in (OutputKind.AUTO, OutputKind.REGRESSION):
            # A declared class-score, embedding or box output is judged by its own measure;
            # its numbers are still in the report.
            worst_abs = abs_err if worst_abs is None else max(worst_abs, abs_err)
            worst_rel = rel if worst_rel is None else max(worst_rel, rel)

    checks: list[dict[str, Any]] = []

    def check(name: str, value: float | None, limit: float | None, at_most: bool) -> None:
        if limit is None or value is None:
            return
        ok = value <= limit if at_most else value >= limit
        checks.append({"name": name, "value": value, "threshold": limit, "passed": ok})
        if not ok:
            failed.append(f"{name} {value:.4g} {'>' if at_most else '<'} {limit:.4g}")

    if outputs:
        check("max_abs_error", worst_abs, thresholds.max_abs_error, True)
        check("max_rel_l2", worst_rel, thresholds.max_rel_l2, True)
        check(
            "min_top1_agreement", min(top1) if top1 else None, thresholds.min_top1_agreement, False
        )
        check(
            "min_cosine_similarity",
            min(cosines) if cosines else None,
            thresholds.min_cosine_similarity,
            False,
        )
        check("min_box_recall", min(recalls) if recalls else None, thresholds.min_box_recall, False)
    size = artifact.stat().st_size
    return {
        "passed": not failed,
        "failed": failed,
        "checks": checks,
        "evaluated_in": evaluated_in,
        "validation": {"samples": samples, "origin": origin},
        "outputs": outputs,
        "max_abs_error": worst_abs,
        "rel_l2_error": worst_rel,
        "top1_agreement": min(top1) if top1 else None,
        "size_bytes": size,
        "size_ratio": size / source_size if source_size else None,
        "latency_ms_median": candidate.median_ms,
        "reference_latency_ms_median": reference.median_ms,
        "speedup": reference.median_ms / candidate.median_ms if candidate.median_ms else None,
    }
