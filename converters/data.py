"""Calibration and validation sets: ``.npz`` files holding one array per model input.

Axis 0 of every array counts samples; the rest of the shape is one sample as the model takes
it (the model's batch dimension removed). A model whose batch dimension is fixed at 1 and one
whose batch is dynamic take the same file. Every input must be present with the model's dtype
and its fixed dimensions, all arrays must hold the same number of samples, and nothing else may
be in the file: a calibration set that does not fit the model is refused before any converter
runs, with the input and the mismatch named.
"""

from __future__ import annotations

import zipfile
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
    """Arrays keyed by input name, axis 0 = samples."""

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

    def feeds(self, batch: int = 1) -> Iterator[dict[str, np.ndarray]]:
        """Model inputs, ``batch`` samples at a time."""
        for start in range(0, self.samples, batch):
            yield {
                k: np.ascontiguousarray(v[start : start + batch]) for k, v in self.arrays.items()
            }


def load_dataset(path: Path, inputs: list[TensorSpec], *, what: str) -> Dataset:
    """Read and check an ``.npz`` set against the model's inputs (``what`` names it in errors)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ConversionError(
            f"the {what} set is not a readable .npz file ({e}); write it with "
            "numpy.savez(path, **{input_name: array})",
            reason="bad_dataset",
            dataset=what,
        ) from e
    check_arrays(arrays, inputs, what=what)
    return Dataset(arrays, "uploaded", sha256_file(path))


def check_arrays(arrays: dict[str, np.ndarray], inputs: list[TensorSpec], *, what: str) -> None:
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
    counts = set()
    for spec in inputs:
        array = arrays[spec.name]
        if array.dtype != np.dtype(spec.dtype):
            raise fail(
                f"input {spec.name!r} has dtype {array.dtype}, the model takes {spec.dtype} "
                f"(convert with array.astype(numpy.{spec.dtype}))",
                input=spec.name,
            )
        sample_shape = spec.shape[1:]
        if array.ndim != len(spec.shape):
            raise fail(
                f"input {spec.name!r} has shape {list(array.shape)}; expected [samples, "
                f"{', '.join(str(d) for d in sample_shape)}] for model shape {spec.shape}",
                input=spec.name,
            )
        for axis, (got, want) in enumerate(zip(array.shape[1:], sample_shape, strict=True), 1):
            if isinstance(want, int) and want > 0 and got != want:
                raise fail(
                    f"input {spec.name!r} has size {got} on axis {axis}, the model takes {want} "
                    f"(array shape {list(array.shape)}, model shape {spec.shape})",
                    input=spec.name,
                )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise fail(f"input {spec.name!r} holds NaN or infinite values", input=spec.name)
        counts.add(array.shape[0])
    if len(counts) > 1:
        raise fail(f"arrays hold different numbers of samples: {sorted(counts)}")
    if counts == {0}:
        raise fail("it holds no samples")


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
    """Standard-normal float inputs (small non-negative integers for integer inputs)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in inputs:
        shape = [samples] + [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape[1:]]
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
