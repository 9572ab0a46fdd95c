"""The ``selftest.npz`` format: the vectors the agent checks a model against before switching
to it (the check itself is :func:`edge_agent.lifecycle.staging.run_selftest`).

Arrays are stored as ``input:<name>`` and ``output:<name>``; the outputs are what the compiled
artifact produced at build time, in the runtime the device uses.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edge_agent.contracts.errors import BundleError
from edge_agent.contracts.npy import NPY_LOCK

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
