"""The agent's telemetry pieces: sketches, drift counting, the outbox, the reporter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from msgspec import ValidationError

from edge_agent.protocol.status import VersionRef
from edge_agent.protocol.telemetry import TelemetryAck, TelemetryBatch
from edge_agent.serving.stats import ModelStats
from edge_agent.telemetry.drift import Baseline, TensorDrift, js_distance, psi
from edge_agent.telemetry.figures import ModelTelemetry
from edge_agent.telemetry.outbox import Outbox, OutboxLimits
from edge_agent.telemetry.reporter import TelemetryReporter, TelemetrySettings
from edge_agent.telemetry.sketch import add_many, merge_wire, new_sketch, quantile, to_wire

SHA = "ab" * 32


def test_fleet_p95_from_merged_device_sketches_is_within_one_percent_of_the_raw_p95() -> None:
    rng = np.random.default_rng(1)
    devices = [rng.lognormal(mean=0.2 * i, sigma=0.6, size=3000) for i in range(12)]
    wires = []
    for latencies in devices:
        sketch = new_sketch()
        for value in latencies:
            sketch.add(float(value))
        wire = to_wire(sketch)
        assert wire is not None
        # Over the wire and back: what the server merges is what the device sent.
        wires.append(type(wire).from_dict(json.loads(json.dumps(wire.to_dict()))))
    merged = merge_wire(wires)
    everything = np.concatenate(devices)
    for q in (0.5, 0.95, 0.99):
        got = quantile(merged, q)
        want = float(np.quantile(everything, q, method="lower"))
        assert got is not None and abs(got - want) / want <= 0.01, (q, got, want)
    # Averaging per-device p95s is what the sketch avoids: it is visibly off here.
    averaged = np.mean([np.percentile(d, 95) for d in devices])
    assert abs(averaged - np.percentile(everything, 95)) / np.percentile(everything, 95) > 0.05
    assert merged.count == everything.size


def _tabular_baseline(rng: np.random.Generator) -> TensorDrift:
    return TensorDrift.build(rng.standard_normal((4000, 1, 16)).astype(np.float32), top1=False)


def test_latencies_folded_in_at_once_make_the_sketch_they_make_one_by_one() -> None:
    """The serving path appends latencies and folds them in by the hundred: the sketch must
    be the one ``add`` would have made (bins, zeros, sum, min, max), however it is cut."""
    rng = np.random.default_rng(8)
    for _ in range(10):
        values = [*rng.lognormal(0, 2, 3000).tolist(), 0.0, 1e-320, 3.5e4]
        one_by_one = new_sketch()
        for v in values:
            one_by_one.add(v)
        folded = new_sketch()
        cut = int(rng.integers(1, len(values)))
        add_many(folded, values[:cut])
        add_many(folded, [])
        add_many(folded, values[cut:])
        a, b = to_wire(one_by_one), to_wire(folded)
        assert a is not None and b is not None
        assert (a.key_offset, a.counts, a.zero_count) == (b.key_offset, b.counts, b.zero_count)
        assert (a.min_ms, a.max_ms) == (b.min_ms, b.max_ms)
        assert b.sum_ms == pytest.approx(a.sum_ms, rel=1e-12)


def test_a_request_is_in_the_figures_as_soon_as_it_is_recorded() -> None:
    """Latencies waiting to be folded are in every read of the figures."""
    t = ModelTelemetry(None)
    for ms in (1.0, 2.0, 3.0):
        t.record(ms, {}, {})
    peeked = t.peek().latency_ms
    assert peeked is not None and peeked.count == 3 and peeked.max_ms == 3.0
    harvested = t.harvest().latency_ms
    assert harvested is not None and harvested.count == 3
    assert t.harvest().latency_ms is None  # the next interval starts empty


def test_inputs_from_the_baseline_distribution_score_low_psi_and_a_shifted_feature_only_it() -> (
    None
):
    rng = np.random.default_rng(2)
    drift = _tabular_baseline(rng)
    assert drift.axis == 1 and drift.shape == (16, 10)
    same = sum(drift.count(rng.standard_normal((1, 16)).astype(np.float32)) for _ in range(3000))
    assert np.nanmax(psi(same, drift.expected)) < 0.1
    shifted = rng.standard_normal((3000, 16)).astype(np.float32)
    shifted[:, 5] += 1.0  # one feature's mean moved by one sigma
    counts = sum(drift.count(shifted[i : i + 1]) for i in range(3000))
    scores = psi(counts, drift.expected)
    assert scores[5] > 0.25
    assert np.delete(scores, 5).max() < 0.1
    assert js_distance(counts, drift.expected)[5] > js_distance(counts, drift.expected)[4]


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_a_brightened_image_channel_drifts_alone(layout: str) -> None:
    rng = np.random.default_rng(3)
    shape = (1, 3, 64, 64) if layout == "nchw" else (1, 64, 64, 3)
    axis = 1 if layout == "nchw" else 3
    reference = rng.random((32, *shape)).astype(np.float32)
    drift = TensorDrift.build(reference, top1=False)
    assert drift.axis == axis and drift.groups == 3
    same = sum(drift.count(rng.random(shape).astype(np.float32)) for _ in range(40))
    assert np.nanmax(psi(same, drift.expected)) < 0.1
    brighter = np.zeros(3, np.float32)
    brighter[1] = 0.25
    lift = brighter.reshape((1, 3, 1, 1) if layout == "nchw" else (1, 1, 1, 3))
    images = [np.clip(rng.random(shape) + lift, 0, 1).astype(np.float32) for _ in range(40)]
    scores = psi(sum(drift.count(x) for x in images), drift.expected)
    assert scores[1] > 0.25 and scores[0] < 0.1 and scores[2] < 0.1


def test_wide_inputs_are_grouped_and_scalars_and_odd_shapes_are_one_group() -> None:
    rng = np.random.default_rng(4)
    wide = TensorDrift.build(rng.standard_normal((50, 1, 1000)), top1=False)
    assert wide.groups == 256 and wide.group_of.shape == (1000,)
    assert wide.count(rng.standard_normal((1, 1000))).sum() == 1000
    scalar = TensorDrift.build(rng.standard_normal((50,)), top1=False)
    assert scalar.axis is None and scalar.count(np.float32(0.3)).sum() == 1
    # A live feed of another shape than the baseline's is not counted, and does not raise.
    assert wide.count(rng.standard_normal((1, 7))).sum() == 0


def test_top1_counts_and_old_whole_tensor_baselines_still_read() -> None:
    rng = np.random.default_rng(5)
    drift = TensorDrift.build(rng.random((100, 2, 4)), top1=True)
    assert drift.kind == "top1" and drift.shape == (1, 4)
    assert drift.count(np.array([[0.1, 0.9, 0, 0], [np.nan, 1, 0, 0]])).tolist() == [[0, 1, 0, 0]]
    old = {
        "format": 1,
        "inputs": {"x": {"bin_edges": list(np.linspace(-2, 2, 11)), "histogram": [0.1] * 10}},
        "outputs": {"probs": {"top1_frequencies": [0.25] * 4, "bin_edges": [0, 1]}},
    }
    baseline = Baseline.from_json(old)
    assert baseline.inputs["x"].shape == (1, 10) and baseline.outputs["probs"].kind == "top1"
    counted, _ = baseline.count({"x": np.array([[-5.0, 0.1, 5.0]])}, {})
    assert counted["x"].tolist() == [[1, 0, 0, 0, 0, 1, 0, 0, 0, 1]]


def test_drift_sampling_keeps_its_cost_within_budget_and_reports_the_rate() -> None:
    rng = np.random.default_rng(6)
    baseline = Baseline({"x": _tabular_baseline(rng)}, {})
    telemetry = ModelTelemetry(baseline, budget=0.02)
    feeds = {"x": rng.standard_normal((1, 16)).astype(np.float32)}
    # A 0.05 ms model: counting every request would cost far more than 2 % of it.
    for _ in range(5000):
        telemetry.record(0.05, feeds, {})
    figures = telemetry.harvest()
    assert 0 < figures.sample_rate < 0.5
    assert 0 < figures.sampled < 5000
    # A 50 ms model: every request fits in the budget.
    slow = ModelTelemetry(baseline, budget=0.02)
    for _ in range(300):
        slow.record(50.0, feeds, {})
    assert slow.harvest().sample_rate == 1.0


def _batch(seq: int, floor: int, dropped: int, *, pad: int = 0) -> bytes:
    return json.dumps({"seq": seq, "floor": floor, "dropped": dropped, "pad": "x" * pad}).encode()


def test_outbox_keeps_batches_until_the_server_acknowledges_and_sequences_survive_restart(
    tmp_path: Path,
) -> None:
    box = Outbox(tmp_path / "box")
    for _ in range(3):
        box.close(lambda s, f, d: _batch(s, f, d))
    assert box.pending() == [1, 2, 3]
    assert box.ack("0" * 16, 3) == 0  # another stream's acknowledgement changes nothing
    assert box.ack(box.stream, 2) == 2 and box.pending() == [3]
    again = Outbox(tmp_path / "box")
    assert again.stream == box.stream
    assert again.close(lambda s, f, d: _batch(s, f, d)) == 4
    assert json.loads(again.read(4) or b"")["floor"] == 2  # 1 and 2 will never come again


def test_a_draft_left_by_a_crash_is_closed_once_under_its_own_sequence(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "box")
    box.close(lambda s, f, d: _batch(s, f, d))
    assert box.write_draft(lambda s, f, d: _batch(s, f, d, pad=1)) == 2
    assert box.write_draft(lambda s, f, d: _batch(s, f, d, pad=2)) == 2  # rewritten in place
    restarted = Outbox(tmp_path / "box")  # as after kill -9
    assert restarted.pending() == [1, 2]
    assert json.loads(restarted.read(2) or b"")["pad"] == "xx"
    assert restarted.close(lambda s, f, d: _batch(s, f, d)) == 3


def test_a_full_outbox_drops_the_oldest_counts_it_and_stays_under_its_bound(tmp_path: Path) -> None:
    limit = 64 << 10
    box = Outbox(tmp_path / "box", OutboxLimits(max_bytes=limit))
    for _ in range(100):  # the server is away: nothing is acknowledged
        box.close(lambda s, f, d: _batch(s, f, d, pad=2000))
        assert box.bytes_used <= limit
    pending = box.pending()
    assert pending[-1] == 100 and box.dropped_total == 100 - len(pending) > 0
    newest = json.loads(box.read(100) or b"")
    assert newest["dropped"] == box.dropped_total and newest["floor"] == pending[0] - 1


def test_batches_older_than_the_age_bound_are_dropped_and_counted(tmp_path: Path) -> None:
    now = [1_000_000.0]
    box = Outbox(tmp_path / "box", OutboxLimits(max_age_s=60), clock=lambda: now[0])
    box.close(lambda s, f, d: _batch(s, f, d))
    import os

    os.utime(box.directory / f"{1:012d}.batch", (now[0] - 120, now[0] - 120))
    now[0] += 1
    box.close(lambda s, f, d: _batch(s, f, d))
    assert box.pending() == [2] and box.dropped_total == 1


class _Serving:
    def __init__(self, baseline: Baseline | None) -> None:
        self.ref = VersionRef(
            model="clf", version="1.0.0", bundle_sha256=SHA, runtime="onnxruntime", precision="fp32"
        )
        self.stats = ModelStats()
        self.telemetry = ModelTelemetry(baseline)
        self.retired = False

    @property
    def finished(self) -> bool:
        return self.retired

    def serve(self, n: int, latency_ms: float = 2.0) -> None:
        x = {"x": np.zeros((1, 16), np.float32)}
        for _ in range(n):
            out = {"p": np.ones((1, 4), np.float32)}
            self.stats.record(latency_ms, outputs=out)
            self.telemetry.record(latency_ms, x, out)


def test_the_reporter_counts_each_request_once_across_intervals_drafts_and_swaps(
    tmp_path: Path,
) -> None:
    sent: list[bytes] = []
    reporter = TelemetryReporter(
        "dev-1",
        Outbox(tmp_path / "box"),
        TelemetrySettings(),
        publish=lambda data: sent.append(data) is None,
        rollout_of=lambda slot, version: "r-1",
    )
    rng = np.random.default_rng(7)
    old, new = _Serving(Baseline({"x": _tabular_baseline(rng)}, {})), _Serving(None)
    reporter.track("clf", "active", old)
    old.serve(30)
    reporter.checkpoint()
    old.serve(20)
    reporter.close_interval()
    reporter.track("clf", "active", new)  # a swap: the old version is retired
    old.serve(5)  # requests that were in flight at the swap
    old.retired = True
    new.serve(7)
    reporter.close_interval()
    reporter.close_interval()  # the retired version has nothing left to report
    assert reporter.send_pending() == 3
    batches = [TelemetryBatch.from_bytes(b) for b in sent]
    assert [b.seq for b in batches] == [1, 2, 3]
    per_batch = [{(s.version, id(s)): s.requests for s in b.slots} for b in batches]
    assert [sum(p.values()) for p in per_batch] == [50, 12, 0]
    first = batches[0].slots[0]
    assert first.rollout_id == "r-1" and first.latency_ms is not None
    assert first.latency_ms.count == 50 and first.inputs["x"].shape == (16, 10)
    assert sum(first.inputs["x"].counts[0]) == first.sampled
    # The server acknowledges the first two: they leave the outbox; the third is resent
    # only after resend_after_s, or at once after a reconnect.
    reporter.acknowledged(TelemetryAck(stream=reporter.outbox.stream, acked_seq=2).to_bytes())
    assert reporter.outbox.pending() == [3]
    assert reporter.send_pending() == 0
    reporter.connected()
    assert reporter.send_pending() == 1


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b.update(seq=0),
        lambda b: b.update(floor=b["seq"]),
        lambda b: b.update(device_id="../etc"),
        lambda b: b["slots"][0].update(errors=10**6),
        lambda b: b["slots"][0]["inputs"]["x"].update(counts=[[1, 2], [3]]),
        lambda b: b["slots"][0]["inputs"]["x"].update(counts=[[-1] * 10]),
        lambda b: b["slots"][0]["latency_ms"].update(counts=[1] * 5000),
        lambda b: b.update(extra=1),
    ],
)
def test_malformed_batches_are_refused_by_the_schema(mutate: object) -> None:
    good = {
        "device_id": "dev-1",
        "stream": "0123456789abcdef",
        "seq": 5,
        "floor": 4,
        "interval_start": "2026-11-30T00:00:00Z",
        "interval_end": "2026-11-30T00:01:00Z",
        "slots": [
            {
                "slot": "clf",
                "role": "active",
                "model": "clf",
                "version": "1",
                "bundle_sha256": SHA,
                "requests": 10,
                "errors": 0,
                "nonfinite": 0,
                "latency_ms": {
                    "relative_accuracy": 0.01,
                    "zero_count": 0,
                    "key_offset": 10,
                    "counts": [10],
                    "sum_ms": 10.0,
                },
                "inputs": {"x": {"kind": "bins", "counts": [[1] * 10]}},
            }
        ],
    }
    TelemetryBatch.from_bytes(json.dumps(good).encode())
    assert callable(mutate)
    mutate(good)
    with pytest.raises(ValidationError):
        TelemetryBatch.from_bytes(json.dumps(good).encode())
    with pytest.raises(ValueError, match="limit"):
        TelemetryBatch.from_bytes(b" " * (300 * 1024))
