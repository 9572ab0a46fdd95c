"""Labels from the field on the agent: request ids, kept answers, joins, refusals, and the
counts' way into the telemetry outbox (durable before the route answers)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from edge_agent.protocol.telemetry import TelemetryBatch
from edge_agent.runtimes.fake import FakeModel
from edge_agent.serving import (
    FeedbackStore,
    InferenceHTTPServer,
    ServingModel,
    SlotTable,
)
from edge_agent.serving.feedback import MAX_LABELS_PER_REQUEST, RESOLVE_EVERY, answer_key
from edge_agent.telemetry.outbox import Outbox
from edge_agent.telemetry.reporter import TelemetryReporter, TelemetrySettings
from tests.unit.test_serving import SPEC_IN, SPEC_OUT, post, serving

# y = x: the class of a row is the index of its largest value.
IDENTITY = FakeModel(SPEC_IN, SPEC_OUT, lambda f: {"y": f["x"]})


def onehot(classes: list[int]) -> list[list[float]]:
    return [[1.0 if c == k else 0.0 for k in range(3)] for c in classes]


@pytest.fixture
def table() -> SlotTable:
    t = SlotTable()
    t.feedback = FeedbackStore(capacity=1000, max_labels_per_s=200)
    t.swap("main", serving(IDENTITY, "1.0.0"))
    return t


def predict(srv: InferenceHTTPServer, classes: list[int]) -> str:
    status, headers, data = post(
        srv,
        "/v1/models/scaler:predict",
        json.dumps({"inputs": {"x": onehot(classes)}}).encode(),
        "application/json",
    )
    assert status == 200, data
    rid = json.loads(data)["request_id"]
    assert headers["X-Edgefleet-Request-Id"] == rid
    return str(rid)


def feedback(srv: InferenceHTTPServer, body: object, name: str = "scaler") -> tuple[int, dict]:
    status, headers, data = post(
        srv, f"/v1/models/{name}:feedback", json.dumps(body).encode(), "application/json"
    )
    doc = json.loads(data)
    doc["_headers"] = headers
    return status, doc


def totals(table: SlotTable) -> dict[tuple[str, str, str], tuple[int, int, int]]:
    assert table.feedback is not None
    return {
        (k[0], k[1], k[3]): (c.labelled, c.correct, c.late)
        for k, c in table.feedback.counts(reset=False).items()
    }


def test_labels_join_their_predictions(server: InferenceHTTPServer, table: SlotTable) -> None:
    ids = [predict(server, [c]) for c in (0, 1, 2, 1)]
    assert len(set(ids)) == 4
    status, doc = feedback(server, {"request_id": ids[0], "label": 0})
    assert status == 200 and doc["accepted"] == 1 and doc["correct"] == 1
    batch = {"feedback": [{"request_id": ids[1], "label": 2}, {"request_id": ids[2], "label": 2}]}
    status, doc = feedback(server, batch)
    assert (status, doc["accepted"], doc["correct"], doc["late"]) == (200, 2, 1, 0)
    # Unknown ids and a second label for one prediction are late, not errors.
    status, doc = feedback(
        server,
        {"feedback": [{"request_id": "nope", "label": 1}, {"request_id": ids[0], "label": 0}]},
    )
    assert (status, doc["accepted"], doc["late"]) == (200, 0, 2)
    assert totals(table) == {("main", "active", "1.0.0"): (3, 2, 2)}


def test_a_batch_request_is_labelled_row_by_row(
    server: InferenceHTTPServer, table: SlotTable
) -> None:
    rid = predict(server, [0, 1, 2])
    status, doc = feedback(server, {"request_id": rid, "label": [0, 1, 0]})
    assert status == 200 and doc["correct"] == 2
    assert totals(table)[("main", "active", "1.0.0")] == (3, 2, 0)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"request_id": "x", "label": "cat"}, "bad_label"),
        ({"request_id": "x", "label": 1.5}, "bad_label"),
        ({"request_id": "x", "label": True}, "bad_label"),
        ({"request_id": "x", "label": 3}, "bad_label"),  # three classes: 0..2
        ({"request_id": "x", "label": -1}, "bad_label"),
        ({"request_id": 7, "label": 1}, "bad_feedback"),
        ({"request_id": "x" * 65, "label": 1}, "bad_feedback"),
        ({"request_id": "x"}, "bad_feedback"),
        ({"request_id": "x", "label": 1, "extra": 1}, "bad_feedback"),
        ({"feedback": []}, "bad_feedback"),
        ([1, 2], "bad_feedback"),
    ],
)
def test_bad_labels_are_refused_whole(
    server: InferenceHTTPServer, table: SlotTable, body: object, code: str
) -> None:
    good = predict(server, [1])
    batch = {"feedback": [{"request_id": good, "label": 1}, body]}
    for attempt in (body, batch):
        status, doc = feedback(server, attempt)
        assert status == 422, doc
        assert doc["error"]["code"] in (code, "bad_feedback")
    assert totals(table) == {}  # nothing counted half-way
    status, doc = feedback(server, {"request_id": good, "label": 1})
    assert status == 200 and doc["correct"] == 1  # the good prediction is still labellable


def test_hostile_bodies_and_routes(server: InferenceHTTPServer, table: SlotTable) -> None:
    status, _, data = post(server, "/v1/models/scaler:feedback", b"\xff{", "application/json")
    assert status == 400 and json.loads(data)["error"]["code"] == "bad_json"
    status, doc = feedback(server, {"request_id": "x", "label": 1}, name="ghost")
    assert status == 404 and doc["error"]["code"] == "model_not_found"
    too_many = {"feedback": [{"request_id": "x", "label": 0}] * (MAX_LABELS_PER_REQUEST + 1)}
    status, doc = feedback(server, too_many)
    assert status == 422 and doc["error"]["code"] == "too_many_labels"
    rid = predict(server, [0, 1])
    status, doc = feedback(server, {"request_id": rid, "label": 0})  # one label, two rows
    assert status == 422 and "2 row(s)" in doc["error"]["message"]
    assert totals(table) == {}
    predict(server, [2])  # still serving


def test_a_flood_is_refused_counted_and_serving_goes_on(
    server: InferenceHTTPServer, table: SlotTable
) -> None:
    # 200 labels a second, bursts of 2,000.
    entries = [{"request_id": f"id{i}", "label": 0} for i in range(1000)]
    assert feedback(server, {"feedback": entries})[0] == 200
    assert feedback(server, {"feedback": entries})[0] == 200
    status, doc = feedback(server, {"feedback": entries})
    assert status == 429 and doc["_headers"]["Retry-After"] == "1"
    assert table.feedback is not None and table.feedback.refused == {"rate": 1000}
    assert totals(table)[("main", "active", "1.0.0")] == (0, 0, 2000)
    predict(server, [1])
    metrics = _get(server, "/metrics")
    assert 'edgefleet_agent_feedback_refused_labels_total{reason="rate"} 1000.0' in metrics
    assert "edgefleet_agent_feedback_kept_predictions 1.0" in metrics


def _get(srv: InferenceHTTPServer, path: str) -> str:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    conn.request("GET", path)
    body = conn.getresponse().read().decode()
    conn.close()
    return body


def test_models_without_a_class_output_take_no_labels(server: InferenceHTTPServer) -> None:
    from edge_agent.bundle import TensorSpec

    scalar = [TensorSpec(name="y", dtype="float32", shape=["batch", 1])]
    regression = serving(FakeModel(SPEC_IN, scalar, lambda f: {"y": f["x"][:, :1]}), "2.0.0")
    manifest = regression.manifest.replace(outputs=scalar)
    server.table.swap("reg", ServingModel(regression.ref, manifest, regression.model))
    status, doc = feedback(server, {"request_id": "x", "label": 0}, name="reg")
    assert status == 422 and doc["error"]["code"] == "no_class_output"


def test_the_store_is_bounded_by_count_and_age() -> None:
    now = [0.0]
    store = FeedbackStore(capacity=3, max_age_s=60, clock=lambda: now[0])
    t = SlotTable()
    t.feedback = store
    model = serving(IDENTITY, "1.0.0")
    t.swap("main", model)
    ids = [store.new_id() for _ in range(5)]
    for rid in ids:
        store.keep(rid, answer_key("main", "active", model.ref), 0)
    assert len(store) == 3  # the two oldest went
    v = store.label("main", model.ref, [(ids[0], [0]), (ids[4], [0])], 3)
    assert (v.accepted, v.late) == (1, 1)
    now[0] = 61.0
    v = store.label("main", model.ref, [(ids[3], [0])], 3)
    assert (v.accepted, v.late) == (0, 1)  # expired
    assert len(store) == 0


def test_answers_kept_on_the_serving_path_join_their_labels_before_and_after_resolving() -> None:
    """The serving path keeps the output and finds its top-1 class later, for many answers
    at once: a label joins the same answer either way, once; an id in another spelling, or
    from another store, is late."""
    store = FeedbackStore(capacity=1000)
    model = serving(IDENTITY, "1.0.0")
    key = answer_key("main", "active", model.ref)
    spec = ("y", 3)
    outputs = [
        {"y": np.asarray([onehot([i % 3])], np.float32)[0]} for i in range(RESOLVE_EVERY + 5)
    ]
    ids = [store.answered(key, spec, o) for o in outputs]
    # The first RESOLVE_EVERY were resolved on the way; the last five are still outputs.
    v = store.label("main", model.ref, [(ids[0], [0]), (ids[-1], [(len(ids) - 1) % 3])], 3)
    assert (v.accepted, v.correct, v.late) == (2, 2, 0)
    v = store.label("main", model.ref, [(ids[0], [0])], 3)
    assert (v.accepted, v.late) == (0, 1)  # one label per prediction
    v = store.label("main", model.ref, [(ids[2], [2]), (ids[2], [2])], 3)
    assert (v.accepted, v.correct, v.late) == (1, 1, 1)  # ... even twice in one request
    seq = ids[1][12:]
    respelled = [ids[1][:12] + "0x" + seq, ids[1][:12] + seq.upper() + "_", "f" * 12 + seq]
    v = store.label("main", model.ref, [(r, [1]) for r in respelled], 3)
    assert (v.accepted, v.late) == (0, 3)
    # A model with no class output gets ids and keeps nothing.
    rid = store.answered(key, None, outputs[0])
    assert (store.label("main", model.ref, [(rid, [0])], 3).late) == 1


def test_a_shadow_is_scored_by_the_same_label(table: SlotTable) -> None:
    from edge_agent.serving import predict as run

    flipped = FakeModel(SPEC_IN, SPEC_OUT, lambda f: {"y": -f["x"]})
    table.attach_shadow("main-shadow", "main", serving(flipped, "2.0.0"), 1.0)
    result = run(table, "main", {"x": np.array(onehot([2]), np.float32)})
    table.drain_shadows()
    assert table.feedback is not None and result.request_id is not None
    table.feedback.label("main", result.ref, [(result.request_id, [2])], 3)
    assert totals(table) == {
        ("main", "active", "1.0.0"): (1, 1, 0),
        ("main-shadow", "shadow", "2.0.0"): (1, 0, 0),
    }


def test_labels_reach_the_outbox_before_the_answer_and_survive_a_restart(
    tmp_path: Path,
) -> None:
    table = SlotTable()
    table.feedback = FeedbackStore()
    old = serving(IDENTITY, "1.0.0")
    table.swap("main", old)
    outbox = Outbox(tmp_path / "outbox")
    reporter = TelemetryReporter(
        "dev-1", outbox, TelemetrySettings(), publish=lambda b: True, labels=table.feedback
    )
    reporter.track("main", "active", old)
    table.on_serving = reporter.track
    table.feedback.persist = reporter.persist
    from edge_agent.serving import predict as run

    rids = [run(table, "main", {"x": np.array(onehot([1]), np.float32)}).request_id for _ in "ab"]
    # A new version takes the slot; labels for the old one's answers still count for it.
    table.swap("main", serving(IDENTITY, "2.0.0"))
    threads = [
        threading.Thread(
            target=lambda r=r: (
                table.feedback.label("main", old.ref, [(r, [1])], 3),  # type: ignore[union-attr]
                table.feedback.persist(),  # type: ignore[union-attr]
            )
        )
        for r in rids
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    # A kill -9 now: the next start closes the draft as it is.
    drafts = list((tmp_path / "outbox").glob("*.open"))
    assert len(drafts) == 1
    restarted = Outbox(tmp_path / "outbox")
    [seq] = restarted.pending()
    data = restarted.read(seq)
    assert data is not None
    slots = {(s.version, s.role): s for s in TelemetryBatch.from_bytes(data).slots}
    assert (slots[("1.0.0", "active")].labelled, slots[("1.0.0", "active")].correct) == (2, 2)


def test_the_ring_grows_with_the_requests_kept_up_to_its_capacity() -> None:
    """An idle agent holds no 100,000-place ring (0.8 MiB, issue 24); a busy one holds no
    more than its capacity; an id beyond what was placed finds nothing."""
    store = FeedbackStore(capacity=1000)
    t = SlotTable()
    t.feedback = store
    model = serving(IDENTITY, "1.0.0")
    t.swap("main", model)
    key = answer_key("main", "active", model.ref)
    assert len(store._ring) == 0
    never_kept = store.new_id()
    ids = [store.new_id() for _ in range(10)]
    for rid in ids:
        store.keep(rid, key, 0)
    assert 11 <= len(store._ring) <= 32 and len(store) == 10
    issued_later = store.new_id()  # past the ring's end: nothing kept for it
    v = store.label("main", model.ref, [(never_kept, [0]), (issued_later, [0]), (ids[3], [0])], 3)
    assert (v.accepted, v.late) == (1, 2)
    for _ in range(5000):
        store.keep(store.new_id(), key, 0)
    assert len(store._ring) == 1000 and len(store) == 1000
