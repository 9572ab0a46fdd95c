"""TensorRT artifacts (Jetson profiles): a TensorRT-ready ONNX model and its engine recipe;
the engine itself is built on the device (see ``converters.tensorrt``)."""

from __future__ import annotations

from typing import ClassVar

from converters.converter import Artifact, ConversionJob, Converter, Target, onnx_versions

__all__ = ["TensorRtConverter"]


class TensorRtConverter(Converter):
    runtime = "tensorrt"
    #: Looser than onnxruntime's: the vectors come from the host proxy, the engine chooses its
    #: own kernels (and fp16 accumulation) on the device.
    selftest_tolerance: ClassVar[dict[str, tuple[float, float]]] = {
        "fp32": (1e-3, 1e-2),
        "fp16": (5e-2, 5e-2),
        "int8": (1e-1, 1e-1),
    }

    def produce(self, target: Target, job: ConversionJob) -> Artifact:
        from converters.tensorrt import build_artifact

        path, recipe = build_artifact(
            job.source,
            job.out_dir(target),
            job.profile,
            target.precision,
            job.inputs,
            job.calibration,
            batch=job.batch,
            fp32_inputs=job.fp32_inputs,
        )
        return Artifact(
            path,
            {**onnx_versions(), "tensorrt-recipe": "1"},
            "onnxruntime CPU (host proxy for TensorRT; the engine is built and checked "
            "against the self-test vectors on the device)",
            gate_runtime="onnxruntime",
            extra=[recipe],
        )
