"""Calibration and validation sets: ``.npz`` files holding one array per model input.

**One sample is one complete feed** of that input, as the model takes it in one call — any
rank, scalars included — and the samples are stacked on a new leading axis. For an input
shaped ``[batch, 16]`` an array ``[samples, 1, 16]`` holds one-row feeds; for a recurrent
state ``[2, batch, 128]`` it is ``[samples, 2, 1, 128]``; for a scalar sample rate it is
``[samples]``. Arrays of all inputs hold the same number of samples.

Files written for earlier releases (axis 0 = samples, the rest one sample without the batch
axis: ``[samples, 16]`` for ``[batch, 16]``) are still read where that is unambiguous: an
array with the input's own rank, for an input whose first axis is its batch (dynamic, or 1).
Such rows are grouped into feeds of the model's batch size.

A set that does not fit the model is refused at upload with the input and the mismatch named,
before any converter runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent.bundle.archive import sha256_file
from edge_agent.bundle.manifest import TensorSpec
from edge_agent.contracts.errors import ConversionError

#: Calibration uses at most this many samples (32-64 are enough for min/max calibration;
#: more only makes the build slower).
MAX_CALIBRATION_SAMPLES = 64
#: Share of a calibration set held out for validation when no validation set is given.
HOLDOUT_FRACTION = 0.25


@dataclass(frozen=True)
class Dataset:
    """Arrays keyed by input name; axis 0 counts samples, ``array[i]`` is one complete feed."""

    arrays: dict[str, np.ndarray]
    #: Where the samples came from: "uploaded", "held-out calibration", "synthetic".
    origin: str
    #: sha256 of the file the samples came from ("" when generated).
    sha256: str = ""

    @property
    def samples(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0])

    def take(self, index: slice) -> Dataset:
        return Dataset({k: v[index] for k, v in self.arrays.items()}, self.origin, self.sha256)

    def feeds(self) -> Iterator[dict[str, np.ndarray]]:
        """One complete feed per sample, as the model takes it in one call."""
        for i in range(self.samples):
            # ascontiguousarray would make a scalar feed 1-d; a scalar input takes 0-d.
            yield {
                k: np.ascontiguousarray(v[i]) if v.ndim > 1 else np.asarray(v[i])
                for k, v in self.arrays.items()
            }


def load_dataset(path: Path, inputs: list[TensorSpec], *, what: str) -> Dataset:
    """Read and check an ``.npz`` set against the model's inputs (``what`` names it in errors)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except Exception as e:  # numpy and zipfile raise many types for a file that is not .npz
        raise ConversionError(
            f"the {what} set is not a readable .npz file ({e}); write it with "
            "numpy.savez(path, **{input_name: samples_array})",
            reason="bad_dataset",
            dataset=what,
        ) from e
    return Dataset(as_feeds(arrays, inputs, what=what), "uploaded", sha256_file(path))


def batch_first(spec: TensorSpec) -> bool:
    """The input's first axis is its batch: dynamic, or fixed at 1. (A state input such as
    ``[2, batch, 128]`` leads with a fixed axis of another meaning.)"""
    if not spec.shape:
        return False
    first = spec.shape[0]
    return not isinstance(first, int) or first <= 1


def _expected(spec: TensorSpec) -> str:
    feed = ", ".join(str(d) for d in spec.shape)
    return f"[samples{', ' + feed if feed else ''}]"


