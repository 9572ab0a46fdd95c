"""TensorRT backend (Jetson profiles).

A TensorRT bundle carries an ONNX model (QDQ int8 with explicit, symmetric quantization, or
fp32 for fp16/fp32 engines) and ``trt_recipe.json``: precision flags, workspace, DLA core,
optimisation profile shapes. An engine is specific to the GPU (SM) and the TensorRT version,
so it is built on the device (or on a build worker of the same kind) and cached under
``(SM, TensorRT version, sha256 of the ONNX + recipe)``; the next load deserializes it in
seconds. A prebuilt engine shipped in the bundle as ``engines/sm{SM}-trt{version}.engine``
is used when it matches. The engine is deserialized and its I/O checked against the ONNX
model before the agent switches traffic to it.

``tensorrt`` and ``cuda-python`` are imported lazily, only when a TensorRT model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.bundle.archive import sha256_file
from edge_agent.bundle.manifest import TensorSpec
from edge_agent.contracts.errors import RuntimeBackendError
from edge_agent.runtimes.base import (
    LoadedModel,
    LoadOptions,
    Runtime,
    check_feeds,
    installed_version,
)

RECIPE_NAME = "trt_recipe.json"


@dataclass(frozen=True)
class Recipe:
    """How to build the engine (written by ``converters.tensorrt``)."""

    precision: str
    #: BuilderFlag names to set: "FP16", "INT8" (explicit QDQ networks), …
    flags: list[str]
    workspace_mb: int
    #: DLA core to build for, or -1 for the GPU.
    dla_core: int = -1
    builder_optimization_level: int = 3
    #: input name → {"min": […], "opt": […], "max": […]} for inputs with dynamic dimensions.
    shapes: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    onnx: str = "model.onnx"

    @classmethod
    def load(cls, path: Path) -> Recipe:
        try:
            data = json.loads(path.read_text())
            if data.pop("format", 1) != 1:
                raise ValueError("unknown recipe format")
            return cls(**data)
        except (OSError, ValueError, TypeError) as e:
            raise RuntimeBackendError(
                f"bad TensorRT recipe {path.name}: {e}", reason="load_failed"
            ) from e

    def to_json(self) -> str:
        return json.dumps({"format": 1, **self.__dict__}, sort_keys=True, indent=1)


def engine_key(onnx_path: Path, recipe_path: Path, sm: str, trt_version: str) -> str:
    """Cache key of an engine: the GPU, the TensorRT version, and what it is built from."""
    parts = b"".join(bytes.fromhex(sha256_file(p)) for p in (onnx_path, recipe_path))
    return f"sm{sm.replace('.', '')}-trt{trt_version}-{hashlib.sha256(parts).hexdigest()[:32]}"


def _trt() -> Any:
    try:
        import tensorrt

        return tensorrt
    except ImportError as e:
        raise RuntimeBackendError(
            "TensorRT is not installed: on Jetson it comes with JetPack "
            "(apt install python3-libnvinfer); elsewhere pip install tensorrt",
            reason="runtime_missing",
        ) from e


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart

        return cudart
    except ImportError:
        try:
            from cuda import cudart

            return cudart
        except ImportError as e:
            raise RuntimeBackendError(
                "cuda-python is not installed: pip install cuda-python", reason="runtime_missing"
            ) from e


def _check(result: Any, what: str) -> Any:
    """cuda-python calls return (error, *values)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeBackendError(f"CUDA {what} failed: {err}", reason="cuda_error")
    return values[0] if len(values) == 1 else values


def gpu_sm(device: int = 0) -> str:
    cudart = _cudart()
    props = _check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    return f"{props.major}.{props.minor}"


def build_engine(onnx_path: Path, recipe: Recipe, *, timing_cache: Path | None = None) -> bytes:
    """Build a serialized engine from the ONNX model and the recipe (minutes on a Jetson)."""
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT < 10
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeBackendError(
            "TensorRT cannot parse the model: " + "; ".join(errors), reason="load_failed"
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, recipe.workspace_mb << 20)
    if hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = recipe.builder_optimization_level
    for name in recipe.flags:
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is None:
            raise RuntimeBackendError(
                f"this TensorRT has no builder flag {name}", reason="load_failed"
            )
        config.set_flag(flag)
    if recipe.dla_core >= 0:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = recipe.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    if recipe.shapes:
        profile = builder.create_optimization_profile()
        for name, dims in recipe.shapes.items():
            profile.set_shape(name, dims["min"], dims["opt"], dims["max"])
        config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None:
        blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeBackendError("TensorRT could not build an engine", reason="load_failed")
    if cache is not None and timing_cache is not None:
        _write_atomic(timing_cache, bytes(memoryview(cache.serialize())))
    return bytes(memoryview(serialized))


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32,
           "INT64": np.int64, "BOOL": np.bool_, "UINT8": np.uint8}  # fmt: skip


