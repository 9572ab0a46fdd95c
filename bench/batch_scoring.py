"""Batch scoring throughput: ``edge-agent score``'s path against the raw runtime on the same
files, side by side in one run.

The agent's serving half (the slot table behind its real Unix socket, onnxruntime) runs in a
process of its own, as the daemon does; the scorer (``edge_agent.scoring.Scorer``, what
``edge-agent score`` runs) reads the files in its worker processes (``--workers``; by default
``edge-agent score``'s), sends them in batches over the socket and writes the results. The
baseline, in this process: read the same files (with the scorer's own reader, ``load_file``:
the ratio is the agent path's cost, not a faster reader's gain), stack the same batches, run
an ``InferenceSession`` with the agent's settings (``threads`` of the runtime config), keep
the outputs. Rounds alternate scorer and raw; medians are reported, and the ratio
(scorer rows/s over raw rows/s; target >= 0.95).

Two models: the MLP classifier (16 features; ~20 µs a batch of 64: per-request costs show)
and the ResNet-like CNN at 96x96 (milliseconds a batch: the runtime dominates).

Both paths use the agent's session settings: workers that sleep between runs, or with
``--spin`` workers that spin (``[runtime] spin = true``, for a device that scores back to
back).

Run: .venv/bin/python bench/batch_scoring.py [--files 2000] [--rounds 3] [--spin]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SERVE = r"""
import sys
from pathlib import Path
from edge_agent.bundle import TensorSpec
from edge_agent.runtimes import LoadOptions
from edge_agent.serving import SlotTable, start_unix
from tests.factories import onnx_serving

