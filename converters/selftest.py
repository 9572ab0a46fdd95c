"""Generating self-test vectors at build time.

The file format lives in ``edge_agent.bundle.selftest``, which the agent reads.
"""

from __future__ import annotations

import numpy as np

from edge_agent.bundle.manifest import TensorSpec


def synthetic_inputs(
    specs: list[TensorSpec], *, batch: int = 1, seed: int = 0
) -> dict[str, np.ndarray]:
    """Deterministic inputs fitting ``specs``; dynamic dimensions become ``batch`` (first) or 1."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape = [
            d if isinstance(d, int) and d > 0 else (batch if i == 0 else 1)
            for i, d in enumerate(spec.shape)
        ]
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            # Integer inputs are often indices or token ids: small non-negative values are valid.
            feeds[spec.name] = rng.integers(0, 4, size=shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=dtype)
    return feeds
