"""The drift baseline a bundle carries (``baseline.json``): what the model's inputs and outputs
looked like on the reference data, for the agent to compare live traffic against.

Format 2 (``drift``): per tensor, the groups and bins the agent counts live values in, and
the reference proportions — per feature of a tabular input, per channel of an image, top-1
class counts of a classifier-like output (see :class:`edge_agent.telemetry.drift.TensorDrift`,
which does the counting at build time and on the device alike).

Kept from format 1, for agents that predate per-group drift: per tensor, decile bin edges over
all its values, the histogram, mean, std, min and max; classifier-like outputs ([batch,
classes]) also get the frequency of each top-1 class.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edge_agent.telemetry.drift import TensorDrift

#: At most this many values per tensor are used (a uniform subsample, fixed seed).
MAX_VALUES = 1_000_000
BINS = 10


def describe(values: np.ndarray) -> dict[str, Any]:
    flat = values.astype(np.float64, copy=False).ravel()
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return {"count": 0}
    if flat.size > MAX_VALUES:
        flat = np.random.default_rng(0).choice(flat, MAX_VALUES, replace=False)
    edges = np.quantile(flat, np.linspace(0, 1, BINS + 1))
    # Interior edges only: live values below/above fall into the first/last bin.
    counts = np.bincount(np.searchsorted(edges[1:-1], flat, side="right"), minlength=BINS)
    return {
        "count": int(flat.size),
        "bin_edges": [float(e) for e in edges],
        "histogram": [float(c) / flat.size for c in counts],
        "mean": float(flat.mean()),
        "std": float(flat.std()),
        "min": float(flat.min()),
        "max": float(flat.max()),
    }


def _top1(array: np.ndarray, kind: str) -> bool:
    """Stacked [samples, batch, classes] class scores (declared, or by the shape heuristic)."""
    if kind == "class_scores":
        return array.ndim >= 2 and array.shape[-1] > 1
    if kind != "auto":
        return False
    return array.ndim == 3 and array.shape[2] > 1 and bool(np.isfinite(array).all())


def baseline(
    inputs: dict[str, np.ndarray],
    outputs: dict[str, np.ndarray],
    *,
    origin: str,
    output_kinds: dict[str, str] | None = None,
) -> dict[str, Any]:
    kinds = output_kinds or {}
    out: dict[str, Any] = {"format": 2, "origin": origin, "inputs": {}, "outputs": {}}
    if origin == "synthetic":
        # A handful of made-up feeds say nothing about live traffic: no drift reference, so
        # no PSI against the baseline is computed (upload calibration data for one). The
        # outputs are still counted, in the classes (or bins) below: that is how a
        # candidate's predictions are compared with the version it replaces.
        out["drift"] = {
            "inputs": {},
            "outputs": {
                k: TensorDrift.build(v, top1=_top1(v, kinds.get(k, "auto"))).to_json()
                for k, v in outputs.items()
            },
            "reference": False,
            "skipped": "synthetic reference data",
        }
    else:
        out["drift"] = {
            "inputs": {k: TensorDrift.build(v, top1=False).to_json() for k, v in inputs.items()},
            "outputs": {
                k: TensorDrift.build(v, top1=_top1(v, kinds.get(k, "auto"))).to_json()
                for k, v in outputs.items()
            },
        }
    for name, array in inputs.items():
        out["inputs"][name] = describe(array)
    for name, array in outputs.items():
        entry = describe(array)
        if array.ndim == 3 and array.shape[2] > 1 and np.isfinite(array).all():
            # Stacked [samples, batch, classes]: top-1 over every row.
            rows = array.reshape(-1, array.shape[2])
            top1 = np.bincount(np.argmax(rows, axis=1), minlength=rows.shape[1])
            entry["top1_frequencies"] = [float(c) / rows.shape[0] for c in top1]
        out["outputs"][name] = entry
    out["samples"] = int(next(iter(inputs.values())).shape[0]) if inputs else 0
    return out
