"""LiteRT artifacts (ARM profiles): onnx2tf in its own pinned toolchain. One conversion yields
both precisions, so the converter keeps its outcome (or its error) for the build's other
candidate."""

from __future__ import annotations

import shutil
import time
from typing import Any, ClassVar

from converters.converter import Artifact, ConversionJob, Converter, Target
from edge_agent.contracts.errors import ConversionError

__all__ = ["LiteRtConverter"]


class LiteRtConverter(Converter):
    runtime = "litert"
    selftest_tolerance: ClassVar[dict[str, tuple[float, float]]] = {
        "fp32": (1e-4, 1e-3),
        "fp16": (1e-2, 1e-2),
        "int8": (5e-2, 5e-2),
    }

    def __init__(self) -> None:
        #: (job, outputs, toolchain) of the one onnx2tf run of the current job, or its error.
        self._done: tuple[ConversionJob, Any, Any] | None = None
        self._failed: tuple[ConversionJob, ConversionError] | None = None

    def produce(self, target: Target, job: ConversionJob) -> Artifact:
        from converters.tflite.convert import custom_ops

        if target.precision == "int8":
            job.require_calibration(target)
        files, toolchain = self._convert(job)
        path = files.fp32 if target.precision == "fp32" else files.int8
        if path is None:
            raise ConversionError(
                files.int8_error or f"onnx2tf produced no {target.precision} model",
                reason="converter_failed",
            )
        unsupported = custom_ops(path)
        if unsupported:
            raise ConversionError(
                f"the TFLite model contains operator(s) LiteRT cannot run: "
                f"{', '.join(unsupported)} (custom ops the converter could not lower; the "
                "ONNX model's control flow or a custom op is the usual cause)",
                reason="unsupported_operator",
                operators=unsupported,
            )
        final = job.out_dir(target) / "model.tflite"
        shutil.copyfile(path, final)
        return Artifact(
            final,
            {f"tflite-toolchain/{k}": v for k, v in toolchain.versions.items()},
            "LiteRT (ai-edge-litert)",
            gate_runtime="litert",
        )

    def _convert(self, job: ConversionJob) -> tuple[Any, Any]:
        # Looked up at call time, so a test can stand in for the toolchain.
        from converters import toolchains
        from converters.tflite import convert as tflite

        if self._failed is not None and self._failed[0] is job:
            raise self._failed[1]
        if self._done is not None and self._done[0] is job:
            return self._done[1], self._done[2]
        try:
            toolchain = toolchains.locate("tflite")
            start = time.monotonic()
            # Calibration (and so onnx2tf's int8 pass) only when an int8 LiteRT candidate is
            # in the build: a build asking for fp32 alone cannot fail on quantization.
            wants_int8 = any(
                t.runtime == self.runtime and t.precision == "int8" for t in job.targets
            )
            files = tflite.convert(
                toolchain,
                job.source,
                job.work / "tflite",
                job.inputs,
                job.outputs,
                job.calibration if wants_int8 or not job.targets else None,
                log=job.log,
                feed_shapes=job.feed_shapes,
            )
            job.log(f"onnx2tf finished in {time.monotonic() - start:.1f} s")
        except ConversionError as e:
            self._failed = (job, e)
            raise
        self._done = (job, files, toolchain)
        return files, toolchain
