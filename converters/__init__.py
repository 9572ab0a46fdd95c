"""Converters: one ONNX model in, one artifact per device profile out, packed as a bundle.

converter.py   the seam: a Converter per runtime produces an artifact for a candidate
registry.py    runtime name → converter (onnx/, tflite/, tensorrt/ hold them)
build.py       a profile's candidates in order: convert, gate, self-test vectors, bundle
validate.py    the parity gate; data.py: calibration/validation sets; baseline.py: drift
toolchains/    converter toolchains that need their own pinned environment (onnx2tf)
job.py         one build in a subprocess of its own (what the server runs)
"""

from converters.build import BuildResult, build_bundle
from converters.converter import Target
from converters.onnx import OnnxModelInfo, inspect_onnx

__all__ = [
    "BuildResult",
    "OnnxModelInfo",
    "Target",
    "build_bundle",
    "inspect_onnx",
]
