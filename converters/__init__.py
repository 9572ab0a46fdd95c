"""Converters: one ONNX model in, one artifact per device profile out, packed as a bundle.

``converters.onnx`` reads and checks ONNX files; ``converters.build`` chooses a target
(runtime, precision) for a profile, produces the artifact, computes its self-test vectors in
the target runtime and writes the bundle.
"""

from converters.build import BuildResult, Target, build_bundle, choose_target
from converters.onnx import OnnxModelInfo, inspect_onnx

__all__ = [
    "BuildResult",
    "OnnxModelInfo",
    "Target",
    "build_bundle",
    "choose_target",
    "inspect_onnx",
]
