"""A model's image preprocessing, carried in its ONNX file's ``metadata_props``.

``edgefleet models annotate`` writes it; the upload checks it against the model's inputs (a
bad one is refused with the upload); every build copies it into the signed manifest, where
``edge-agent score`` reads how to turn image files into the model's input. ``onnx`` is
imported lazily: this module runs on the server and the operator's machine, never the agent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_agent.bundle.manifest import (
    PREPROCESS_METADATA_KEY,
    ImagePreprocess,
    TensorSpec,
    check_image_input,
)
from edge_agent.contracts.errors import ConversionError
from edge_agent.contracts.structs import error_field

__all__ = ["check_preprocess", "preprocess_from_file", "read_preprocess"]


def read_preprocess(model: Any, inputs: list[TensorSpec]) -> ImagePreprocess | None:
    """The preprocessing an ONNX model (``onnx.ModelProto``) carries, checked against its
    inputs; None when it carries none. Raises ConversionError (``bad_preprocess``)."""
    raw = next((p.value for p in model.metadata_props if p.key == PREPROCESS_METADATA_KEY), None)
    if raw is None:
        return None
    try:
        found = ImagePreprocess.from_json(raw)
    except ValueError as e:
        field, message = error_field(e)
        raise ConversionError(
            f"the model's {PREPROCESS_METADATA_KEY} metadata is not valid: {field or 'it'}: "
            f"{message}",
            reason="bad_preprocess",
        ) from e
    check_preprocess(found, inputs)
    return found


def check_preprocess(preprocess: ImagePreprocess, inputs: list[TensorSpec]) -> None:
    spec = next((s for s in inputs if s.name == preprocess.input), None)
    if spec is None:
        raise ConversionError(
            f"image preprocessing names input {preprocess.input!r}; the model's inputs are "
            f"{[s.name for s in inputs]}",
            reason="bad_preprocess",
        )
    if not spec.dtype.startswith(("float", "uint8", "int8")):
        raise ConversionError(
            f"input {spec.name!r} is {spec.dtype}: an image feeds a float or 8-bit input",
            reason="bad_preprocess",
        )
    try:
        check_image_input(preprocess, spec)
    except ValueError as e:
        raise ConversionError(str(e), reason="bad_preprocess") from e


def preprocess_from_file(path: Path, inputs: list[TensorSpec]) -> ImagePreprocess | None:
    """:func:`read_preprocess` of an ONNX file (its graph's weights are not read)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return read_preprocess(model, inputs)
