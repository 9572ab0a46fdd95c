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

from converters.data import MAX_CALIBRATION_SAMPLES, Dataset
from converters.toolchains import Toolchain
from edge_agent.bundle.manifest import TensorSpec
from edge_agent.contracts.errors import ConversionError

#: The file onnx2tf otherwise downloads (it only needs to exist and be loadable).
_SAMPLE_NAME = "calibration_image_sample_data_20x128x128x3_float32.npy"


@dataclass(frozen=True)
class TfliteOutputs:
    fp32: Path
    int8: Path | None


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
    if calibration is not None:
        cmd += ["-oiqt", "-qt", "per-channel"]
        data = calibration.take(slice(0, MAX_CALIBRATION_SAMPLES))
        for spec in inputs:
            path = work / f"calibration-{len(cmd)}.npy"
            array = data.arrays[spec.name]
            # onnx2tf wants the samples with the model's batch axis (one sample per row).
            np.save(path, array.reshape((array.shape[0], *array.shape[1:])))
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
        raise ConversionError(
            f"onnx2tf failed with exit code {proc.returncode}: {_summarize(text)} "
            "(the full output is in the build log)",
            reason="converter_failed",
            exit_code=proc.returncode,
        )
    fp32 = out_dir / "model_float32.tflite"
    int8 = out_dir / "model_integer_quant.tflite"
    if not fp32.is_file():
        tail = "\n".join(text.strip().splitlines()[-20:])
        raise ConversionError(
            f"onnx2tf exited 0 but wrote no {fp32.name}:\n{tail}", reason="converter_failed"
        )
    if calibration is not None and not int8.is_file():
        tail = "\n".join(text.strip().splitlines()[-20:])
        raise ConversionError(
            f"onnx2tf exited 0 but wrote no int8 model ({int8.name}); the calibration data "
            f"may not fit the model:\n{tail}",
            reason="converter_failed",
        )
    for path in [fp32, int8] if calibration is not None else [fp32]:
        rename_io(path, [s.name for s in inputs], [s.name for s in outputs])
    return TfliteOutputs(fp32=fp32, int8=int8 if calibration is not None else None)


def _summarize(text: str) -> str:
    """The failing ONNX node and the final exception line of onnx2tf's output."""
    clean = re.sub(r"\x1b\[[0-9;]*m", "", text)
    lines = [line.strip() for line in clean.splitlines() if line.strip()]
    node = next(
        (ln.split("onnx_op_name:", 1)[1].strip() for ln in lines if "onnx_op_name:" in ln), None
    )
    error = next(
        (ln for ln in reversed(lines) if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln)),
        lines[-1] if lines else "no output",
    )
    return (f"at ONNX node {node}: " if node else "") + error


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
