"""Prediction shift: how a candidate's answers differ from the version it replaces.

Each device counts its model's outputs in the bins of its own bundle's drift baseline
(:mod:`edge_agent.telemetry.drift`): top-1 class counts for classifier-like outputs, and for
other outputs per-group decile bins whose edges come from that version's own reference data.
Two versions therefore bin differently, and comparing either with its own baseline says
nothing about the other: a model that answers class 0 to everything, built and baselined on
its own outputs, looks perfectly "in distribution".

So the two versions are compared with each other, in one binning: the previous version's.

- ``top1``: class counts compare as they are (same number of classes, or not comparable).
- ``bins``: the candidate's counts are re-binned into the previous version's edges, reading
  its histogram as a piecewise-uniform distribution (the open outer bins are given the width
  of their neighbour); where both versions share edges (the same reference data) this is
  exact.

Each output is scored per group by PSI (the gate's figure) and Jensen-Shannon distance; an
output's score is its worst group's. A group is scored only once each side counted
:data:`MIN_SHIFT_VALUES` values: two samples of n values from one distribution over k bins
differ by a PSI of about (k - 1) x 2 / n, so fewer would judge noise.

That noise grows with k, so a classifier with more than :data:`MAX_SHIFT_CLASSES` classes is
compared over the most frequent classes of both versions' answers and one "other" bin: at 1,000
classes and 200 predictions a side, two identical models would differ by a PSI of ~5 class by
class (far over any threshold), and by ~0.09 folded. A model that collapses onto one class
still shows: onto a frequent one, in its own bin; onto any other, in "other".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.telemetry.drift import TensorDrift, js_distance, psi

__all__ = [
    "MAX_SHIFT_CLASSES",
    "MIN_SHIFT_VALUES",
    "OutputShift",
    "compare_outputs",
    "fold_classes",
    "rebin",
]

MIN_SHIFT_VALUES = 200
#: Classifiers with more classes are compared over their ``MAX_SHIFT_CLASSES - 1`` most
#: frequent classes (both versions together) and "other".
MAX_SHIFT_CLASSES = 10


@dataclass(frozen=True)
class OutputShift:
    output: str
    kind: str
    #: Worst group's PSI and JS distance; None when no group has enough values yet.
    psi: float | None
    js_distance: float | None
    group: int
    #: The fewest values either side counted in a group (the evidence).
    values: int
    #: The worst group's proportions, previous and candidate, in the previous binning.
    previous: list[float]
    candidate: list[float]
    #: What each of those bins is: a class index, or "other" (folded classes); None for
    #: value bins.
    labels: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "kind": self.kind,
            "psi": None if self.psi is None else round(self.psi, 4),
            "js_distance": None if self.js_distance is None else round(self.js_distance, 4),
            "group": self.group,
            "values": self.values,
            "previous": [round(p, 4) for p in self.previous],
            "candidate": [round(p, 4) for p in self.candidate],
            "labels": self.labels,
        }


def _cdf_at(edges: np.ndarray, counts: np.ndarray, points: np.ndarray) -> np.ndarray:
    """P(X < x) at ``points`` for a histogram over interior ``edges`` (bin j holds the values
    with exactly j edges at or below them), uniform within each bin."""
    total = counts.sum()
    if total <= 0:
        return np.zeros_like(points, dtype=np.float64)
    cum = np.cumsum(counts)[:-1] / total  # P(X < edge_j)
    if edges.size == 0:
        return np.where(points > 0, 1.0, 0.0)
    span = float(edges[-1] - edges[0])
    left_w = float(edges[1] - edges[0]) if edges.size > 1 else 0.0
    right_w = float(edges[-1] - edges[-2]) if edges.size > 1 else 0.0
    tiny = max(abs(float(edges[0])), abs(float(edges[-1])), span, 1.0) * 1e-9
    xs = np.concatenate([[edges[0] - max(left_w, tiny)], edges, [edges[-1] + max(right_w, tiny)]])
    ys = np.concatenate([[0.0], cum, [1.0]])
    # Equal edges (a value many reference outputs share) are one point; keep its last CDF
    # value (all of them are equal by the binning rule).
    unique = np.unique(xs)
    last = np.searchsorted(xs, unique, side="right") - 1
    out: np.ndarray = np.interp(points, unique, ys[last], left=0.0, right=1.0)
    return out


def rebin(counts: np.ndarray, source: TensorDrift, target: TensorDrift) -> np.ndarray | None:
    """``counts`` (binned by ``source``) in ``target``'s bins, or None when the two tensors
    cannot be compared (another kind, number of classes or grouping)."""
    counts = np.asarray(counts, np.float64)
    if source.kind != target.kind or source.shape != target.shape:
        return None
    if source.kind == "top1":
        return counts
    if source.group_of.shape != target.group_of.shape:
        return None
    if np.array_equal(source.edges, target.edges):
        return counts
    out = np.zeros(target.shape, np.float64)
    for g in range(target.groups):
        total = counts[g].sum()
        if total <= 0:
            continue
        cdf = _cdf_at(source.edges[g], counts[g], target.edges[g])
        mass = np.diff(np.concatenate([[0.0], cdf, [1.0]]))
        out[g] = np.maximum(mass, 0.0) * total
    return out


def compare_outputs(
    previous: dict[str, np.ndarray],
    candidate: dict[str, np.ndarray],
    reference: dict[str, TensorDrift],
) -> list[OutputShift]:
    """Score each output both versions counted (already in ``reference``'s bins)."""
    shifts = []
    for name in sorted(set(previous) & set(candidate) & set(reference)):
        p, c = np.asarray(previous[name], np.float64), np.asarray(candidate[name], np.float64)
        labels = None
        if reference[name].kind == "top1":
            p, c, labels = fold_classes(p, c)
        n_p, n_c = p.sum(axis=1), c.sum(axis=1)
        enough = (n_p >= MIN_SHIFT_VALUES) & (n_c >= MIN_SHIFT_VALUES)
        values = int(np.min(np.minimum(n_p, n_c)))
        if not enough.any():
            shifts.append(OutputShift(name, reference[name].kind, None, None, 0, values, [], []))
            continue
        scores = psi(c, _proportions(p))
        scores[~enough] = np.nan
        g = int(np.nanargmax(scores))
        js = js_distance(c, _proportions(p))
        shifts.append(
            OutputShift(
                name,
                reference[name].kind,
                float(scores[g]),
                float(js[g]),
                g,
                int(min(n_p[g], n_c[g])),
                [float(x) for x in _proportions(p)[g]],
                [float(x) for x in _proportions(c)[g]],
                labels,
            )
        )
    return shifts


def fold_classes(
    previous: np.ndarray, candidate: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Class counts (one group) over at most :data:`MAX_SHIFT_CLASSES` bins: the most
    frequent classes of both versions' answers together, then "other"; with the bins' labels.
    (Chosen from one side alone, the bins would favour the classes that side happened to
    over-count, and the other side would look shifted by chance.)"""
    classes = previous.shape[1]
    if classes <= MAX_SHIFT_CLASSES:
        return previous, candidate, [str(k) for k in range(classes)]
    both = _proportions(previous)[0] + _proportions(candidate)[0]
    # Most frequent first; ties by class index, so the same counts fold the same way.
    order = np.lexsort((np.arange(classes), -both))[: MAX_SHIFT_CLASSES - 1]

    def fold(counts: np.ndarray) -> np.ndarray:
        kept = counts[:, order]
        return np.concatenate([kept, counts.sum(axis=1, keepdims=True) - kept.sum(axis=1,
                              keepdims=True)], axis=1)  # fmt: skip

    return fold(previous), fold(candidate), [*(str(int(k)) for k in order), "other"]


def _proportions(counts: np.ndarray) -> np.ndarray:
    totals = counts.sum(axis=1, keepdims=True)
    out: np.ndarray = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    return out
