"""The ``selftest.npz`` format and the check the agent runs before switching to a model.

Arrays are stored as ``input:<name>`` and ``output:<name>``; the outputs are what the compiled
artifact produced at build time, in the runtime the device uses.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edge_agent.codec import NPY_LOCK
from edge_agent.errors import BundleError, RuntimeBackendError
from edge_agent.runtimes.base import LoadedModel

INPUT_PREFIX = "input:"
OUTPUT_PREFIX = "output:"


def pack(inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> bytes:
    arrays = {INPUT_PREFIX + k: v for k, v in inputs.items()}
    arrays.update({OUTPUT_PREFIX + k: v for k, v in outputs.items()})
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def unpack(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    try:
        with NPY_LOCK, np.load(path, allow_pickle=False) as npz:
            inputs = {
                k[len(INPUT_PREFIX) :]: npz[k] for k in npz.files if k.startswith(INPUT_PREFIX)
            }
            outputs = {
                k[len(OUTPUT_PREFIX) :]: npz[k] for k in npz.files if k.startswith(OUTPUT_PREFIX)
            }
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise BundleError(f"unreadable self-test vectors: {e}", reason="selftest_invalid") from e
    if not inputs or not outputs:
        raise BundleError("self-test vectors hold no inputs or outputs", reason="selftest_invalid")
    return inputs, outputs


def run_selftest(model: LoadedModel, path: Path, *, atol: float, rtol: float) -> float:
    """Run the vectors through ``model``; return the largest absolute error seen.

    Raises :class:`RuntimeBackendError` (reason ``selftest_failed``) naming the output that
    disagreed and by how much, or when an output is NaN/inf where the reference was not.
    """
    inputs, expected = unpack(path)
    got = model.run(inputs)
    worst = 0.0
    for name, want in expected.items():
        if name not in got:
            raise RuntimeBackendError(
                f"self-test: the model produced no output {name!r}", reason="selftest_failed"
            )
        have = np.asarray(got[name])
        if have.shape != want.shape:
            raise RuntimeBackendError(
                f"self-test: output {name!r} has shape {list(have.shape)}, expected "
                f"{list(want.shape)}",
                reason="selftest_failed",
            )
        if want.dtype.kind in "fc":
            if not np.array_equal(np.isfinite(have), np.isfinite(want)):
                raise RuntimeBackendError(
                    f"self-test: output {name!r} has NaN/inf values the reference does not have",
                    reason="selftest_failed",
                )
            finite = np.isfinite(want)
            diff = np.abs(have[finite].astype(np.float64) - want[finite].astype(np.float64))
            err = float(diff.max()) if diff.size else 0.0
            ok = np.allclose(have[finite], want[finite], atol=atol, rtol=rtol)
        else:
            err = float(np.abs(have.astype(np.int64) - want.astype(np.int64)).max(initial=0))
            ok = bool(np.array_equal(have, want))
        worst = max(worst, err)
        if not ok:
            raise RuntimeBackendError(
                f"self-test: output {name!r} differs from the build-time reference by up to "
                f"{err:.3g} (atol {atol}, rtol {rtol})",
                reason="selftest_failed",
            )
    return worst
