"""What ground-truth feedback costs a prediction, side by side in one run.

One ~1 ms classifier (onnxruntime, one thread) is served by two slot tables that differ only
in whether feedback is on (a request id for every answer, the top-1 answer kept for a label).
Both are called through the agent's in-process serving path, taking turns in blocks of calls
so that neither gets the quieter part of the run. Reported:

- raw:           InferenceSession.run alone
- feedback off:  the serving path without request ids
- feedback on:   the serving path with request ids and kept answers
- paired:        on and off called back to back, the median of the differences (less noise
                 than the difference of two medians)
- the feedback work alone (``FeedbackStore.answered``: the id, the answer kept, its top-1
  class found later with many others), timed over many calls: the precise per-call cost,
  as a share of the model's inference time (the target is 1 %)
- the memory bound: bytes per kept prediction (one row: its class), and the store at its
  default capacity.

The model is sized on the machine that runs it to take about ``--target-ms`` (1 ms): a fixed
size took 0.85 ms on one day and 0.29 ms on another, and the share depends on it. An A/A pair
(two tables with feedback off) is timed the same way, paired: the harness's own bias.

Run: .venv/bin/python bench/feedback_cost.py [--calls 3000] [--target-ms 1.0] [--hidden N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnxruntime as ort

from bench import timing
from converters.onnx.samples import mlp_classifier
from edge_agent.bundle import (
    TensorSpec,
)
from edge_agent.protocol.status import VersionRef
from edge_agent.runtimes.fake import FakeModel
from edge_agent.serving import FeedbackStore, ServingModel, SlotTable, predict
from tests.factories import served_manifest

BLOCK, BLOCK_WARMUP = 50, 10
FEATURES, CLASSES = 512, 10


def serving(session: ort.InferenceSession, hidden: int) -> ServingModel:
    spec_in = [TensorSpec(name="x", dtype="float32", shape=["batch", FEATURES])]
    spec_out = [TensorSpec(name="probs", dtype="float32", shape=["batch", CLASSES])]
    model = FakeModel(spec_in, spec_out, lambda f: {"probs": session.run(None, f)[0]})
    ref = VersionRef(model="clf", version="1.0.0", bundle_sha256="0" * 64,
                     runtime="onnxruntime", precision="fp32")  # fmt: skip
    manifest = served_manifest("clf", "1.0.0", spec_in, spec_out, {"hidden": str(hidden)})
    return ServingModel(ref, manifest, model)


def _session(work: Path, hidden: int) -> ort.InferenceSession:
    path = mlp_classifier(work / f"clf-{hidden}.onnx", features=FEATURES, hidden=hidden,
                          classes=CLASSES, seed=1)  # fmt: skip
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _time(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> float:
    t0 = time.perf_counter()
    session.run(None, feeds)
    return time.perf_counter() - t0


def _paired(a: SlotTable, b: SlotTable, feeds: dict[str, np.ndarray], calls: int) -> float:
    """``a`` and ``b`` called back to back (in alternating order): the median of the
    differences, µs (less noise than the difference of two medians)."""
    differences = []
    for i in range(calls):
        pair = []
        for table in (a, b) if i % 2 else (b, a):
            t0 = time.perf_counter()
            predict(table, "clf", feeds)
            pair.append((table is a, time.perf_counter() - t0))
        timed = dict(pair)
        differences.append((timed[True] - timed[False]) * 1e6)
    return statistics.median(differences)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--target-ms", type=float, default=1.0, help="the model's size, in time")
    parser.add_argument("--hidden", type=int, default=None, help="a fixed size instead")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="feedback-bench-"))
    x = np.random.default_rng(0).standard_normal((1, FEATURES)).astype(np.float32)
    hidden = args.hidden or 4096
    session = _session(work, hidden)
    # Its time grows with its hidden width, not quite in proportion: scale until it is close.
    for _ in range(4 if args.hidden is None else 0):
        took = statistics.median(_time(session, {"x": x}) for _ in range(200))
        if abs(took * 1000 / args.target_ms - 1) < 0.1:
            break
        hidden = max(256, round(hidden * args.target_ms / 1000 / took))
        session = _session(work, hidden)
    args.hidden = hidden

    off, on, off_too = SlotTable(), SlotTable(), SlotTable()
    on.feedback = FeedbackStore()
    for table in (off, on, off_too):
        table.swap("clf", serving(session, args.hidden))
    feeds = {"x": x}
    seconds = timing.interleaved(
        {
            "raw": lambda: session.run(None, feeds),
            "feedback on": lambda: predict(on, "clf", feeds),
            "feedback off": lambda: predict(off, "clf", feeds),
        },
        args.calls,
        block=BLOCK,
        warmup=BLOCK_WARMUP,
    )
    samples = {name: [t * 1e6 for t in got] for name, got in seconds.items()}
    medians = {name: statistics.median(got) for name, got in samples.items()}
    paired_us = _paired(on, off, feeds, args.calls)
    control_us = _paired(off_too, off, feeds, args.calls)
    print(f"{'path':<14} {'median µs':>10} {'p99 µs':>10}")
    for name, got in samples.items():
        got.sort()
        print(f"{name:<14} {medians[name]:>10.1f} {got[int(0.99 * len(got)) - 1]:>10.1f}")

    # The feedback work alone, many times: its cost is below the noise of a 1 ms call.
    store = FeedbackStore()
    model = on.snapshot()["clf"]
    outputs = {"probs": session.run(None, feeds)[0]}
    n = 200_000
    t0 = time.perf_counter()
    for _ in range(n):  # what predict() does with feedback on
        store.answered(model.answer_key, model.classes, outputs)
    work_us = (time.perf_counter() - t0) / n * 1e6
    share = work_us / medians["raw"]

    # Memory: kept predictions of one row each.
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    sized = FeedbackStore(capacity=20_000)  # its place for each, counted too
    assert model.answer_key is not None
    for i in range(20_000):
        sized.keep(sized.new_id(), model.answer_key, i % CLASSES)
    per_entry = (tracemalloc.get_traced_memory()[0] - before) / 20_000
    tracemalloc.stop()
    capacity = FeedbackStore().capacity

    diff_us = medians["feedback on"] - medians["feedback off"]
    print(f"\nfeedback work alone: {work_us:.2f} µs a call = {share:.2%} of the model's "
          f"{medians['raw']:.0f} µs inference (target ≤ 1 %)")  # fmt: skip
    print(f"model: hidden {args.hidden}, {medians['raw']:.0f} µs a call")
    print(f"serving path, on - off medians: {diff_us:+.1f} µs ({diff_us / medians['raw']:+.2%}); "
          f"paired calls: {paired_us:+.1f} µs ({paired_us / medians['raw']:+.2%}); "
          f"A/A control, paired: {control_us:+.1f} µs")  # fmt: skip
    print(f"memory: {per_entry:.0f} bytes per kept prediction; the default capacity "
          f"({capacity:,}) holds at most {per_entry * capacity / 2**20:.1f} MiB")  # fmt: skip
    summary = {
        "raw_us": round(medians["raw"], 1),
        "off_us": round(medians["feedback off"], 1),
        "on_us": round(medians["feedback on"], 1),
        "paired_diff_us": round(paired_us, 1),
        "paired_share": round(paired_us / medians["raw"], 5),
        "control_diff_us": round(control_us, 1),
        "hidden": args.hidden,
        "feedback_work_us": round(work_us, 2),
        "share_of_inference": round(share, 5),
        "bytes_per_kept": round(per_entry),
        "max_store_mib": round(per_entry * capacity / 2**20, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
