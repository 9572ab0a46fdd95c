"""Reading and checking ONNX models."""

from converters.onnx.inspect import OnnxModelInfo, inspect_onnx

__all__ = ["OnnxModelInfo", "inspect_onnx"]
