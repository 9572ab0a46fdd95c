"""The runtime's worker threads at a device's pace: the agent's session settings against
onnxruntime's own, side by side in one run.

- agent:    the profile's threads capped at the CPUs this process may use, workers that
            sleep between runs (``LoadOptions(threads=runtime_threads(0, N))``, the default)
- spinning: the same threads, workers that spin between runs (onnxruntime's default,
            ``[runtime] spin = true``)
- profile:  the profile's thread count as it is, spinning (what the agent did before)

Each is called at 25 and 100 requests/s (a camera, a sensor) and back to back (batch
scoring); printed: median and p99 latency of the call, and the process's CPU per call (what
the device's other work and its temperature pay). Within each pace the three take turns in
five rounds, each going first in some.

Run: .venv/bin/python bench/runtime_threads.py [--model cnn|mlp] [--profile-threads 6] [--calls 300]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _measure(
    model: object, feeds: dict[str, np.ndarray], calls: int, rate: float | None
) -> tuple[list[float], float]:
    """(latencies, CPU seconds) of ``calls`` calls at ``rate`` a second (None: back to back)."""
    run = model.run  # type: ignore[attr-defined]
    for _ in range(10):
        run(feeds)
    gap = 1.0 / rate if rate else 0.0
    latencies = []
    cpu = time.process_time()
    next_at = time.perf_counter()
    for _ in range(calls):
        if gap:
            next_at += gap
            pause = next_at - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
        start = time.perf_counter()
        run(feeds)
        latencies.append(time.perf_counter() - start)
    return latencies, time.process_time() - cpu


def _figures(latencies: list[float], cpu_s: float) -> dict[str, float]:
    latencies = sorted(latencies)
    return {
        "p50_ms": round(statistics.median(latencies) * 1e3, 3),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1e3, 3),
        "cpu_ms_per_call": round(cpu_s / len(latencies) * 1e3, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["cnn", "mlp"], default="cnn")
    parser.add_argument("--profile-threads", type=int, default=6, help="a Jetson Orin's 6")
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()

    from converters.onnx.samples import mlp_classifier, resnet_like
    from edge_agent.runtimes import LoadOptions, get_runtime, runtime_threads, usable_cpus

    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "cnn":
            path = resnet_like(Path(tmp) / "m.onnx", widths=(8, 16), image=28, classes=10)
            feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 28, 28), np.float32)}
        else:
            path = mlp_classifier(Path(tmp) / "m.onnx")
            feeds = {"x": np.random.default_rng(0).standard_normal((1, 16), np.float32)}
        capped = runtime_threads(0, args.profile_threads)
        settings = {
            "agent": LoadOptions(threads=capped),
            "spinning": LoadOptions(threads=capped, spin=True),
            "profile": LoadOptions(threads=args.profile_threads, spin=True),
        }
        runtime = get_runtime("onnxruntime")
        models = {name: runtime.load(path, options) for name, options in settings.items()}
        print(
            f"{args.model}: {usable_cpus()} usable CPUs, profile threads "
            f"{args.profile_threads}, agent threads {capped}"
        )
        results: dict[str, dict[str, dict[str, float]]] = {}
        rounds = 5
        for pace, rate in (("25/s", 25.0), ("100/s", 100.0), ("back to back", None)):
            calls = args.calls * (10 if rate is None else 1) // rounds
            kept: dict[str, tuple[list[float], float]] = {name: ([], 0.0) for name in models}
            names = list(models)
            for r in range(rounds):  # in turns, each first once in a while
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    latencies, cpu = _measure(models[name], feeds, calls, rate)
                    kept[name] = (kept[name][0] + latencies, kept[name][1] + cpu)
            for name, (latencies, cpu) in kept.items():
                figures = results.setdefault(pace, {})[name] = _figures(latencies, cpu)
                p50, p99, per = figures["p50_ms"], figures["p99_ms"], figures["cpu_ms_per_call"]
                print(
                    f"{pace:>12}  {name:8s}  p50 {p50:7.3f} ms  p99 {p99:7.3f} ms  "
                    f"CPU {per:7.3f} ms a call"
                )
    agent, before = results["25/s"]["agent"], results["25/s"]["profile"]
    ratio = before["cpu_ms_per_call"] / max(agent["cpu_ms_per_call"], 1e-6)
    print(
        f"summary: at 25 requests/s the agent's sessions use {agent['cpu_ms_per_call']:.2f} ms "
        f"of CPU a call against {before['cpu_ms_per_call']:.2f} spinning with the profile's "
        f"threads ({ratio:.0f}x); p50 {agent['p50_ms']:.3f} against {before['p50_ms']:.3f} ms, "
        f"p99 {agent['p99_ms']:.3f} against {before['p99_ms']:.3f} ms"
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