class TensorRtModel(LoadedModel):
    """One execution context; calls are serialised (a context is not re-entrant)."""

    def __init__(self, engine: Any, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
        self._trt = _trt()
        self._cudart = _cudart()
        self._engine = engine
        self._context = engine.create_execution_context()
        self._stream = _check(self._cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._lock = threading.Lock()
        self._buffers: dict[str, tuple[int, int]] = {}  # name → (device pointer, bytes)
        self.inputs, self.outputs = inputs, outputs

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check(self._cudart.cudaFree(ptr), "cudaFree")
            ptr = _check(self._cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc")
            self._buffers[name] = (ptr, nbytes)
        return int(ptr)

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        checked = check_feeds(self.inputs, feeds)
        cudart = self._cudart
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self._lock:
            if self._context is None:
                raise RuntimeBackendError("model is closed", reason="closed")
            for spec in self.inputs:
                arr = checked[spec.name]
                self._context.set_input_shape(spec.name, arr.shape)
                ptr = self._buffer(spec.name, arr.nbytes)
                _check(
                    cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, self._stream),
                    "copy in",
                )
                self._context.set_tensor_address(spec.name, ptr)
            results = {}
            for spec in self.outputs:
                shape = tuple(self._context.get_tensor_shape(spec.name))
                dtype = _DTYPES[self._engine.get_tensor_dtype(spec.name).name]
                results[spec.name] = np.empty(shape, dtype=dtype)
                ptr = self._buffer(spec.name, results[spec.name].nbytes)
                self._context.set_tensor_address(spec.name, ptr)
            if not self._context.execute_async_v3(int(self._stream)):
                raise RuntimeBackendError("TensorRT inference failed", reason="inference_failed")
            for spec in self.outputs:
                out = results[spec.name]
                ptr, _ = self._buffers[spec.name]
                _check(
                    cudart.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes, d2h, self._stream),
                    "copy out",
                )
            _check(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
            return results

    def _close(self) -> None:
        with self._lock:
            if self._context is None:
                return
            for ptr, _ in self._buffers.values():
                self._cudart.cudaFree(ptr)
            self._buffers.clear()
            self._cudart.cudaStreamDestroy(self._stream)
            self._context = None
            self._engine = None


class TensorRt(Runtime):
    name = "tensorrt"

    def _version(self) -> str | None:
        return installed_version("tensorrt", "tensorrt", "tensorrt-cu12", "tensorrt-cu11")

    def _load(self, path: Path, options: LoadOptions) -> LoadedModel:
        """``path`` is the bundle's ONNX model; the recipe lies beside it."""
        trt = _trt()
        recipe_path = path.parent / RECIPE_NAME
        recipe = Recipe.load(recipe_path)
        sm = gpu_sm()
        key = engine_key(path, recipe_path, sm, trt.__version__)
        prebuilt = path.parent / "engines" / f"sm{sm.replace('.', '')}-trt{trt.__version__}.engine"
        cache_dir = options.cache_dir or path.parent / ".engine-cache"
        cached = cache_dir / f"{key}.engine"
        if prebuilt.is_file():
            blob = prebuilt.read_bytes()
        elif cached.is_file():
            blob = cached.read_bytes()
        else:
            timing = cache_dir / f"sm{sm.replace('.', '')}-trt{trt.__version__}.timing-cache"
            blob = build_engine(path, recipe, timing_cache=timing)
            _write_atomic(cached, blob)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if recipe.dla_core >= 0:
            runtime.DLA_core = recipe.dla_core
        engine = runtime.deserialize_cuda_engine(blob)
        if engine is None:
            if cached.is_file():
                cached.unlink()  # stale or corrupt: rebuilt on the next load
            raise RuntimeBackendError(
                "TensorRT could not deserialize the engine (built for another GPU or version?)",
                reason="load_failed",
            )
        inputs, outputs = _engine_io(engine)
        return TensorRtModel(engine, inputs, outputs)


def _engine_io(engine: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    trt = _trt()
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtype = np.dtype(_DTYPES[engine.get_tensor_dtype(name).name]).name
        shape: list[int | str | None] = [
            int(d) if d >= 0 else None for d in engine.get_tensor_shape(name)
        ]
        spec = TensorSpec(name=name, dtype=dtype, shape=shape)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        (inputs if is_input else outputs).append(spec)
    return inputs, outputs
