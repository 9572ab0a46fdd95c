"""Storing telemetry batches on a real database (SQLite, and PostgreSQL when configured):
de-duplication, the contiguous watermark, drops stepped over, rollups, refusals."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from sqlmodel import Session, select

from edge_agent.telemetry.drift import TensorDrift
from edge_agent.telemetry.sketch import RELATIVE_ACCURACY, new_sketch, to_wire
from fleet_server.artifacts.local import LocalArtifactStore
from fleet_server.bundles.tables import Bundle
from fleet_server.database import make_engine
from fleet_server.devices.tables import Device
from fleet_server.registry.tables import MLModel, ModelVersion
from fleet_server.schema import upgrade
from fleet_server.telemetry.alerts import evaluate
from fleet_server.telemetry.catalog import BundleCatalog
from fleet_server.telemetry.query import summarize
from fleet_server.telemetry.service import TelemetryService
from fleet_server.telemetry.store import prune_keys, store_batches
from fleet_server.telemetry.tables import (
    Alert,
    AlertPolicy,
    TelemetryBatchKey,
    TelemetryRollup,
    TelemetryStream,
)

SHA = "cd" * 32
STREAM = "00112233aabbccdd"


@pytest.fixture
def db(db_url: str, tmp_path: Path) -> Any:
    engine = make_engine(db_url)
    upgrade(engine)
    now = datetime.now(UTC)
    with Session(engine) as session:
        model = MLModel(name="clf", created_at=now)
        session.add(model)
        session.flush()
        version = ModelVersion(
            model_id=model.id or 0,
            version="1.0.0",
            source_sha256="0" * 64,
            size=1,
            filename="m.onnx",
            opset=17,
            ir_version=8,
            inputs=[],
            outputs=[],
            created_at=now,
            created_by="test",
        )
        session.add(version)
        session.flush()
        session.add(
            Bundle(
                sha256=SHA,
                profile="x86-64-avx2",
                runtime="onnxruntime",
                precision="fp32",
                signing_key_id="k",
                size=1,
                created_at=now,
                manifest={},
                model_version_id=version.id or 0,
                cache_key="c",
            )
        )
        for d in ("dev-1", "dev-2"):
            session.add(
                Device(id=d, profile="x86-64-avx2", enrolled_at=now, secret_hash=uuid.uuid4().hex)
            )
        session.commit()
    store = LocalArtifactStore(tmp_path / "artifacts")
    rng = np.random.default_rng(0)
    baseline = {
        "format": 2,
        "drift": {
            "inputs": {
                "x": TensorDrift.build(rng.standard_normal((2000, 1, 4)), top1=False).to_json()
            },
            "outputs": {},
        },
    }
    path = store.path(SHA)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(baseline).encode()
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("baseline.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    yield engine, BundleCatalog(store)
    engine.dispose()


def _msg(
    device: str,
    seq: int,
    *,
    floor: int | None = None,
    requests: int = 10,
    latencies: list[float] | None = None,
    x: list[list[int]] | None = None,
    when: datetime | None = None,
    **slot: Any,
) -> tuple[str, bytes]:
    sketch = new_sketch()
    for v in latencies or [1.0] * requests:
        sketch.add(v)
    end = when or datetime.now(UTC)
    body = {
        "device_id": device,
        "stream": STREAM,
        "seq": seq,
        "floor": 0 if floor is None else floor,
        "interval_start": (end - timedelta(seconds=1)).isoformat(),
        "interval_end": end.isoformat(),
        "slots": [
            {
                "slot": "clf",
                "role": "active",
                "model": "clf",
                "version": "1.0.0",
                "bundle_sha256": SHA,
                "requests": requests,
                "errors": 0,
                "nonfinite": 0,
                "latency_ms": to_wire(sketch).to_dict(),  # type: ignore[union-attr]
                "sampled": requests,
                "inputs": {"x": {"kind": "bins", "counts": x or [[1] * 10] * 4}},
                **slot,
            }
        ],
    }
    return f"edgefleet/v1/devices/{device}/telemetry", json.dumps(body).encode()


def _watermark(engine: Any, device: str) -> int:
    with Session(engine) as session:
        return session.exec(
            select(TelemetryStream.acked_seq).where(TelemetryStream.device_id == device)
        ).one()


def test_duplicates_count_once_and_the_watermark_waits_for_gaps(db: Any) -> None:
    engine, bundles = db
    with Session(engine) as session:
        out = store_batches(
            session, [_msg("dev-1", 1), _msg("dev-1", 3), _msg("dev-1", 1)], bundles
        )
    assert (out.stored, out.duplicates) == (2, 1) and out.acks[("dev-1", STREAM)] == 1
    with Session(engine) as session:  # 2 arrives late (the other ingest process had it)
        out = store_batches(session, [_msg("dev-1", 2), _msg("dev-1", 3)], bundles)
    assert (out.stored, out.duplicates) == (1, 1) and out.acks[("dev-1", STREAM)] == 3
    with Session(engine) as session:
        [health] = summarize(session, bundles, "clf")
    assert health.requests == 30 and health.devices == 1


def test_a_floor_steps_over_batches_the_device_dropped(db: Any) -> None:
    engine, bundles = db
    with Session(engine) as session:
        store_batches(session, [_msg("dev-1", 1)], bundles)
    with Session(engine) as session:  # 2..9 were dropped by the full outbox
        out = store_batches(
            session, [_msg("dev-1", 11, floor=9), _msg("dev-1", 10, floor=9)], bundles
        )
    assert out.acks[("dev-1", STREAM)] == 11 and _watermark(engine, "dev-1") == 11


def test_refusals_store_no_figures_but_a_misfit_batch_is_acknowledged(db: Any) -> None:
    engine, bundles = db
    wrong_shape = _msg("dev-1", 1, x=[[1] * 5] * 4)
    future = _msg("dev-1", 10**6, floor=0)
    unknown = _msg("nobody", 1)
    with Session(engine) as session:
        out = store_batches(session, [wrong_shape, future, unknown], bundles)
    assert sorted(r.reason for r in out.rejected) == ["bad_shape", "future_seq", "unknown_device"]
    assert out.stored == 0 and out.acks == {("dev-1", STREAM): 1}
    with Session(engine) as session:
        assert session.exec(select(TelemetryRollup)).all() == []


def test_a_sketch_of_empty_bins_is_stored_with_the_rest_of_its_drain(db: Any) -> None:
    """A device may send a latency sketch whose bins are all zero (its values all under the
    smallest bin): valid by the schema. Merging it into the rollup used to raise, and the
    whole drain, other devices' batches with it, was not stored (and resent for ever)."""
    engine, bundles = db
    empty_bins = {
        "relative_accuracy": RELATIVE_ACCURACY, "zero_count": 4, "key_offset": 0,
        "counts": [0, 0, 0], "sum_ms": 0.0,
    }  # fmt: skip
    drain = [_msg("dev-1", 1, requests=4, latency_ms=empty_bins), _msg("dev-2", 1, role="shadow")]
    with Session(engine) as session:
        out = store_batches(session, drain, bundles)
    assert (out.stored, out.rejected) == (2, [])
    with Session(engine) as session:
        rows = {r.role: r for r in session.exec(select(TelemetryRollup)).all()}
    assert rows["active"].requests == 4 and rows["shadow"].requests == 10
    assert rows["active"].latency_sketch["zero_count"] == 4
    assert rows["active"].latency_sketch["counts"] == []


