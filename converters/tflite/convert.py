"""ONNX → TFLite through onnx2tf, run as a subprocess in the pinned ``tflite`` toolchain.

Pitfalls handled (DESIGN.md §5): onnx2tf rewrites its input file, so it gets a scratch copy;
it runs ``onnxsim`` through PATH, so the toolchain's bin goes first; for 4-D 3-channel inputs
it downloads a calibration sample from the internet unless a file of that name is in its
working directory, so one is put there. 4-D inputs keep their NCHW layout (``-kt``) so apps
send the same tensors to every runtime. Exit code 0 does not mean a usable model: the output
is checked for custom operators here and then run in LiteRT by the parity gate.

int8 is onnx2tf's ``integer_quant``: int8 weights and activations, float32 inputs and outputs
(the model's interface does not change), calibrated on the user's data.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converters.data import MAX_CALIBRATION_SAMPLES, Dataset, batch_first
from converters.toolchains import Toolchain
from edge_agent.bundle.manifest import TensorSpec
from edge_agent.contracts.errors import ConversionError

#: The file onnx2tf otherwise downloads (it only needs to exist and be loadable).
_SAMPLE_NAME = "calibration_image_sample_data_20x128x128x3_float32.npy"


@dataclass(frozen=True)
class TfliteOutputs:
    fp32: Path
    int8: Path | None
    #: Why there is no int8 model although calibration data was given.
    int8_error: str | None = None


def convert(
    toolchain: Toolchain,
    source: Path,
    work: Path,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    calibration: Dataset | None,
    *,
    log: Callable[[str], None],
    timeout_s: float = 3600,
    feed_shapes: dict[str, tuple[int, ...]] | None = None,
) -> TfliteOutputs:
    """Convert once, producing fp32 and (with calibration data) int8 ``.tflite`` files."""
    work.mkdir(parents=True, exist_ok=True)
    scratch = work / "model.onnx"
    shutil.copyfile(source, scratch)
    np.save(work / _SAMPLE_NAME, np.zeros((20, 128, 128, 3), np.float32))
    out_dir = work / "onnx2tf"
    cmd = [
        str(toolchain.python), "-m", "onnx2tf",
        "-i", scratch.name, "-o", out_dir.name,
        "-osd",  # signature with the ONNX input/output names
        "-n",  # not verbose
    ]  # fmt: skip
    for spec in inputs:
        if len(spec.shape) == 4:
            cmd += ["-kt", spec.name]
    # onnx2tf needs static shapes where the model has "?" or -1 other than a leading batch:
    # the shape of a real feed (a leading dynamic batch it handles itself, and keeps).
    static = [
        f"{s.name}:{','.join(str(d) for d in (feed_shapes or {})[s.name])}"
        for s in inputs
        if s.name in (feed_shapes or {}) and _dynamic_beyond_batch(s)
    ]
    if static:
        cmd += ["-ois", *static]
    if calibration is not None:
        cmd += ["-oiqt", "-qt", "per-channel"]
        data = calibration.take(slice(0, MAX_CALIBRATION_SAMPLES))
        for spec in inputs:
            path = work / f"calibration-{len(cmd)}.npy"
            array = data.arrays[spec.name]
            if batch_first(spec):
                # onnx2tf wants rows along the model's batch axis: the feeds, concatenated.
                array = array.reshape(array.shape[0] * array.shape[1], *array.shape[2:])
            np.save(path, array)
            cmd += ["-cind", spec.name, str(path), "0", "1"]
    log("running: " + " ".join(cmd[1:]))
    with (work / "onnx2tf.log").open("w") as out:
        try:
            proc = subprocess.run(
                cmd,
                cwd=work,
                env=toolchain.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired as e:
            raise ConversionError(
                f"onnx2tf did not finish within {timeout_s:.0f} s", reason="converter_timeout"
            ) from e
    text = (work / "onnx2tf.log").read_text(errors="replace")
    for line in text.splitlines():
        if "error" in line.lower() or "warning" in line.lower():
            log("onnx2tf: " + line.strip()[:300])
    if proc.returncode != 0:
        node, error = _summarize(text)
        op = _op_type(source, node) if node else None
        where = f"at ONNX node {node!r}{f' ({op})' if op else ''}: " if node else ""
        raise ConversionError(
            f"onnx2tf could not convert the model {where}{error.rstrip('.')}; what to do: "
            "export the model "
            "with static shapes (a fixed batch size) or without that construct, or serve it "
            "with the profile's other runtime; the full converter output is in the build log",
            reason="converter_failed",
            exit_code=proc.returncode,
            node=node or "",
            operator=op or "",
        )
    fp32 = out_dir / "model_float32.tflite"
    int8 = out_dir / "model_integer_quant.tflite"
    if not fp32.is_file():
        tail = "\n".join(text.strip().splitlines()[-20:])
        raise ConversionError(
            f"onnx2tf exited 0 but wrote no {fp32.name}:\n{tail}", reason="converter_failed"
        )
    int8_error = None
    if calibration is not None and not int8.is_file():
        # Judged on its own: the fp32 model onnx2tf did write is still a candidate.
        node, error = _summarize(text)
        int8_error = (
            f"onnx2tf wrote the fp32 model but no int8 one ({int8.name}): "
            + (f"at ONNX node {node!r}: " if node else "")
            + error
        )
    made = [fp32, int8] if calibration is not None and int8_error is None else [fp32]
    for path in made:
        rename_io(path, [s.name for s in inputs], [s.name for s in outputs])
    return TfliteOutputs(
        fp32=fp32,
        int8=int8 if calibration is not None and int8_error is None else None,
        int8_error=int8_error,
    )


def _dynamic_beyond_batch(spec: TensorSpec) -> bool:
    dims = spec.shape[1:] if batch_first(spec) else spec.shape
    return any(not (isinstance(d, int) and d > 0) for d in dims)


def _op_type(source: Path, node: str) -> str | None:
    """The ONNX operator of the node onnx2tf named."""
    import onnx

    try:
        graph = onnx.load(str(source), load_external_data=False).graph
    except Exception:  # the name is a help, not a requirement
        return None
    # onnx2tf names nodes by the ONNX name, a leading "/" written as "wa/".
    wanted = {node, "/" + node.removeprefix("wa/"), node.removeprefix("wa/")}
    return next((n.op_type for n in graph.node if n.name in wanted), None)


def _summarize(text: str) -> tuple[str | None, str]:
    """The failing ONNX node, and the decisive line of onnx2tf's output: its last exception,
    else its last error line."""
    clean = re.sub(r"\x1b\[[0-9;]*m", "", text)
    lines = [line.strip() for line in clean.splitlines() if line.strip()]
    node = next(
        (ln.split("onnx_op_name:", 1)[1].strip() for ln in lines if "onnx_op_name:" in ln), None
    )
    error = next(
        (ln for ln in reversed(lines) if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln)),
        lines[-1] if lines else "no output",
    )
    return node, error


def custom_ops(path: Path) -> list[str]:
    """Custom (non-builtin) operators in a ``.tflite`` file: LiteRT cannot run them unless the
    device registers them, which edgefleet's agent does not."""
    from ai_edge_litert import schema_py_generated as s
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    names = []
    for code in model.operatorCodes or []:
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        if builtin == s.BuiltinOperator.CUSTOM:
            raw = code.customCode
            names.append(raw.decode() if isinstance(raw, bytes) else str(raw))
    return sorted(set(names))


