"""Drift accounting: count live inputs and outputs in the bins of the bundle's baseline.

The baseline (``baseline.json``, written at build time by ``converters.baseline``) says, per
tensor, how its values are grouped and binned:

- ``bins``: values are grouped along ``axis`` of one feed (the features of a tabular
  ``[N, F]`` input, the channels of an image ``[N, C, H, W]`` / ``[N, H, W, C]``, the last axis
  of a sequence), at most :data:`MAX_GROUPS` groups (wider inputs put neighbouring features in
  one group); ``axis`` None is the whole tensor as one group. Each group has its own interior
  bin edges (deciles of the reference data), so on reference data each bin holds ~10 %.
- ``top1``: a classifier-like output; the count of each top-1 class.

The same :meth:`TensorDrift.count` computes the reference histogram at build time and the live
counts on the device, so the two agree by construction. Bundles from before per-group
baselines (format 1: one whole-tensor histogram) are read as one ``bins`` group.

Counting is vectorised and bounded: at most :data:`MAX_CELLS` values per tensor per request
(an image is subsampled with a stride), so the cost does not grow with the input's size.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "MAX_CELLS",
    "MAX_GROUPS",
    "Baseline",
    "TensorDrift",
    "group_layout",
    "js_distance",
    "psi",
]

log = logging.getLogger(__name__)

MAX_GROUPS = 256
#: Values counted per tensor per request, at most (rows x groups).
MAX_CELLS = 4096


def group_layout(feed_shape: tuple[int, ...]) -> int | None:
    """The axis of one feed whose entries are drift groups: features, channels or the last
    axis of a sequence; None when the tensor is one group (scalars, vectors, odd ranks)."""
    rank = len(feed_shape)
    if rank in (2, 3):
        return rank - 1
    if rank == 4:
        first, last = feed_shape[1], feed_shape[3]
        if last in (1, 3, 4) and first not in (1, 3, 4):
            return 3  # NHWC
        return 1  # NCHW, and 4-D tensors in general
    return None


@dataclass(frozen=True)
class TensorDrift:
    """How one tensor is counted, and what the reference data looked like."""

    kind: Literal["bins", "top1"]
    #: ``bins``: the feed axis whose entries are grouped; None = the whole tensor.
    axis: int | None
    #: ``bins``: group of each entry along ``axis`` (length F); one group if ``axis`` is None.
    group_of: np.ndarray
    #: ``bins``: interior edges per group, shape (groups, bins - 1).
    edges: np.ndarray
    #: Reference proportions per group, shape (groups, bins) (``top1``: (1, classes)).
    expected: np.ndarray

    @functools.cached_property
    def _column_edges(self) -> np.ndarray:
        """Each column's interior edges, shape (F, bins - 1): computed once, not per request."""
        edges: np.ndarray = self.edges[self.group_of]
        return edges

    @functools.cached_property
    def _column_offsets(self) -> np.ndarray:
        offsets: np.ndarray = self.group_of * self.bins
        return offsets

    @property
    def groups(self) -> int:
        return int(self.expected.shape[0])

    @property
    def bins(self) -> int:
        return int(self.expected.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return self.groups, self.bins

    def count(self, array: np.ndarray, *, stacked: bool = False) -> np.ndarray:
        """Counts of ``array``'s finite values in this tensor's bins, shape (groups, bins).
        ``stacked``: ``array`` holds many feeds along a leading axis (reference data)."""
        a = np.asarray(array)
        if self.kind == "top1":
            classes = self.bins
            if a.ndim == 0 or a.shape[-1] != classes:
                return np.zeros((1, classes), np.int64)
            rows = a.reshape(-1, classes)
            if rows.shape[0] * classes > MAX_CELLS * 16 and not stacked:
                rows = rows[:: -(-rows.shape[0] * classes // (MAX_CELLS * 16))]
            if rows.dtype.kind in "fc":
                rows = rows[np.isfinite(rows).all(axis=1)]
            top = np.argmax(rows, axis=1) if rows.size else np.zeros(0, np.int64)
            return np.bincount(top, minlength=classes)[None, :classes].astype(np.int64)
        width = int(self.group_of.shape[0])
        axis = None if self.axis is None else self.axis + 1 if stacked else self.axis
        if axis is not None and (a.ndim <= axis or a.shape[axis] != width):
            return np.zeros(self.shape, np.int64)
        if not stacked and a.size > MAX_CELLS:
            a = _subsample(a, keep=axis)
        values = a.reshape(-1, 1) if axis is None else np.moveaxis(a, axis, -1).reshape(-1, width)
        values = values.astype(np.float64, copy=False)
        if values.shape[0] >= 32 and width <= 64:  # many rows, few columns (images)
            bin_of = np.empty(values.shape, np.int64)
            for col in range(width):
                edges = self.edges[self.group_of[col]]
                bin_of[:, col] = np.searchsorted(edges, values[:, col], side="right")
        else:  # few rows (tabular requests): one broadcast comparison
            bin_of = (values[:, :, None] >= self._column_edges[None, :, :]).sum(axis=2)
        index = self._column_offsets[None, :] + bin_of
        finite = np.isfinite(values)
        counts = np.bincount(index[finite], minlength=self.groups * self.bins)
        shaped: np.ndarray = counts.reshape(self.groups, self.bins).astype(np.int64)
        return shaped

    # --- the baseline file ------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "axis": self.axis,
            "group_of": [int(g) for g in self.group_of],
            "edges": [[float(e) for e in row] for row in self.edges],
            "expected": [[float(p) for p in row] for row in self.expected],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorDrift:
        kind = data["kind"]
        if kind not in ("bins", "top1"):
            raise ValueError(f"unknown drift kind {kind!r}")
        expected = np.asarray(data["expected"], np.float64)
        if expected.ndim != 2 or not expected.size or expected.shape[0] > MAX_GROUPS:
            raise ValueError("expected proportions must be (groups, bins)")
        axis = data.get("axis")
        if kind == "top1":
            return cls("top1", None, np.zeros(1, np.int64), np.zeros((1, 0)), expected)
        group_of = np.asarray(data.get("group_of") or [0], np.int64)
        edges = np.asarray(data["edges"], np.float64).reshape(expected.shape[0], -1)
        if edges.shape[1] != expected.shape[1] - 1:
            raise ValueError("each group needs bins - 1 interior edges")
        if group_of.min() < 0 or group_of.max() >= expected.shape[0]:
            raise ValueError("group_of names a group that does not exist")
        if axis is not None and not isinstance(axis, int):
            raise ValueError("axis must be an integer or null")
        return cls("bins", axis, group_of, edges, expected)

    @classmethod
    def build(cls, stacked: np.ndarray, *, top1: bool, bins: int = 10) -> TensorDrift:
        """The reference for a tensor from stacked reference data ``[samples, *feed]``."""
        feed_shape = tuple(int(d) for d in stacked.shape[1:])
        if top1:
            probe = cls(
                "top1", None, np.zeros(1, np.int64), np.zeros((1, 0)), np.ones((1, feed_shape[-1]))
            )
            counts = probe.count(stacked, stacked=True).astype(np.float64)
            return cls("top1", None, probe.group_of, probe.edges, _proportions(counts))
        axis = group_layout(feed_shape)
        if axis is None:
            group_of = np.zeros(1, np.int64)
            columns = stacked.reshape(-1, 1)
        else:
            width = feed_shape[axis]
            groups = min(width, MAX_GROUPS)
            group_of = (np.arange(width) * groups // width).astype(np.int64)
            columns = np.moveaxis(stacked, axis + 1, -1).reshape(-1, width)
        columns = columns.astype(np.float64, copy=False)
        rng = np.random.default_rng(0)
        if columns.shape[0] > 100_000:  # quantiles from a uniform subsample of rows
            columns = columns[rng.choice(columns.shape[0], 100_000, replace=False)]
        groups = int(group_of.max()) + 1
        edges = np.zeros((groups, bins - 1))
        for g in range(groups):
            values = columns[:, group_of == g].ravel()
            values = values[np.isfinite(values)]
            if values.size:
                edges[g] = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1])
        draft = cls("bins", axis, group_of, edges, np.ones((groups, bins)))
        counts = draft.count(stacked, stacked=True).astype(np.float64)
        return cls("bins", axis, group_of, edges, _proportions(counts))


def _subsample(a: np.ndarray, *, keep: int | None) -> np.ndarray:
    """A strided view of ``a`` with at most ~:data:`MAX_CELLS` values: every axis but
    ``keep`` (the groups) is strided alike, so an image keeps an even grid of its pixels."""
    strided = [i for i in range(a.ndim) if i != keep and a.shape[i] > 1]
    if not strided:
        return a
    ratio = a.size / MAX_CELLS
    step = max(1, int(np.ceil(ratio ** (1 / len(strided)))))
    index = tuple(slice(None, None, step) if i in strided else slice(None) for i in range(a.ndim))
    return a[index]


def _proportions(counts: np.ndarray) -> np.ndarray:
    totals = counts.sum(axis=1, keepdims=True)
    out: np.ndarray = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    return out


@dataclass(frozen=True)
class Baseline:
    inputs: dict[str, TensorDrift]
    outputs: dict[str, TensorDrift]
    #: False: the expected proportions come from made-up data (no calibration data was
    #: uploaded): the bins say how to count, not what live traffic should look like, so no
    #: PSI against them is meaningful.
    reference: bool = True

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Baseline:
        drift = data.get("drift")
        if isinstance(drift, dict):  # format 2
            return cls(
                {k: TensorDrift.from_json(v) for k, v in drift.get("inputs", {}).items()},
                {k: TensorDrift.from_json(v) for k, v in drift.get("outputs", {}).items()},
                reference=drift.get("reference", True) is not False,
            )

        # Format 1: one whole-tensor decile histogram per tensor (and top-1 frequencies).
        def whole(entry: dict[str, Any]) -> TensorDrift | None:
            if "top1_frequencies" in entry:
                freq = np.asarray([entry["top1_frequencies"]], np.float64)
                return TensorDrift("top1", None, np.zeros(1, np.int64), np.zeros((1, 0)), freq)
            if "bin_edges" not in entry:
                return None
            edges = np.asarray(entry["bin_edges"], np.float64)[1:-1][None, :]
            expected = np.asarray([entry["histogram"]], np.float64)
            return TensorDrift("bins", None, np.zeros(1, np.int64), edges, expected)

        inputs = {k: d for k, v in data.get("inputs", {}).items() if (d := whole(v))}
        outputs = {k: d for k, v in data.get("outputs", {}).items() if (d := whole(v))}
        return cls(inputs, outputs)

    @classmethod
    def load(cls, path: Path) -> Baseline | None:
        """The bundle's baseline, or None (logged) when it has none or it is unreadable:
        drift is then not counted, and nothing else changes."""
        try:
            return cls.from_json(json.loads(path.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("%s: unusable drift baseline (%s); drift is not counted", path, e)
            return None

    def count(
        self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        return (
            {k: d.count(feeds[k]) for k, d in self.inputs.items() if k in feeds},
            {k: d.count(outputs[k]) for k, d in self.outputs.items() if k in outputs},
        )


#: Proportions are floored at this before PSI's logarithm (an empty bin would be infinite).
PSI_EPSILON = 1e-4


def psi(counts: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Population stability index of each group (row) of ``counts`` against the reference
    proportions: sum over bins of (a - e) * ln(a / e). Rule of thumb: < 0.1 stable, > 0.25 a
    shift worth acting on. NaN for a group with no counts."""
    actual = _proportions(np.asarray(counts, np.float64))
    a = np.maximum(actual, PSI_EPSILON)
    e = np.maximum(np.asarray(expected, np.float64), PSI_EPSILON)
    out = ((a - e) * np.log(a / e)).sum(axis=1)
    out[np.asarray(counts).sum(axis=1) == 0] = np.nan
    result: np.ndarray = out
    return result


def js_distance(counts: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Jensen-Shannon distance (base 2, in [0, 1]) of each group against the reference."""
    p = _proportions(np.asarray(counts, np.float64))
    q = _proportions(np.asarray(expected, np.float64))
    m = (p + q) / 2

    def kl(x: np.ndarray) -> np.ndarray:
        terms = np.where(x > 0, x * np.log2(np.where(x > 0, x, 1) / np.where(m > 0, m, 1)), 0.0)
        summed: np.ndarray = terms.sum(axis=1)
        return summed

    out = np.sqrt(np.maximum((kl(p) + kl(q)) / 2, 0.0))
    out[np.asarray(counts).sum(axis=1) == 0] = np.nan
    result: np.ndarray = out
    return result