def test_fleet_quantiles_come_from_merged_sketches_and_drift_from_summed_counts(db: Any) -> None:
    engine, bundles = db
    rng = np.random.default_rng(3)
    a, b = rng.lognormal(0, 0.3, 500), rng.lognormal(1.0, 0.3, 500)
    shifted = [[0] * 9 + [300], [30] * 10, [30] * 10, [30] * 10]  # feature 0 all in the top bin
    with Session(engine) as session:
        store_batches(
            session,
            [
                _msg("dev-1", 1, requests=500, latencies=list(a), x=shifted),
                _msg("dev-2", 1, requests=500, latencies=list(b), x=shifted),
            ],
            bundles,
        )
    with Session(engine) as session:
        [health] = summarize(session, bundles, "clf")
        want = float(np.quantile(np.concatenate([a, b]), 0.95, method="lower"))
        assert health.p95_ms is not None and abs(health.p95_ms - want) / want < 0.01
        assert health.devices == 2
        [drift] = health.drift
        assert drift.worst_group == 0 and drift.psi > 1.0
        session.add(AlertPolicy(model="clf", max_psi=0.25, min_requests=100))
        session.commit()
        findings = evaluate(session, bundles, "clf")
    assert [(f.kind, f.subject) for f in findings] == [("drift", "input:x")]