model_path, sock, in_shape, out_shape, in_name, out_name, spin = sys.argv[1:8]
shape = lambda s: ["batch", *map(int, s.split(","))]
table = SlotTable()
table.swap("m", onnx_serving(
    Path(model_path), "1.0.0", name="m",
    inputs=[TensorSpec(name=in_name, dtype="float32", shape=shape(in_shape))],
    outputs=[TensorSpec(name=out_name, dtype="float32", shape=shape(out_shape))],
    options=LoadOptions(spin=spin == "spin"),
))
start_unix(table, Path(sock))
print("ready", flush=True)
sys.stdin.read()
"""


def raw_run(
    model: Path, files: list[Path], input_name: str, batch: int, spin: bool
) -> tuple[float, int]:
    import onnxruntime as ort

    from edge_agent.runtimes import LoadOptions
    from edge_agent.runtimes.onnxruntime import OnnxRuntime
    from edge_agent.scoring import load_file

    # The agent's own session options (threads, graph optimisation), so like runs with like.
    session: ort.InferenceSession = OnnxRuntime().load(model, LoadOptions(spin=spin))._session  # type: ignore[attr-defined]
    start = time.perf_counter()
    rows, kept = 0, []
    group: list[np.ndarray] = []
    for path in files:
        x = load_file(path, [input_name])[input_name]  # the scorer's own reader
        group.append(x[np.newaxis])
        if len(group) == batch:
            kept.append(session.run(None, {input_name: np.concatenate(group)})[0])
            rows += len(group)
            group = []
    if group:
        kept.append(session.run(None, {input_name: np.concatenate(group)})[0])
        rows += len(group)
    out = np.concatenate(kept)
    np.savez(Path(tempfile.gettempdir()) / "raw-scores.npz", scores=out)
    return time.perf_counter() - start, rows


def scorer_run(
    sock: Path, files: list[Path], out: Path, batch: int, workers: int | None = None
) -> tuple[float, int]:
    from edge_agent.scoring import Scorer
    from edge_agent.serving.client import AgentClient

    out.unlink(missing_ok=True)
    start = time.perf_counter()
    client = AgentClient(f"unix://{sock}")
    result = Scorer(client, "m", out, batch_size=batch, workers=workers).run(files)
    elapsed = time.perf_counter() - start
    assert not result.failures, result.failures[:3]
    return elapsed, result.rows


def bench_model(
    name: str, model: Path, samples: np.ndarray, names: tuple[str, str], out_shape: str,
    files: int, rounds: int, batch: int, work: Path, spin: bool, workers: int | None,
) -> dict[str, float]:  # fmt: skip
    inputs = work / f"{name}-in"
    inputs.mkdir()
    paths = []
    for i in range(files):
        path = inputs / f"{i:06d}.npy"
        np.save(path, samples[i % len(samples)])
        paths.append(path.resolve())
    sock = work / f"{name}.sock"
    in_shape = ",".join(map(str, samples.shape[1:]))
    server = subprocess.Popen(
        [sys.executable, "-c", SERVE, str(model), str(sock), in_shape, out_shape, *names,
         "spin" if spin else "sleep"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    try:
        scorer_run(sock, paths[: batch * 4], work / "warm.npz", batch)  # warm both paths
        raw_run(model, paths[: batch * 4], names[0], batch, spin)
        agent_s, raw_s = [], []
        for _ in range(rounds):
            s, rows = scorer_run(sock, paths, work / f"{name}.npz", batch, workers)
            agent_s.append(s)
            r, raw_rows = raw_run(model, paths, names[0], batch, spin)
            raw_s.append(r)
            assert rows == raw_rows == files
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.terminate()
        server.wait(10)
    got = np.load(work / f"{name}.npz")["output/" + names[1]]
    want = np.load(Path(tempfile.gettempdir()) / "raw-scores.npz")["scores"]
    np.testing.assert_allclose(got, want, atol=1e-4)  # the same answers, file by file
    a, r = statistics.median(agent_s), statistics.median(raw_s)
    figures = {
        "files": files,
        "batch": batch,
        "scorer_rows_per_s": round(files / a, 1),
        "raw_rows_per_s": round(files / r, 1),
        "ratio": round(r / a, 3),
    }
    runs = [round(x, 2) for x in agent_s], [round(x, 2) for x in raw_s]
    print(
        f"{name:>4}: scorer {files / a:9,.0f} rows/s ({a:.2f} s, runs {runs[0]}) | "
        f"raw {files / r:9,.0f} rows/s ({r:.2f} s, runs {runs[1]}) | ratio {r / a:.3f}"
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--cnn-files", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="the scorer's reading processes (default: edge-agent score's, 2 where the CPUs allow)",
    )
    parser.add_argument(
        "--spin",
        action="store_true",
        help="the runtime's workers spin between runs in both paths ([runtime] spin = true)",
    )
    args = parser.parse_args()

    from converters.onnx.samples import mlp_classifier, resnet_like, sample_images

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        mlp = mlp_classifier(work / "mlp.onnx", seed=3)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((256, 16)).astype(np.float32)
        results = {
            "mlp": bench_model(
                "mlp",
                mlp,
                x,
                ("x", "probs"),
                "4",
                args.files,
                args.rounds,
                args.batch,
                work,
                args.spin,
                args.workers,
            )
        }
        cnn = resnet_like(work / "cnn.onnx", widths=(16, 32, 64, 128), image=96, classes=10)
        images, _ = sample_images(64, image=96, classes=10)
        results["cnn"] = bench_model(
            "cnn",
            cnn,
            images,
            ("x", "logits"),
            "10",
            args.cnn_files,
            args.rounds,
            16,
            work,
            args.spin,
            args.workers,
        )
    from edge_agent.scoring import default_workers

    workers = args.workers or default_workers()
    print(
        f"summary ({'spinning' if args.spin else 'sleeping'} runtime workers, {workers} "
        f"reading processes): batch scoring "
        f"through the agent runs at {results['mlp']['ratio']:.2f}x the "
        f"raw runtime on the MLP and {results['cnn']['ratio']:.2f}x on the CNN (target >= 0.95)"
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
