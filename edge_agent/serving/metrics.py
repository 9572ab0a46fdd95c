"""The agent's own Prometheus metrics, for a node's Prometheus to scrape from the local API
(``GET /metrics``).

Read from the slot table at scrape time — each served model's counters, which the serving
path keeps anyway (:class:`~edge_agent.serving.stats.ModelStats`) — so a scrape costs the
request path nothing. Per slot and served version:

- ``edgefleet_agent_requests_total``, ``edgefleet_agent_errors_total``,
  ``edgefleet_agent_nonfinite_total`` (counters since the version was loaded);
- ``edgefleet_agent_latency_ms{quantile}``: p50/p95/p99 over the most recent requests
  (the window ``ModelStats`` keeps, 1000 requests);
- ``edgefleet_agent_telemetry_sample_rate`` and ``edgefleet_agent_telemetry_cost_ratio``:
  the drift sampling rate in force and the time fleet telemetry took as a share of inference;
- whatever else the agent registers in ``SlotTable.collectors`` (the telemetry outbox's
  pending and dropped batches).

Only aggregates: never an input or an output value.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import numpy as np

from edge_agent.serving.table import SlotTable

__all__ = ["CONTENT_TYPE", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
QUANTILES = (0.5, 0.95, 0.99)


class _SlotCollector:
    def __init__(self, table: SlotTable) -> None:
        self._table = table

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        labels = ["slot", "model", "version", "runtime"]
        requests = CounterMetricFamily(
            "edgefleet_agent_requests", "Requests served by the version", labels=labels
        )
        errors = CounterMetricFamily(
            "edgefleet_agent_errors", "Requests the runtime failed", labels=labels
        )
        nonfinite = CounterMetricFamily(
            "edgefleet_agent_nonfinite", "Responses with a NaN/inf output", labels=labels
        )
        latency = GaugeMetricFamily(
            "edgefleet_agent_latency_ms",
            "Model latency over the most recent requests",
            labels=[*labels, "quantile"],
        )
        rate = GaugeMetricFamily(
            "edgefleet_agent_telemetry_sample_rate",
            "Share of requests whose inputs and outputs drift accounting counts",
            labels=labels,
        )
        cost = GaugeMetricFamily(
            "edgefleet_agent_telemetry_cost_ratio",
            "Time spent on telemetry as a share of inference time, since the version loaded",
            labels=labels,
        )
        for slot, serving in sorted(self._table.snapshot().items()):
            ref = serving.ref
            values = [slot, ref.model, ref.version, ref.runtime]
            figures = serving.stats.snapshot()
            requests.add_metric(values, figures.requests)
            errors.add_metric(values, figures.errors)
            nonfinite.add_metric(values, figures.nonfinite)
            if figures.latency_ms:
                points = np.percentile(figures.latency_ms, [q * 100 for q in QUANTILES])
                for q, point in zip(QUANTILES, points, strict=True):
                    latency.add_metric([*values, str(q)], float(point))
            telemetry = serving.telemetry
            if telemetry.enabled:
                rate.add_metric(values, telemetry.sample_rate)
                if telemetry.inference_s > 0:
                    cost.add_metric(values, telemetry.spent_s / telemetry.inference_s)
        yield from (requests, errors, nonfinite, latency, rate, cost)


def render(table: SlotTable) -> bytes:
    """The Prometheus text exposition of ``table``'s models, as of now."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    extra = [table.feedback.collector()] if table.feedback is not None else []
    for collector in [_SlotCollector(table), *table.collectors, *extra]:
        registry.register(cast(Any, collector))
    return generate_latest(registry)
