"""Check an uploaded ONNX file and record what goes in and out of it.

``onnx`` is imported lazily: this module is used by the server, never by the agent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.bundle.manifest import ImagePreprocess, TensorSpec
from edge_agent.contracts.errors import ConversionError


@dataclass(frozen=True)
class OnnxModelInfo:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int
    ir_version: int
    producer: str
    #: How image files become its input (its ``edgefleet.preprocess`` metadata), if it says.
    preprocess: ImagePreprocess | None = None


def _tensor_spec(value_info: Any) -> TensorSpec:
    import onnx

    ttype = value_info.type.tensor_type
    if not value_info.type.HasField("tensor_type"):
        raise ConversionError(
            f"graph input/output {value_info.name!r} is not a tensor", reason="unsupported_io"
        )
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type).name
    except (KeyError, ValueError) as e:
        raise ConversionError(
            f"tensor {value_info.name!r} has an unsupported element type {ttype.elem_type}",
            reason="unsupported_io",
        ) from e
    shape: list[int | str | None] = []
    for dim in ttype.shape.dim:
        if dim.HasField("dim_value"):
            shape.append(int(dim.dim_value))
        elif dim.HasField("dim_param"):
            shape.append(dim.dim_param)
        else:
            shape.append(None)
    return TensorSpec(name=value_info.name, dtype=dtype, shape=shape)


def inspect_onnx(path: Path) -> OnnxModelInfo:
    """Run ``onnx.checker`` on the file and return its input/output specs.

    Raises :class:`ConversionError` (reason ``invalid_onnx``) for anything that is not a valid
    ONNX model: another file type, a truncated file, or a graph the checker rejects.
    """
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise ConversionError(
            f"not a readable ONNX model ({type(e).__name__}: {e})", reason="invalid_onnx"
        ) from e
    # What the record needs is read first and the model let go before the checker reads the
    # file again (in C++): the two copies of a large model are never held at once. An error in
    # reading it is raised after the checker's, which names the deeper fault.
    found: OnnxModelInfo | ConversionError
    try:
        found = _info(model)
    except ConversionError as e:
        found = e
    del model
    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(
            f"ONNX checker rejected the model: {first_line}", reason="invalid_onnx"
        ) from e
    if isinstance(found, ConversionError):
        raise found
    return found


def _info(model: Any) -> OnnxModelInfo:
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    inputs = [_tensor_spec(v) for v in graph.input if v.name not in initializers]
    outputs = [_tensor_spec(v) for v in graph.output]
    if not inputs or not outputs:
        raise ConversionError("the model has no inputs or no outputs", reason="invalid_onnx")
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    from converters.onnx.preprocess import read_preprocess

    return OnnxModelInfo(
        inputs=inputs,
        outputs=outputs,
        opset=int(opset),
        ir_version=int(model.ir_version),
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        preprocess=read_preprocess(model, inputs),
    )
