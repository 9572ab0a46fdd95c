"""Agent telemetry cost: the serving path with telemetry off and on, side by side in one run.

Two models, run in onnxruntime through the agent's in-process serving path (``predict``):

- mlp: a ~1 ms MLP, x[1, 512] (hidden 12288), class scores out;
- cnn: a ResNet-like 224x224 CNN, x[1, 3, 224, 224], 100 classes.

For each, one loaded model serves, tracked as a telemetry reporter tracks it (latency sketch
on every request, drift counts of inputs and outputs against a baseline built as a bundle
build builds it, sampled to the 2 % budget), and telemetry is switched off and on (its
``enabled`` flag: off, ``record`` returns at once) in alternate blocks of calls. One session
for both: two sessions of the same file differ by a few percent on their own (where each
one's memory landed), more than the difference measured. Reported per model and run: median
per-call time off and on, their difference as a share of the median, the time the telemetry
itself measured as a share of inference time (what the budget bounds), and the drift sampling
rate it settled on; then, over ``--runs`` runs, the median difference.

Run: .venv/bin/python bench/telemetry_cost.py [--calls 2000] [--runs 5] [--budget 0.02]
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
    plain = _serving(path, None, tracked=False, budget=budget)
    probe = plain.acquire("m")
    outputs = [probe.model.run({"x": r}) for r in reference_inputs[:16]]
    probe._release()
    plain.close()
    out_name = next(iter(outputs[0]))
    stacked_out = np.stack([o[out_name] for o in outputs])
    baseline = Baseline(
        {"x": TensorDrift.build(reference_inputs, top1=False)},
        {out_name: TensorDrift.build(stacked_out, top1=True)},
    )
    table = _serving(path, baseline, tracked=True, budget=budget)
    serving = table.acquire("m")
    serving._release()
    t = serving.telemetry
    times: dict[str, list[float]] = {"off": [], "on": []}
    feeds = [{"x": (x + rng.standard_normal(x.shape).astype(np.float32))} for _ in range(8)]
    done = 0
    while done < calls:
        for label in ("off", "on"):
            t.enabled = label == "on"
            for i in range(BLOCK):
                start = time.perf_counter()
                predict(table, "m", feeds[i % len(feeds)])
                elapsed = time.perf_counter() - start
                if i >= BLOCK_WARMUP:
                    times[label].append(elapsed * 1000)
        done += BLOCK - BLOCK_WARMUP
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
    table.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--cnn-calls", type=int, default=300)
    parser.add_argument("--budget", type=float, default=0.02)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"mlp": [], "cnn": []}
    with tempfile.TemporaryDirectory() as tmp:
        mlp = mlp_classifier(Path(tmp) / "mlp.onnx", features=512, hidden=12288, classes=10)
        cnn = resnet_like(Path(tmp) / "cnn.onnx")
        for _ in range(args.runs):  # the models take turns, run by run
            runs["mlp"].append(
                measure("mlp", mlp, np.zeros((1, 512), np.float32), args.calls, args.budget)
            )
            cnn_x = np.zeros((1, 3, 224, 224), np.float32)
            runs["cnn"].append(measure("cnn", cnn, cnn_x, args.cnn_calls, args.budget))
    summary = {
        k: {
            "wall": statistics.median(r["wall_overhead"] for r in rs),
            "share": statistics.median(r["measured_share"] for r in rs),
            "off_ms": statistics.median(r["off_ms"] for r in rs),
        }
        for k, rs in runs.items()
    }
    worst = max(max(v["wall"], v["share"]) for v in summary.values())
    print(
        f"SUMMARY telemetry cost, median of {args.runs} runs (wall on-off / telemetry's own "
        "measured time, as shares of inference): "
        + ", ".join(
            f"{k} wall {v['wall']:+.2%}, own {v['share']:.2%} ({v['off_ms']:.2f} ms)"
            for k, v in summary.items()
        )
        + f"; budget {args.budget:.0%}: {'within' if worst <= args.budget else 'OVER'}"
    )


if __name__ == "__main__":
    main()
