"""Inspect an uploaded model, and the sets that come with it, in a child process.

``onnx.load`` and ``onnx.checker`` hold the whole model in memory (twice, briefly: Python's
copy and the checker's), and a calibration set is read whole by numpy. In the server's own
process that memory would stay with it long after the upload (the allocator keeps it): a
300 MB model took a server from 133 MiB to a 1 GiB peak. In a child it is the host's for the
few seconds of the check, and a file that crashes the parser takes only the child with it.

The child reads one JSON request on stdin and writes one JSON answer on stdout:
``{"info": …, "samples": {"calibration": n}, "peak_mib": n}`` or ``{"error": …}``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters.onnx.inspect import OnnxModelInfo
from edge_agent.bundle.manifest import ImagePreprocess, TensorSpec
from edge_agent.contracts.errors import ConversionError

#: The child's command (a test points it at one that dies).
COMMAND = [sys.executable, "-m", "converters.onnx.isolated"]


@dataclass(frozen=True)
class Inspected:
    info: OnnxModelInfo
    #: Samples in each set given, by its name ("calibration", "validation").
    samples: dict[str, int]
    #: The child's peak resident memory.
    peak_mib: float


def inspect_isolated(model: Path, sets: dict[str, Path], *, timeout_s: float) -> Inspected:
    """:func:`~converters.onnx.inspect.inspect_onnx` on ``model`` and
    :func:`~converters.data.load_dataset` on each of ``sets``, in a child process. Raises
    :class:`ConversionError` as they do (``fields["dataset"]`` names a set that failed), or
    reason ``inspector_failed`` when the child died or ran past ``timeout_s``."""
    request = {"model": str(model), "sets": {k: str(v) for k, v in sets.items()}}
    try:
        done = subprocess.run(
            COMMAND,
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired as e:
        raise ConversionError(
            f"checking the model took longer than {timeout_s:.0f} s", reason="inspector_failed"
        ) from e
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        answer = None
    if done.returncode != 0 or not isinstance(answer, dict):
        how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
        last = done.stderr.strip().splitlines()[-1:] or [""]
        raise ConversionError(
            f"the model could not be checked: its inspector died ({how}"
            + (f": {last[0][:200]}" if last[0] else "")
            + "); a file that crashes the ONNX parser, or a host out of memory",
            reason="inspector_failed",
        )
    if "error" in answer:
        error = answer["error"]
        raise ConversionError(
            str(error["message"]), reason=str(error["reason"]), **dict(error["fields"])
        )
    raw = answer["info"]
    info = OnnxModelInfo(
        inputs=[TensorSpec.from_dict(s) for s in raw["inputs"]],
        outputs=[TensorSpec.from_dict(s) for s in raw["outputs"]],
        opset=int(raw["opset"]),
        ir_version=int(raw["ir_version"]),
        producer=str(raw["producer"]),
        preprocess=ImagePreprocess.from_dict(raw["preprocess"]) if raw.get("preprocess") else None,
    )
    samples = {str(k): int(v) for k, v in answer["samples"].items()}
    return Inspected(info, samples, float(answer["peak_mib"]))


def _child(request: dict[str, Any]) -> dict[str, Any]:
    from converters.data import load_dataset
    from converters.onnx.inspect import inspect_onnx

    try:
        info = inspect_onnx(Path(request["model"]))
        samples = {
            what: load_dataset(Path(path), info.inputs, what=what).samples
            for what, path in request["sets"].items()
        }
    except ConversionError as e:
        return {"error": {"message": e.message, "reason": e.reason, "fields": e.fields}}
    return {
        "info": {
            "inputs": [s.to_dict() for s in info.inputs],
            "outputs": [s.to_dict() for s in info.outputs],
            "opset": info.opset,
            "ir_version": info.ir_version,
            "producer": info.producer,
            "preprocess": info.preprocess.to_dict() if info.preprocess else None,
        },
        "samples": samples,
    }


def main() -> None:
    answer = _child(json.loads(sys.stdin.read()))
    answer["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sys.stdout.write(json.dumps(answer, default=str))


if __name__ == "__main__":
    main()
