"""Export a ``torch.nn.Module`` to ONNX for users who start from PyTorch (torch is optional:
``pip install torch``; it is imported only here).

The batch dimension of every input and output is exported as dynamic, so one file serves any
batch size; the result is checked with ``onnx.checker`` and run once in onnxruntime against
the module's own output before it is returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.contracts.errors import ConversionError


def export(
    module: Any,
    example_inputs: Sequence[Any],
    path: Path,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    opset: int = 17,
    atol: float = 1e-4,
) -> Path:
    try:
        import torch
    except ImportError as e:
        raise ConversionError(
            "PyTorch is not installed: pip install torch", reason="torch_missing"
        ) from e
    import onnx
    import onnxruntime

    inputs = tuple(example_inputs)
    names_in = list(input_names or [f"input_{i}" for i in range(len(inputs))])
    module = module.eval()
    with torch.no_grad():
        expected = module(*inputs)
    outputs = expected if isinstance(expected, (tuple, list)) else (expected,)
    names_out = list(output_names or [f"output_{i}" for i in range(len(outputs))])
    axes = {name: {0: "batch"} for name in [*names_in, *names_out]}
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.onnx.export(
            module,
            inputs,
            str(path),
            input_names=names_in,
            output_names=names_out,
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )
        onnx.checker.check_model(str(path))
    except Exception as e:  # torch raises many exception types from its exporters
        raise ConversionError(f"torch.onnx.export failed: {e}", reason="export_failed") from e
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(names_in, inputs, strict=True)}
    got = session.run(names_out, feeds)
    for name, ref, out in zip(names_out, outputs, got, strict=True):
        diff = float(np.max(np.abs(ref.detach().cpu().numpy() - out)))
        if diff > atol:
            raise ConversionError(
                f"the exported model's output {name!r} differs from the module's by {diff:.3g}",
                reason="export_mismatch",
            )
    return path
