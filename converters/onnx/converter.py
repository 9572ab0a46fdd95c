"""ONNX Runtime artifacts (x86 profiles): the graph-optimised fp32 model, or static int8 QDQ
quantization calibrated on the user's data (never dynamic quantization: it makes CNNs 5-10x
slower through ConvInteger)."""

from __future__ import annotations

from typing import ClassVar

from converters.converter import Artifact, ConversionJob, Converter, Target, onnx_versions
from edge_agent.contracts.errors import ConversionError

__all__ = ["OnnxRuntimeConverter"]


class OnnxRuntimeConverter(Converter):
    runtime = "onnxruntime"
    #: fp32 kernels differ slightly between CPUs (AVX2 vs AVX-512 vs NEON accumulate in
    #: different orders), quantized ones more.
    selftest_tolerance: ClassVar[dict[str, tuple[float, float]]] = {
        "fp32": (1e-4, 1e-3),
        "fp16": (1e-2, 1e-2),
        "int8": (5e-2, 5e-2),
    }

    def produce(self, target: Target, job: ConversionJob) -> Artifact:
        from converters.onnx.quantize import optimize_fp32, quantize_int8

        out = job.out_dir(target) / "model.onnx"
        if target.precision == "fp32":
            path = optimize_fp32(job.source, out)
        elif target.precision == "int8":
            calibration = job.require_calibration(target)
            features = set(job.profile.accelerator.cpu_features)
            path = quantize_int8(
                job.source,
                out,
                calibration,
                flavour="x86",
                fp32_inputs=job.fp32_inputs,
                # Without VNNI, x86 int8 kernels multiply u8 x s8 pairs into saturating int16
                # (vpmaddubsw): 7-bit weights keep the sums in range, at a little precision.
                reduce_range=not features & {"avx512_vnni", "avx_vnni", "amx_int8"},
            )
        else:
            raise ConversionError(
                f"onnxruntime {target.precision} is not built by edgefleet", reason="no_converter"
            )
        return Artifact(path, onnx_versions(), "onnxruntime (CPU)", gate_runtime="onnxruntime")