def test_pruned_keys_still_stop_a_late_resend_and_keys_past_a_gap_stay(db: Any) -> None:
    engine, bundles = db
    with Session(engine) as session:
        store_batches(session, [_msg("dev-1", q) for q in (1, 2, 3, 5)], bundles)
    with Session(engine) as session:
        gone = prune_keys(session, older_than=datetime.now(UTC) + timedelta(hours=1))
    assert gone == 3  # 1..3 are under the watermark; 5 (past the gap at 4) is kept
    with Session(engine) as session:
        keys = session.exec(select(TelemetryBatchKey.seq)).all()
        assert sorted(keys) == [5]
        # A resend of 2 (its acknowledgement was lost) is a duplicate, not new figures.
        out = store_batches(session, [_msg("dev-1", 2), _msg("dev-1", 4)], bundles)
    assert (out.stored, out.duplicates) == (1, 1) and out.acks[("dev-1", STREAM)] == 5
    with Session(engine) as session:
        [health] = summarize(session, bundles, "clf")
    assert health.requests == 50


def test_evaluations_at_once_open_one_alert_per_finding(db: Any, tmp_path: Path) -> None:
    """The ingest thread and a throttle timer may evaluate the same model at the same moment:
    one alert is opened, not one per evaluation."""
    engine, bundles = db
    shifted = [[0] * 9 + [300], [30] * 10, [30] * 10, [30] * 10]
    with Session(engine) as session:
        store_batches(session, [_msg("dev-1", 1, requests=500, x=shifted)], bundles)
    service = TelemetryService(engine, LocalArtifactStore(tmp_path / "artifacts"))
    start = threading.Barrier(8)

    def evaluate_now() -> None:
        start.wait()
        service.refresh({"clf"})

    threads = [threading.Thread(target=evaluate_now) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with Session(engine) as session:
        alerts = session.exec(select(Alert).where(Alert.model == "clf")).all()
    assert [(a.kind, a.subject, a.state) for a in alerts] == [("drift", "input:x", "open")]


def test_a_decommissioned_devices_reports_are_refused_like_an_unknown_devices(db: Any) -> None:
    """The broker's ACL stops them; the server does not count on it."""
    from fleet_server.devices.reports import store_reports
    from fleet_server.telemetry.checks import validate

    engine, bundles = db
    with Session(engine) as session:
        device = session.get(Device, "dev-1")
        assert device is not None
        device.decommissioned_at = datetime.now(UTC)
        session.add(device)
        session.commit()
    with Session(engine) as session:
        good, _, rejected = validate(
            session, [_msg("dev-1", 1), _msg("dev-2", 1)], bundles, datetime.now(UTC)
        )
        assert [b.device_id for b in good] == ["dev-2"]
        assert [(r.device_id, r.reason) for r in rejected] == [("dev-1", "unknown_device")]
        rows = store_reports(session, [("dev-1", True), ("dev-2", True)])
        session.commit()
        assert [r.id for r in rows] == ["dev-2"]
    with Session(engine) as session:
        online = dict(session.exec(select(Device.id, Device.online)).all())
        assert online == {"dev-1": False, "dev-2": True}


def test_a_batch_that_trips_a_fault_of_ours_costs_only_itself(
    db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth: should storing one batch raise (a bug of ours, as the empty-bins
    sketch was), the rest of its drain is stored one by one and acknowledged; the one is
    counted, and its device resends it."""
    from fleet_server.telemetry import ingest as ingest_module

    engine, bundles = db
    real = ingest_module.store_batches

    def store(session: Session, messages: list[tuple[str, bytes]], *args: Any, **kw: Any) -> Any:
        if any("/dev-3/" in topic for topic, _ in messages):
            raise RuntimeError("a fault of ours")
        return real(session, messages, *args, **kw)

    monkeypatch.setattr(ingest_module, "store_batches", store)
    acks: list[str] = []
    registry = CollectorRegistry()
    counters = ingest_module.IngestCounters(registry)
    ingest = ingest_module.TelemetryIngest(
        engine, bundles, counters, publish=lambda topic, payload: acks.append(topic)
    )
    for device in ("dev-1", "dev-3", "dev-2"):  # queued before the writer starts: one drain
        ingest.offer(*_msg(device, 1))
    ingest.start()
    ingest.stop()
    assert ingest.stored_total == 2
    assert sorted(acks) == [f"edgefleet/v1/devices/{d}/ack" for d in ("dev-1", "dev-2")]
    refused = {"reason": "internal_error"}
    assert registry.get_sample_value("edgefleet_telemetry_rejected_total", refused) == 1
