"""A runtime for tests and rigs that need a model without a model file (as httpx ships
``MockTransport``): it implements the real seam, so everything above it — the slot table, the
serving path, probation, the lifecycle — runs exactly as it does on a device.

    model = FakeModel(inputs, outputs, compute=lambda feeds: {"y": feeds["x"] * 2})
    deployer = Deployer(..., runtime_for=lambda name: FakeRuntime(model))

A ``FakeModel`` can take a fixed or computed time per run, hold each run at a gate until a
test releases it, or raise any exception (the seam turns a foreign one into
``RuntimeBackendError``, as it would for a real backend). It checks feeds against its specs
like a backend does, and counts its runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from edge_agent.bundle.manifest import TensorSpec
from edge_agent.runtimes.base import LoadedModel, LoadOptions, Runtime, check_feeds

__all__ = ["FakeModel", "FakeRuntime"]

Compute = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class FakeModel(LoadedModel):
    """Runs ``compute`` on checked feeds (default: every output is the first input, cast to the
    output's dtype)."""

    def __init__(
        self,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        compute: Compute | None = None,
        *,
        latency_s: float | Callable[[], float] = 0.0,
        gate: threading.Event | None = None,
        raises: BaseException | None = None,
    ) -> None:
        self.inputs, self.outputs = inputs, outputs
        self.compute = compute
        self.latency_s = latency_s
        self.gate = gate
        #: Raised by every run from now on (set it to make a working model start failing).
        self.raises = raises
        #: Set when a run has started (a test can then swap or close while it is held).
        self.entered = threading.Event()
        self.runs = 0
        self.closed = False

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.closed:
            raise AssertionError("ran on a closed model")
        checked = check_feeds(self.inputs, feeds)
        self.runs += 1
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(5)
        delay = self.latency_s() if callable(self.latency_s) else self.latency_s
        if delay:
            time.sleep(delay)
        if self.raises is not None:
            raise self.raises
        if self.closed:
            raise AssertionError("closed while running")
        if self.compute is not None:
            return self.compute(checked)
        first = checked[self.inputs[0].name]
        return {o.name: first.astype(o.dtype) for o in self.outputs}

    def _close(self) -> None:
        self.closed = True


class FakeRuntime(Runtime):
    """Loads ``model`` (or what ``make(path)`` returns) for any path; ``load_error`` makes every
    load fail with it."""

    name = "fake"

    def __init__(
        self,
        model: FakeModel | Callable[[Path], FakeModel],
        *,
        version: str = "1.0",
        load_error: BaseException | None = None,
    ) -> None:
        self._make = model if callable(model) and not isinstance(model, FakeModel) else None
        self._model = model if isinstance(model, FakeModel) else None
        self._version_string = version
        self.load_error = load_error
        self.loaded: list[Path] = []

    def _version(self) -> str | None:
        return self._version_string

    def _load(self, path: Path, options: LoadOptions) -> LoadedModel:
        if self.load_error is not None:
            raise self.load_error
        self.loaded.append(path)
        if self._make is not None:
            return self._make(path)
        assert self._model is not None
        return self._model