def rename_io(path: Path, input_names: list[str], output_names: list[str]) -> None:
    """Give the model's input/output tensors (and its signature's entries) the ONNX names, so
    requests and responses look the same whatever runtime serves them.

    Inputs are matched by signature name (onnx2tf keeps ONNX input names there). Outputs keep
    their ONNX name in fp32 models but become ``output_0``… in quantized ones; those are matched
    in order. A wrong match cannot slip through: the parity gate compares outputs by name.
    """
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    if not model.signatureDefs or len(model.signatureDefs) != 1:
        return
    signature = model.signatureDefs[0]
    graph = model.subgraphs[signature.subgraphIndex]

    def name_of(raw: object) -> str:
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    for entry in signature.inputs or []:
        if name_of(entry.name) in input_names:
            graph.tensors[entry.tensorIndex].name = name_of(entry.name)
    sig_outputs = list(signature.outputs or [])
    names = [name_of(e.name) for e in sig_outputs]
    if sorted(names) != sorted(output_names) and len(sig_outputs) == len(output_names):
        ordered = sorted(sig_outputs, key=lambda e: _output_index(name_of(e.name)))
        for entry, name in zip(ordered, output_names, strict=True):
            entry.name = name
    for entry in sig_outputs:
        graph.tensors[entry.tensorIndex].name = name_of(entry.name)
    flatbuffer_utils.write_model(model, str(path))


def _output_index(name: str) -> int:
    suffix = name.rsplit("_", 1)[-1]
    return int(suffix) if suffix.isdigit() else 0
