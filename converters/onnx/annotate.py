"""``edgefleet models annotate``: write a model's image preprocessing into its ONNX file."""

from __future__ import annotations

import json
import os
from pathlib import Path

from converters.onnx.inspect import inspect_onnx
from converters.onnx.preprocess import check_preprocess
from edge_agent.bundle.manifest import PREPROCESS_METADATA_KEY, ImagePreprocess

__all__ = ["annotate"]


def annotate(source: Path, out: Path, preprocess: ImagePreprocess) -> None:
    """Write ``source`` with ``preprocess`` in its metadata to ``out`` (replaced whole; may be
    ``source`` itself). Checked against the model's inputs first: a refusal writes nothing."""
    import onnx

    info = inspect_onnx(source)
    check_preprocess(preprocess, info.inputs)
    model = onnx.load(str(source))
    kept = [p for p in model.metadata_props if p.key != PREPROCESS_METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key = PREPROCESS_METADATA_KEY
    entry.value = json.dumps(preprocess.to_dict(), sort_keys=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        onnx.save(model, str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
