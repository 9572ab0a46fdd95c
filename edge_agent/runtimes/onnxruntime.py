"""ONNX Runtime backend (x86 profiles, and ARM/Jetson devices serving plain ONNX)."""

from __future__ import annotations

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

# ONNX tensor type strings → numpy dtype names.
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


def _spec(arg: Any) -> TensorSpec:
    dtype = _ORT_TYPES.get(arg.type)
    if dtype is None:
        raise RuntimeBackendError(f"tensor {arg.name!r} has unsupported type {arg.type}")
    return TensorSpec(name=arg.name, dtype=dtype, shape=list(arg.shape))


class OnnxRuntimeModel(LoadedModel):
    def __init__(self, session: Any) -> None:
        self._session = session
        self._lock = threading.Lock()
        self.inputs = [_spec(a) for a in session.get_inputs()]
        self.outputs = [_spec(a) for a in session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._session
        if session is None:
            raise RuntimeBackendError("model is closed", reason="closed")
        # InferenceSession.run is thread-safe (no lock on the hot path), and it refuses wrong
        # names, dtypes, ranks and fixed dims itself before running anything. So the feeds go
        # in as they are; only when onnxruntime refuses them does check_feeds run, to turn a
        # caller's mistake into a RequestError that says what to change (or to cast JSON's
        # float64/int64 to the model's type and run again).
        try:
            values = session.run(self._output_names, dict(feeds))
        except Exception as first:  # onnxruntime raises its own untyped errors
            checked = check_feeds(self.inputs, feeds)
            if all(checked[name] is feeds[name] for name in checked):
                raise RuntimeBackendError(f"onnxruntime inference failed: {first}") from first
            try:
                values = session.run(self._output_names, checked)
            except Exception as e:
                raise RuntimeBackendError(f"onnxruntime inference failed: {e}") from e
        return dict(zip(self._output_names, values, strict=True))

    def _close(self) -> None:
        with self._lock:
            self._session = None


#: The wheels that install the ``onnxruntime`` module.
ORT_DISTRIBUTIONS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-openvino",
    "onnxruntime-directml",
    "onnxruntime-qnn",
)


class OnnxRuntime(Runtime):
    name = "onnxruntime"

    def _version(self) -> str | None:
        # From the package's metadata, without importing it (~20 MiB resident for good, on a
        # device that may serve with another runtime); a build without metadata is asked.
        found = installed_version("onnxruntime", *ORT_DISTRIBUTIONS)
        if found is not None or importlib.util.find_spec("onnxruntime") is None:
            return found
        import onnxruntime

        return str(onnxruntime.__version__)

    def _load(self, path: Path, options: LoadOptions) -> LoadedModel:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise RuntimeBackendError(
                "onnxruntime is not installed (pip install 'edgefleet[agent]')",
                reason="runtime_missing",
            ) from e
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.spin else "0")
        so.log_severity_level = 3
        available = set(ort.get_available_providers())
        providers = [p for p in options.providers if p in available] or ["CPUExecutionProvider"]
        try:
            session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as e:
            raise RuntimeBackendError(
                f"onnxruntime could not load {path.name}: {e}", reason="load_failed"
            ) from e
        return OnnxRuntimeModel(session)
