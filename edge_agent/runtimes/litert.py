"""LiteRT backend (``ai-edge-litert``, the ARM profiles' runtime), falling back to the older
``tflite_runtime`` package when that is what the device has.

A TFLite interpreter is not thread-safe (one set of input/output buffers), so calls are
serialised with a lock; a request whose batch size differs from the last one resizes the
input and re-allocates tensors first.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.bundle.manifest import TensorSpec
from edge_agent.contracts.errors import RuntimeBackendError
from edge_agent.runtimes.base import (
    LoadedModel,
    LoadOptions,
    Runtime,
    check_feeds,
    installed_version,
)


def _interpreter_class() -> tuple[Any, str] | None:
    for package in ("ai_edge_litert", "tflite_runtime"):
        try:
            module = importlib.import_module(f"{package}.interpreter")
        except ImportError:
            continue
        found = getattr(importlib.import_module(package), "__version__", None)
        return module.Interpreter, found if isinstance(found, str) else "unknown"
    return None


def _spec(detail: dict[str, Any]) -> TensorSpec:
    signature = detail.get("shape_signature")
    dims = signature if signature is not None and len(signature) else detail["shape"]
    shape: list[int | str | None] = [int(d) if d >= 0 else None for d in dims]
    return TensorSpec(name=detail["name"], dtype=np.dtype(detail["dtype"]).name, shape=shape)


class LiteRtModel(LoadedModel):
    def __init__(self, interpreter: Any) -> None:
        self._interpreter: Any = interpreter
        self._lock = threading.Lock()
        self._in = interpreter.get_input_details()
        self._out = interpreter.get_output_details()
        self.inputs = [_spec(d) for d in self._in]
        self.outputs = [_spec(d) for d in self._out]

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        checked = check_feeds(self.inputs, feeds)
        with self._lock:
            interp = self._interpreter
            if interp is None:
                raise RuntimeBackendError("model is closed", reason="closed")
            resized = False
            for detail in self._in:
                arr = checked[detail["name"]]
                if tuple(interp.get_input_details()[self._in.index(detail)]["shape"]) != arr.shape:
                    interp.resize_tensor_input(detail["index"], list(arr.shape))
                    resized = True
            if resized:
                interp.allocate_tensors()
            for detail in self._in:
                interp.set_tensor(detail["index"], checked[detail["name"]])
            interp.invoke()
            return {d["name"]: np.array(interp.get_tensor(d["index"])) for d in self._out}

    def _close(self) -> None:
        with self._lock:
            self._interpreter = None


class LiteRt(Runtime):
    name = "litert"

    def _version(self) -> str | None:
        # From the package's metadata, without importing it (ai_edge_litert's package alone
        # is 3.5 MiB resident: a device that serves with onnxruntime need not hold it).
        for module, dist in (
            ("ai_edge_litert", "ai-edge-litert"),
            ("tflite_runtime", "tflite-runtime"),
        ):
            found = installed_version(module, dist)
            if found is not None:
                return found
        return None

    def _load(self, path: Path, options: LoadOptions) -> LoadedModel:
        found = _interpreter_class()
        if found is None:
            raise RuntimeBackendError(
                "no TFLite runtime: pip install ai-edge-litert (or tflite-runtime)",
                reason="runtime_missing",
            )
        interpreter_class, _ = found
        try:
            interpreter = interpreter_class(
                model_path=str(path), num_threads=options.threads or None
            )
            interpreter.allocate_tensors()
        except (RuntimeError, ValueError) as e:
            raise RuntimeBackendError(
                f"LiteRT could not load {path.name}: {e}", reason="load_failed"
            ) from e
        return LiteRtModel(interpreter)
