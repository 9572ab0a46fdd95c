"""ONNX-to-ONNX conversions with onnxruntime's tools: graph optimisation and static int8
quantization (QDQ, per-channel weights, calibrated on the user's data).

Two flavours of int8:
- ``x86``: uint8 activations / int8 weights (U8S8), what onnxruntime's x86 kernels run fastest.
- ``tensorrt``: int8 symmetric activations and weights (zero point 0), the explicit
  quantization TensorRT expects.
``quantize_dynamic`` is never used: for convolutional models it produces ConvInteger, which
onnxruntime runs 5-10x slower than fp32.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np

from converters.data import MAX_CALIBRATION_SAMPLES, Dataset
from edge_agent.contracts.errors import ConversionError


def optimize_fp32(source: Path, out: Path) -> Path:
    """fp32 ONNX with onnxruntime's basic graph optimisations applied offline (constant
    folding, redundant node removal, hardware-independent fusions), so devices start faster.
    Extended/layout optimisations are left to the device: they depend on its CPU."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(out)
    try:
        onnxruntime.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise ConversionError(
            f"onnxruntime cannot load the model: {e}", reason="unsupported_model"
        ) from e
    return out


def _consumers(model_path: Path, inputs: frozenset[str]) -> list[str]:
    """The nodes that read ``inputs`` directly: left unquantized, so state and configuration
    inputs reach the model in fp32."""
    if not inputs:
        return []
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return [n.name for n in graph.node if n.name and inputs.intersection(n.input)]


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a :class:`Dataset`."""

    def __init__(self, data: Dataset) -> None:
        self._iter: Iterator[dict[str, np.ndarray]] = data.feeds()

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self._iter


def quantize_int8(
    source: Path,
    out: Path,
    calibration: Dataset,
    *,
    flavour: Literal["x86", "tensorrt"],
    fp32_inputs: frozenset[str] = frozenset(),
    reduce_range: bool = False,
) -> Path:
    """Static QDQ int8 with per-channel weights, MinMax-calibrated on up to 64 samples.
    ``reduce_range``: 7-bit weights, for x86 CPUs without VNNI (see onnxruntime's
    quantization notes: their u8 x s8 products saturate in int16 otherwise)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    work = out.parent / (out.stem + ".work")
    work.mkdir(parents=True, exist_ok=True)
    try:
        prepared = work / "prepared.onnx"
        try:
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        except Exception as e:  # shape inference / optimisation errors come in many types
            raise ConversionError(
                f"onnxruntime's quantization pre-processing failed: {e}",
                reason="unsupported_model",
            ) from e
        data = calibration.take(slice(0, MAX_CALIBRATION_SAMPLES))
        symmetric = flavour == "tensorrt"
        try:
            quantize_static(
                str(prepared),
                str(out),
                _Reader(data),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                reduce_range=reduce_range,
                nodes_to_exclude=_consumers(prepared, fp32_inputs),
                extra_options={
                    "ActivationSymmetric": symmetric,
                    "WeightSymmetric": True,
                    # TensorRT fuses Q/DQ pairs itself and wants them around every input.
                    "QDQKeepRemovableActivations": symmetric,
                    "CalibTensorRangeSymmetric": symmetric,
                },
            )
        except ConversionError:
            raise
        except Exception as e:
            raise ConversionError(
                f"int8 quantization failed: {e}", reason="quantization_failed"
            ) from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
