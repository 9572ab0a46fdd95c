"""Converter benchmark: every artifact of a ResNet-like CNN (~25 MB fp32, 224x224) and a small
MLP, side by side with the fp32 ONNX in one run: size, host latency (median, 1 thread), parity
on the validation set (max abs, rel L2, top-1 agreement), compile time and peak memory.

The CNN is trained first (bench/trained_cnn.py: a synthetic texture task, about two minutes
on two cores, cached afterwards), because top-1 agreement is only meaningful for a classifier
with confident logits. ``--random-cnn`` uses the torch-free random-trunk model instead.

Each (model, path) is compiled in its own process so its peak RSS is its own. The TFLite paths
need the toolchain (`edgefleet toolchain install tflite`); TensorRT int8 is measured on its
host proxy (the QDQ ONNX in onnxruntime): engines need a GPU.

    .venv/bin/python bench/compile_artifacts.py [--quick] [--random-cnn]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PATHS = [
    ("onnxruntime", "fp32"),
    ("onnxruntime", "int8"),
    ("litert", "fp32"),
    ("litert", "int8"),
    ("tensorrt", "int8"),
]
PROFILE = {"onnxruntime": "x86-64-avx2", "litert": "raspberry-pi-4", "tensorrt": "jetson-orin-nano"}


def make_models(
    root: Path, quick: bool, random_cnn: bool
) -> dict[str, tuple[Path, Path, Path, np.ndarray | None]]:
    from converters.onnx.samples import mlp_classifier, resnet_like, sample_images

    models: dict[str, tuple[Path, Path, Path, np.ndarray | None]] = {}
    image = 224 if not quick else 96
    count = 200 if not quick else 20
    if random_cnn:
        cnn = resnet_like(root / "cnn.onnx", image=image)
        calib, _ = sample_images(64, image=image, seed=100)
        valid, labels = sample_images(count, image=image, seed=200)
        truth = None  # the random trunk's classes are not its labels
    else:
        from trained_cnn import Recipe, texture_images, trained_cnn

        recipe = Recipe(image=image, steps=300 if not quick else 60)
        cnn = trained_cnn(root / "cnn.onnx", recipe)
        calib, _ = texture_images(64, image=image, classes=recipe.classes, seed=100)
        valid, labels = texture_images(count, image=image, classes=recipe.classes, seed=200)
        truth = labels
    np.savez(root / "cnn-cal.npz", x=calib)
    np.savez(root / "cnn-val.npz", x=valid)
    models["cnn"] = (cnn, root / "cnn-cal.npz", root / "cnn-val.npz", truth)
    mlp = mlp_classifier(root / "mlp.onnx", features=256, hidden=1024, classes=10)
    rng = np.random.default_rng(3)
    np.savez(root / "mlp-cal.npz", x=rng.standard_normal((64, 256)).astype(np.float32))
    np.savez(root / "mlp-val.npz", x=rng.standard_normal((200, 256)).astype(np.float32))
    models["mlp"] = (mlp, root / "mlp-cal.npz", root / "mlp-val.npz", None)
    return models


def one(spec: dict[str, str]) -> None:
    """Child process: compile one path and gate it; print a JSON line."""
    from converters.converter import ConversionJob, Target, load_for_gate
    from converters.data import load_dataset
    from converters.onnx import inspect_onnx
    from converters.registry import converters_for_build
    from converters.validate import Thresholds, compare, run_dataset
    from firmware_profiles import default_catalog

    source = Path(spec["source"])
    info = inspect_onnx(source)
    calib = load_dataset(Path(spec["calibration"]), info.inputs, what="calibration")
    valid = load_dataset(Path(spec["validation"]), info.inputs, what="validation")
    profile = default_catalog().get(PROFILE[spec["runtime"]])
    work = Path(spec["work"])
    target = Target(spec["runtime"], spec["precision"], "")
    start = time.perf_counter()
    job = ConversionJob(source, work, profile, info.inputs, info.outputs, calib, lambda _: None)
    artifact = converters_for_build()[target.runtime].produce(target, job)
    compile_s = time.perf_counter() - start
    ref_model = load_for_gate("onnxruntime", source)
    reference = run_dataset(ref_model, valid)
    ref_model.close()
    model = load_for_gate(artifact.gate_runtime, artifact.path)
    got = run_dataset(model, valid)
    model.close()
    report = compare(
        reference, got, thresholds=Thresholds(), artifact=artifact.path,
        source_size=source.stat().st_size, samples=valid.samples, origin=valid.origin,
        evaluated_in=artifact.evaluated_in,
    )  # fmt: skip
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({**report, "compile_s": compile_s, "peak_rss_mb": max(own, kids) / 1024}))


def accuracy(source: Path, validation: Path, labels: np.ndarray) -> float:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    with np.load(validation) as npz:
        x = npz["x"]
    batches = [session.run(None, {"x": x[i : i + 32]})[0] for i in range(0, len(x), 32)]
    logits = np.concatenate(batches)
    return float((logits.argmax(axis=1) == labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="96x96 CNN, fewer samples")
    parser.add_argument(
        "--random-cnn", action="store_true", help="the random-trunk CNN (no torch, no training)"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(json.loads(args.one))
        return
    from converters.toolchains import locate
    from edge_agent.contracts.errors import ConversionError

    try:
        locate("tflite")
        have_tflite = True
    except ConversionError as e:
        print(f"note: {e.message}; TFLite paths skipped")
        have_tflite = False
    root = Path(tempfile.mkdtemp(prefix="edgefleet-bench-"))
    rows = []
    for name, (source, cal, val, truth) in make_models(root, args.quick, args.random_cnn).items():
        if truth is not None:
            acc = accuracy(source, val, truth)
            print(f"{name}: fp32 accuracy on the validation labels {acc:.3f}")
        for runtime, precision in PATHS:
            if runtime == "litert" and not have_tflite:
                continue
            spec = {
                "source": str(source), "calibration": str(cal), "validation": str(val),
                "runtime": runtime, "precision": precision,
                "work": str(root / f"{name}-{runtime}-{precision}"),
            }  # fmt: skip
            proc = subprocess.run(
                [sys.executable, __file__, "--one", json.dumps(spec)],
                capture_output=True, text=True,
            )  # fmt: skip
            if proc.returncode != 0:
                print(f"{name} {runtime}/{precision}: FAILED\n{proc.stderr[-2000:]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append((name, runtime, precision, r, source.stat().st_size))
    header = (
        f"{'model':5} {'artifact':18} {'size MB':>8} {'of fp32':>7} {'host ms':>8} {'speedup':>7} "
        f"{'max abs':>8} {'rel L2':>8} {'top-1':>6} {'compile s':>9} {'peak MB':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, runtime, precision, r, src in rows:
        top1 = f"{r['top1_agreement']:.3f}" if r["top1_agreement"] is not None else "-"
        print(
            f"{name:5} {runtime + '/' + precision:18} {r['size_bytes'] / 1e6:8.2f} "
            f"{r['size_bytes'] / src:7.0%} {r['latency_ms_median']:8.3f} {r['speedup']:7.2f} "
            f"{r['max_abs_error']:8.3g} {r['rel_l2_error']:8.3g} {top1:>6} "
            f"{r['compile_s']:9.1f} {r['peak_rss_mb']:8.0f}"
        )
    cnn = {(rt, p): r for n, rt, p, r, _ in rows if n == "cnn"}
    parts = []
    if ("onnxruntime", "int8") in cnn:
        r = cnn[("onnxruntime", "int8")]
        parts.append(f"CNN x86 int8 {r['speedup']:.2f}x vs fp32, top-1 {r['top1_agreement']:.3f}")
    if ("litert", "int8") in cnn:
        r = cnn[("litert", "int8")]
        parts.append(
            f"TFLite int8 {r['size_ratio']:.0%} of fp32 size, top-1 {r['top1_agreement']:.3f}"
        )
    print("summary: " + "; ".join(parts))


if __name__ == "__main__":
    main()
