"""Which converter makes artifacts for which runtime: the one table of runtime names on the
build side. Its keys are exactly the runtimes a profile can name
(``firmware_profiles.RuntimeName``)."""

from __future__ import annotations

from typing import get_args

from converters.converter import Converter
from converters.onnx.converter import OnnxRuntimeConverter
from converters.tensorrt.converter import TensorRtConverter
from converters.tflite.converter import LiteRtConverter
from edge_agent.contracts.errors import ConversionError
from firmware_profiles import RuntimeName

__all__ = ["CONVERTERS", "converters_for_build"]

CONVERTERS: dict[str, type[Converter]] = {
    c.runtime: c for c in (OnnxRuntimeConverter, LiteRtConverter, TensorRtConverter)
}
assert set(CONVERTERS) == set(get_args(RuntimeName)), "a profile runtime has no converter"


def converters_for_build() -> dict[str, Converter]:
    """One converter instance per runtime, for one build (they may share work across its
    candidates)."""
    return {name: cls() for name, cls in CONVERTERS.items()}


def converter(converters: dict[str, Converter], runtime: str) -> Converter:
    try:
        return converters[runtime]
    except KeyError:
        raise ConversionError(f"no converter for {runtime}", reason="no_converter") from None