def as_feeds(
    arrays: dict[str, np.ndarray], inputs: list[TensorSpec], *, what: str
) -> dict[str, np.ndarray]:
    """``arrays`` checked against ``inputs`` and in the stacked-feeds layout (legacy row
    files regrouped); raises ConversionError naming the input and the problem."""

    def fail(message: str, **detail: object) -> ConversionError:
        return ConversionError(
            f"{what} set: {message}", reason="bad_dataset", dataset=what, **detail
        )

    wanted = {s.name for s in inputs}
    missing = sorted(wanted - arrays.keys())
    extra = sorted(arrays.keys() - wanted)
    if missing:
        raise fail(f"no array for input(s) {missing}; the model's inputs are {sorted(wanted)}")
    if extra:
        raise fail(
            f"array(s) {extra} match no model input; the model's inputs are {sorted(wanted)}"
        )
    out: dict[str, np.ndarray] = {}
    for spec in inputs:
        array = arrays[spec.name]
        if array.dtype != np.dtype(spec.dtype):
            raise fail(
                f"input {spec.name!r} has dtype {array.dtype}, the model takes {spec.dtype} "
                f"(convert with array.astype(numpy.{spec.dtype}))",
                input=spec.name,
            )
        if array.ndim == 0:
            raise fail(
                f"input {spec.name!r} is a single value; stack the samples on a new leading "
                f"axis: shape {_expected(spec)}",
                input=spec.name,
            )
        legacy = array.ndim == len(spec.shape) and batch_first(spec)
        if not legacy and array.ndim != len(spec.shape) + 1:
            raise fail(
                f"input {spec.name!r} has shape {list(array.shape)}; one sample is one complete "
                f"feed of model shape {spec.shape}, stacked on a new leading axis: "
                f"expected {_expected(spec)}",
                input=spec.name,
            )
        # The fixed dimensions, on the array's own axes (an earlier release's rows lack the
        # batch axis).
        model_dims = spec.shape[1:] if legacy else spec.shape
        for axis, (got, want) in enumerate(zip(array.shape[1:], model_dims, strict=True), 1):
            if isinstance(want, int) and want > 0 and got != want:
                raise fail(
                    f"input {spec.name!r} has size {got} on axis {axis}, the model takes {want} "
                    f"(array shape {list(array.shape)}, expected {_expected(spec)})",
                    input=spec.name,
                )
        if legacy:
            # An earlier release's rows: group them into feeds of the model's batch size.
            first = spec.shape[0]
            batch = first if isinstance(first, int) and first > 0 else 1
            usable = array.shape[0] // batch * batch
            array = array[:usable].reshape(usable // batch, batch, *array.shape[1:])
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise fail(f"input {spec.name!r} holds NaN or infinite values", input=spec.name)
        out[spec.name] = array
    counts = sorted({a.shape[0] for a in out.values()})
    if len(counts) > 1:
        raise fail(f"arrays hold different numbers of samples: {counts}")
    if counts == [0]:
        raise fail("it holds no samples")
    return out


def split_holdout(calibration: Dataset) -> tuple[Dataset, Dataset]:
    """(calibration, validation) from one set: the last quarter is held out for validation."""
    n = calibration.samples
    if n < 2:
        raise ConversionError(
            "the calibration set needs at least 2 samples to hold some out for validation "
            "(or upload a validation set)",
            reason="bad_dataset",
            dataset="calibration",
        )
    held = max(1, round(n * HOLDOUT_FRACTION))
    calib = calibration.take(slice(0, n - held))
    valid = calibration.take(slice(n - held, n))
    return calib, Dataset(valid.arrays, "held-out calibration", calibration.sha256)


def synthetic_dataset(inputs: list[TensorSpec], samples: int, *, seed: int = 0) -> Dataset:
    """Complete feeds fitting ``inputs`` (dynamic dimensions 1): standard-normal floats, small
    non-negative integers for integer inputs (indices, token ids, a sample-rate code)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in inputs:
        shape = [samples] + [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            arrays[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            arrays[spec.name] = rng.integers(0, 4, size=shape).astype(dtype)
        else:
            arrays[spec.name] = np.zeros(shape, dtype=dtype)
    return Dataset(arrays, "synthetic")


def model_batch(inputs: list[TensorSpec]) -> int:
    """How many samples the model takes per call: its fixed batch dimension, else 1."""
    first = inputs[0].shape[0] if inputs and inputs[0].shape else None
    return first if isinstance(first, int) and first > 0 else 1
