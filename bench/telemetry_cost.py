"""Agent telemetry cost: the serving path with telemetry off and on, side by side in one run.

Two models, run in onnxruntime through the agent's in-process serving path (``predict``):

- mlp: a ~1 ms MLP, x[1, 512] (hidden 12288), class scores out;
- cnn: a ResNet-like 224x224 CNN, x[1, 3, 224, 224], 100 classes.

For each, two slot tables serve the same loaded model file: one whose model is not tracked by a
telemetry reporter (telemetry off: nothing is recorded), one whose model is (latency sketch on
every request, drift counts of inputs and outputs against a baseline built as a bundle build
builds it, sampled to the 2 % budget). The two take turns in blocks of calls. Reported per
model: median per-call time off and on, their difference as a share of the median (noisy: the
machine's own jitter is of the same order), the time the telemetry itself measured as a share
of inference time (what the budget bounds), and the drift sampling rate it settled on.

Run: .venv/bin/python bench/telemetry_cost.py [--calls 2000] [--budget 0.02]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converters.onnx.samples import mlp_classifier, resnet_like
from edge_agent.bundle.manifest import Manifest
from edge_agent.protocol.status import VersionRef
from edge_agent.runtimes import LoadOptions, get_runtime
from edge_agent.serving import ServingModel, SlotTable, predict
from edge_agent.telemetry.drift import Baseline, TensorDrift

BLOCK, BLOCK_WARMUP = 20, 3


def _serving(path: Path, baseline: Baseline | None, *, tracked: bool, budget: float) -> SlotTable:
    model = get_runtime("onnxruntime").load(path, LoadOptions(threads=1))
    ref = VersionRef(
        model="m", version="1", bundle_sha256="0" * 64, runtime="onnxruntime", precision="fp32"
    )
    # A manifest with no output specs: no feedback class output (this compares telemetry only).
    serving = ServingModel(ref, Manifest.model_construct(inputs=[], outputs=[]), model, baseline)
    if tracked:  # what TelemetryReporter.track does
        serving.telemetry.enabled = True
        serving.telemetry.budget = budget
    table = SlotTable()
    table.swap("m", serving)
    return table


def measure(name: str, path: Path, x: np.ndarray, calls: int, budget: float) -> dict[str, float]:
    rng = np.random.default_rng(0)
    reference_inputs = rng.standard_normal((64, *x.shape)).astype(np.float32)
    off = _serving(path, None, tracked=False, budget=budget)
    probe = off.acquire("m")
    outputs = [probe.model.run({"x": r}) for r in reference_inputs[:16]]
    probe._release()
    out_name = next(iter(outputs[0]))
    stacked_out = np.stack([o[out_name] for o in outputs])
    baseline = Baseline(
        {"x": TensorDrift.build(reference_inputs, top1=False)},
        {out_name: TensorDrift.build(stacked_out, top1=True)},
    )
    on = _serving(path, baseline, tracked=True, budget=budget)
    times: dict[str, list[float]] = {"off": [], "on": []}
    feeds = [{"x": (x + rng.standard_normal(x.shape).astype(np.float32))} for _ in range(8)]
    done = 0
    while done < calls:
        for label, table in (("off", off), ("on", on)):
            for i in range(BLOCK):
                start = time.perf_counter()
                predict(table, "m", feeds[i % len(feeds)])
                elapsed = time.perf_counter() - start
                if i >= BLOCK_WARMUP:
                    times[label].append(elapsed * 1000)
        done += BLOCK - BLOCK_WARMUP
    serving = on.acquire("m")
    serving._release()
    t = serving.telemetry
    share = t.spent_s / t.inference_s if t.inference_s else float("nan")
    off_ms, on_ms = statistics.median(times["off"]), statistics.median(times["on"])
    figures = {
        "off_ms": off_ms,
        "on_ms": on_ms,
        "wall_overhead": (on_ms - off_ms) / off_ms,
        "measured_share": share,
        "sample_rate": t.sample_rate,
    }
    print(
        f"{name}: median {off_ms:.3f} ms off, {on_ms:.3f} ms on "
        f"({figures['wall_overhead']:+.2%} wall); telemetry's own time {share:.2%} of "
        f"inference; drift sample rate {t.sample_rate:.3f}"
    )
    off.close()
    on.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--cnn-calls", type=int, default=300)
    parser.add_argument("--budget", type=float, default=0.02)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mlp = mlp_classifier(Path(tmp) / "mlp.onnx", features=512, hidden=12288, classes=10)
        cnn = resnet_like(Path(tmp) / "cnn.onnx")
        results = {
            "mlp": measure("mlp", mlp, np.zeros((1, 512), np.float32), args.calls, args.budget),
            "cnn": measure(
                "cnn", cnn, np.zeros((1, 3, 224, 224), np.float32), args.cnn_calls, args.budget
            ),
        }
    worst = max(r["measured_share"] for r in results.values())
    print(
        "SUMMARY telemetry cost (own measured time / inference time): "
        + ", ".join(
            f"{k} {r['measured_share']:.2%} (wall {r['wall_overhead']:+.1%}, {r['off_ms']:.2f} ms)"
            for k, r in results.items()
        )
        + f"; budget {args.budget:.0%}: {'within' if worst <= args.budget else 'OVER'}"
    )


if __name__ == "__main__":
    main()
