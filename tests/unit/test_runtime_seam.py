"""The runtime seam turns whatever a backend raises into the project's own error, in one
place: a foreign exception on live traffic is counted, answered with a JSON 500 on a kept-alive
connection, and seen by probation; in a self-test or a load it fails the step with a reason."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import numpy as np
import pytest

from edge_agent.bundle import VerifiedBundle
from edge_agent.bundle.selftest import pack
from edge_agent.contracts.errors import RequestError, RuntimeBackendError
from edge_agent.lifecycle.probation import ProbationPolicy, check_health
from edge_agent.lifecycle.staging import stage
from edge_agent.runtimes import LoadOptions
from edge_agent.runtimes.fake import FakeModel, FakeRuntime
from edge_agent.serving import SlotTable, predict, start_http
from tests.unit.test_serving import SPEC_IN, SPEC_OUT, scaler, serving

X = np.ones((2, 3), np.float32)


class VendorError(Exception):
    """An exception type no part of edgefleet knows, as a runtime library might raise."""


def _failing() -> FakeModel:
    return FakeModel(SPEC_IN, SPEC_OUT, raises=VendorError("device lost"))


def test_a_foreign_exception_becomes_a_counted_runtime_error() -> None:
    table = SlotTable()
    table.swap("main", serving(_failing(), "1.0.0"))
    with pytest.raises(RuntimeBackendError) as e:
        predict(table, "main", {"x": X})
    assert e.value.reason == "inference_failed"
    assert "VendorError: device lost" in e.value.message
    assert isinstance(e.value.__cause__, VendorError)
    stats = table.snapshot()["main"].stats.snapshot()
    assert (stats.requests, stats.errors) == (1, 1)


def test_a_callers_mistake_is_not_wrapped_nor_counted() -> None:
    table = SlotTable()
    table.swap("main", serving(_failing(), "1.0.0"))
    with pytest.raises(RequestError):
        predict(table, "main", {"wrong": X})
    assert table.snapshot()["main"].stats.snapshot().errors == 0


def test_probation_sees_foreign_failures() -> None:
    table = SlotTable()
    table.swap("main", serving(_failing(), "2.0.0"))
    for _ in range(3):
        with pytest.raises(RuntimeBackendError):
            predict(table, "main", {"x": X})
    held = table.snapshot()["main"]
    breach = check_health(held.stats.snapshot(), held.probe_stats.snapshot(), ProbationPolicy())
    assert breach is not None and breach.reason == "error_rate"


def test_http_answers_a_foreign_failure_with_json_and_keeps_the_connection() -> None:
    table = SlotTable()
    model = scaler(2.0)
    table.swap("main", serving(model, "1.0.0"))
    srv, _ = start_http(table, "127.0.0.1", 0)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        body = json.dumps({"inputs": {"x": X.tolist()}})
        headers = {"Content-Type": "application/json"}
        model.raises = VendorError("device lost")
        conn.request("POST", "/v1/models/main:predict", body=body, headers=headers)
        reply = conn.getresponse()
        error = json.loads(reply.read())["error"]
        assert reply.status == 500 and error["code"] == "inference_failed"
        assert "VendorError" in error["message"]
        model.raises = None
        conn.request("POST", "/v1/models/main:predict", body=body, headers=headers)
        reply = conn.getresponse()
        assert reply.status == 200 and json.loads(reply.read())["outputs"]["y"][0] == [2.0] * 3
        conn.close()
    finally:
        srv.shutdown()
        srv.server_close()
    stats = table.snapshot()["main"].stats.snapshot()
    assert (stats.requests, stats.errors) == (2, 1)


def _bundle(tmp_path: Path) -> VerifiedBundle:
    (tmp_path / "selftest.npz").write_bytes(pack({"x": X}, {"y": X * 2}))
    return VerifiedBundle(serving(scaler(2.0), "1.0.0").manifest, tmp_path)


def test_a_self_test_that_raises_fails_staging_with_a_reason(tmp_path: Path) -> None:
    verified = _bundle(tmp_path)
    model = _failing()
    with pytest.raises(RuntimeBackendError) as e:
        stage(verified, serving(model, "1.0.0").ref, FakeRuntime(model), LoadOptions())
    assert e.value.reason == "inference_failed"
    assert model.closed  # a model that failed staging is released


def test_a_load_that_raises_fails_with_load_failed(tmp_path: Path) -> None:
    verified = _bundle(tmp_path)
    runtime = FakeRuntime(scaler(2.0), load_error=MemoryError("out of device memory"))
    with pytest.raises(RuntimeBackendError) as e:
        stage(verified, serving(scaler(2.0), "1.0.0").ref, runtime, LoadOptions())
    assert e.value.reason == "load_failed" and "MemoryError" in e.value.message


def test_staging_with_a_working_fake_passes_the_self_test(tmp_path: Path) -> None:
    verified = _bundle(tmp_path)
    model = scaler(2.0)
    staged = stage(verified, serving(model, "1.0.0").ref, FakeRuntime(model), LoadOptions())
    assert staged.model is model and model.runs == 4  # the self-test, then 3 warm-up runs
