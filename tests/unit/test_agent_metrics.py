"""The agent's own /metrics, scraped over its real local HTTP API: per slot and version,
requests, runtime errors, NaN/inf responses and recent latency quantiles, in the Prometheus
text format a node's Prometheus reads."""

from __future__ import annotations

import http.client

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.contracts.errors import RuntimeBackendError
from edge_agent.runtimes.fake import FakeModel
from edge_agent.serving import SlotTable, predict, start_http
from tests.unit.test_serving import SPEC_IN, SPEC_OUT, serving

X = np.ones((2, 3), np.float32)


class VendorError(Exception):
    pass


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/metrics")
    reply = conn.getresponse()
    assert reply.status == 200 and reply.getheader("Content-Type", "").startswith("text/plain")
    text = reply.read().decode()
    conn.close()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_what_the_serving_path_saw() -> None:
    model = FakeModel(SPEC_IN, SPEC_OUT, lambda f: {"y": f["x"] * 2})
    table = SlotTable()
    table.swap("main", serving(model, "1.0.0"))
    srv, _ = start_http(table, "127.0.0.1", 0)
    try:
        for _ in range(5):
            predict(table, "main", {"x": X})
        model.compute = lambda f: {"y": np.full_like(f["x"], np.nan)}
        predict(table, "main", {"x": X})
        model.raises = VendorError("device lost")
        with pytest.raises(RuntimeBackendError):
            predict(table, "main", {"x": X})
        samples = _scrape(srv.port)
    finally:
        srv.shutdown()
        srv.server_close()
    labels = (("model", "scaler"), ("runtime", "fake"), ("slot", "main"), ("version", "1.0.0"))
    assert samples[("edgefleet_agent_requests_total", labels)] == 7
    assert samples[("edgefleet_agent_errors_total", labels)] == 1
    assert samples[("edgefleet_agent_nonfinite_total", labels)] == 1
    p50 = samples[("edgefleet_agent_latency_ms", tuple(sorted((*labels, ("quantile", "0.5")))))]
    p99 = samples[("edgefleet_agent_latency_ms", tuple(sorted((*labels, ("quantile", "0.99")))))]
    assert 0 <= p50 <= p99
    # Only aggregates leave the agent: no sample carries a value of an input or output.
    assert all(name.startswith("edgefleet_agent_") for name, _ in samples)
