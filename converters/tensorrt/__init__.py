"""Jetson (TensorRT) artifacts: a TensorRT-ready ONNX model and the recipe to build its engine.

int8 is explicit quantization: QDQ nodes with symmetric int8 scales (zero point 0) for weights
(per channel) and activations, calibrated on the user's data here, so the engine builder needs
no calibrator. fp16 and fp32 ship the graph-optimised fp32 ONNX with the matching builder flag.
The engine itself is built where the GPU is (the device, or a build worker of the same SM and
TensorRT version) by ``edge_agent.runtimes.tensorrt.build_engine`` from the recipe.

Without a GPU the artifact cannot run here; the parity gate runs the same ONNX in onnxruntime
on the CPU as a host proxy (for int8 that is the exact QDQ arithmetic TensorRT is asked to
honour), and the device checks the real engine against the bundle's self-test vectors before
it serves.
"""

from __future__ import annotations

from pathlib import Path

from converters.data import Dataset
from converters.onnx.quantize import optimize_fp32, quantize_int8
from edge_agent.bundle.manifest import TensorSpec
from edge_agent.contracts.errors import ConversionError
from edge_agent.runtimes.tensorrt import RECIPE_NAME, Recipe
from firmware_profiles import Profile

#: Largest batch an engine's optimisation profile admits when the model's batch is dynamic.
MAX_BATCH = 8


def recipe_for(profile: Profile, precision: str, inputs: list[TensorSpec]) -> Recipe:
    flags = {"int8": ["FP16", "INT8"], "fp16": ["FP16"], "fp32": []}[precision]
    shapes: dict[str, dict[str, list[int]]] = {}
    for spec in inputs:
        if all(isinstance(d, int) and d > 0 for d in spec.shape):
            continue
        dims = [d if isinstance(d, int) and d > 0 else None for d in spec.shape]
        if any(d is None for d in dims[1:]):
            raise ConversionError(
                f"input {spec.name!r} has dynamic dimensions besides the batch ({spec.shape}); "
                "TensorRT engines here need fixed sizes: export the model with static shapes",
                reason="unsupported_model",
            )
        rest = [int(d) for d in dims[1:] if d is not None]
        shapes[spec.name] = {
            "min": [1, *rest],
            "opt": [1, *rest],
            "max": [MAX_BATCH, *rest],
        }
    workspace = max(256, min(2048, profile.resources.memory_budget_mb // 4))
    # DLA is opt-in (a build override): it runs only part of the layer set and falls back to
    # the GPU for the rest, which is usually slower on small models.
    return Recipe(
        precision=precision,
        flags=flags,
        workspace_mb=workspace,
        dla_core=-1,
        shapes=shapes,
    )


def build_artifact(
    source: Path,
    work: Path,
    profile: Profile,
    precision: str,
    inputs: list[TensorSpec],
    calibration: Dataset | None,
    *,
    batch: int,
    fp32_inputs: frozenset[str] = frozenset(),
) -> tuple[Path, Path]:
    """(model.onnx, trt_recipe.json) in ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / "model.onnx"
    if precision == "int8":
        if calibration is None:
            raise ConversionError(
                "int8 needs a calibration set (upload one with the model version)",
                reason="no_calibration",
            )
        quantize_int8(source, out, calibration, flavour="tensorrt", fp32_inputs=fp32_inputs)
    else:
        optimize_fp32(source, out)
    recipe = work / RECIPE_NAME
    recipe.write_text(recipe_for(profile, precision, inputs).to_json())
    return out, recipe
