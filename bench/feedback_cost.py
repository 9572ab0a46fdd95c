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
- the feedback work alone (id, top-1, keep), timed over many calls: the precise per-call cost,
  as a share of the model's inference time (the target is 1 %)
- the memory bound: bytes per kept prediction (one row: its class), and the store at its
  default capacity.

Run: .venv/bin/python bench/feedback_cost.py [--calls 3000] [--hidden 1536]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnxruntime as ort

from bench import timing
from converters.onnx.samples import mlp_classifier
from edge_agent.bundle import (
    FileEntry,
    Manifest,
    ModelRef,
    RuntimeRequirement,
    SelfTestSpec,
    TensorSpec,
)
from edge_agent.protocol.status import VersionRef
from edge_agent.runtimes.fake import FakeModel
from edge_agent.serving import FeedbackStore, ServingModel, SlotTable, predict

BLOCK, BLOCK_WARMUP = 50, 10
FEATURES, CLASSES = 512, 10


def serving(session: ort.InferenceSession, hidden: int) -> ServingModel:
    spec_in = [TensorSpec(name="x", dtype="float32", shape=["batch", FEATURES])]
    spec_out = [TensorSpec(name="probs", dtype="float32", shape=["batch", CLASSES])]
    model = FakeModel(spec_in, spec_out, lambda f: {"probs": session.run(None, f)[0]})
    ref = VersionRef(model="clf", version="1.0.0", bundle_sha256="0" * 64,
                     runtime="onnxruntime", precision="fp32")  # fmt: skip
    manifest = Manifest(
        model=ModelRef(name="clf", version="1.0.0", source_sha256="0" * 64),
        profile="x86-64-avx2",
        runtime=RuntimeRequirement(name="onnxruntime", versions=">=1"),
        precision="fp32",
        artifact="model/model.onnx",
        files=[FileEntry(path=p, sha256="0" * 64, size=1) for p in ("model/model.onnx", "st.npz")],
        inputs=spec_in,
        outputs=spec_out,
        selftest=SelfTestSpec(file="st.npz", atol=0, rtol=0),
        toolchain={"hidden": str(hidden)},
        created_at=datetime.now(UTC),
    )
    return ServingModel(ref, manifest, model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--hidden", type=int, default=10240, help="sizes the model (~1 ms)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="feedback-bench-"))
    path = mlp_classifier(work / "clf.onnx", features=FEATURES, hidden=args.hidden,
                          classes=CLASSES, seed=1)  # fmt: skip
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, FEATURES)).astype(np.float32)

    off, on = SlotTable(), SlotTable()
    on.feedback = FeedbackStore()
    off.swap("clf", serving(session, args.hidden))
    on.swap("clf", serving(session, args.hidden))
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
    # Paired: on and off back to back (in alternating order), the median of the differences.
    paired = []
    for i in range(args.calls):
        pair = []
        for table in (on, off) if i % 2 else (off, on):
            t0 = time.perf_counter()
            predict(table, "clf", feeds)
            pair.append((table is on, time.perf_counter() - t0))
        timed = dict(pair)
        paired.append((timed[True] - timed[False]) * 1e6)
    paired_us = statistics.median(paired)
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
    for _ in range(n):
        rid = store.new_id()
        top1 = model.top1(outputs)
        assert top1 is not None and model.answer_key is not None
        store.keep(rid, model.answer_key, top1)
    work_us = (time.perf_counter() - t0) / n * 1e6
    share = work_us / medians["raw"]

    # Memory: kept predictions of one row each.
    tracemalloc.start()
    sized = FeedbackStore(capacity=20_000)
    before = tracemalloc.get_traced_memory()[0]
    assert model.answer_key is not None
    for i in range(20_000):
        sized.keep(sized.new_id(), model.answer_key, i % CLASSES)
    per_entry = (tracemalloc.get_traced_memory()[0] - before) / 20_000
    tracemalloc.stop()
    capacity = FeedbackStore().capacity

    diff_us = medians["feedback on"] - medians["feedback off"]
    print(f"\nfeedback work alone: {work_us:.2f} µs a call = {share:.2%} of the model's "
          f"{medians['raw']:.0f} µs inference (target ≤ 1 %)")  # fmt: skip
    print(f"serving path, on - off medians: {diff_us:+.1f} µs ({diff_us / medians['raw']:+.2%}); "
          f"paired calls: {paired_us:+.1f} µs ({paired_us / medians['raw']:+.2%})")  # fmt: skip
    print(f"memory: {per_entry:.0f} bytes per kept prediction; the default capacity "
          f"({capacity:,}) holds at most {per_entry * capacity / 2**20:.1f} MiB")  # fmt: skip
    summary = {
        "raw_us": round(medians["raw"], 1),
        "off_us": round(medians["feedback off"], 1),
        "on_us": round(medians["feedback on"], 1),
        "paired_diff_us": round(paired_us, 1),
        "feedback_work_us": round(work_us, 2),
        "share_of_inference": round(share, 5),
        "bytes_per_kept": round(per_entry),
        "max_store_mib": round(per_entry * capacity / 2**20, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
