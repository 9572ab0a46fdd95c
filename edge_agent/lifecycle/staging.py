"""Staging a verified bundle: load it in its runtime, pass the self-test, warm up.

A staged model is loaded but serves nobody yet; only the switch makes it answer requests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_agent.bundle import VerifiedBundle
from edge_agent.bundle.selftest import unpack
from edge_agent.contracts.errors import RuntimeBackendError
from edge_agent.protocol.status import VersionRef
from edge_agent.runtimes import LoadedModel, LoadOptions, Runtime
from edge_agent.serving import ServingModel
from edge_agent.telemetry.drift import Baseline

#: Self-test inputs are run this many extra times before the switch so the first real request
#: does not pay for lazy initialisation (allocator warm-up, kernel selection).
WARMUP_RUNS = 3


def stage(
    verified: VerifiedBundle, ref: VersionRef, runtime: Runtime, options: LoadOptions
) -> ServingModel:
    """Load in ``runtime``, pass the self-test, warm up. The model is not serving yet."""
    m = verified.manifest
    model = runtime.load(verified.artifact_path, options)
    try:
        selftest = verified.directory / m.selftest.file
        for _ in range(1 + WARMUP_RUNS):
            run_selftest(model, selftest, atol=m.selftest.atol, rtol=m.selftest.rtol)
    except BaseException:
        model.close()
        raise
    baseline = Baseline.load(verified.directory / "baseline.json")
    return ServingModel(ref, m, model, baseline)


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
