"""Converters: one ONNX model in, one artifact per device profile out, packed as a bundle.

converter.py   the seam: a Converter per runtime produces an artifact for a candidate
registry.py    runtime name → converter (onnx/, tflite/, tensorrt/ hold them)
build.py       a profile's candidates in order: convert, gate, self-test vectors, bundle
validate.py    the parity gate; data.py: calibration/validation sets; baseline.py: drift
toolchains/    converter toolchains that need their own pinned environment (onnx2tf)
job.py         one build in a subprocess of its own (what the server runs)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

#: Loaded on first use (PEP 562): a process that needs one module of the package (the upload's
#: inspector child, ``python -m converters.onnx.isolated``, run once per upload) does not
#: import the build pipeline, its converters and the bundle writer to get it.
_LAZY = {
    "BuildResult": "converters.build",
    "build_bundle": "converters.build",
    "Target": "converters.converter",
    "OnnxModelInfo": "converters.onnx",
    "inspect_onnx": "converters.onnx",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'converters' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
