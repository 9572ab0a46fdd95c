"""``GET /metrics``: the fleet in Prometheus text format (prometheus-client).

Read from the database at scrape time (a custom collector), so every server process answers
for the whole fleet: devices by state and profile, inference requests and errors per model
version and profile (totals since the first batch), fleet latency quantiles and drift PSI over
the last ``window_s`` (merged sketches, summed histograms). Ingest counters
(``edgefleet_telemetry_rejected_total{reason}``, ``edgefleet_telemetry_batches_total``) are
this process's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from fleet_server.devices.tables import Device
from fleet_server.telemetry.catalog import BundleCatalog
from fleet_server.telemetry.query import summarize
from fleet_server.telemetry.tables import TelemetryRollup, TelemetryStream

__all__ = ["FleetCollector"]

QUANTILES = (("0.5", "p50_ms"), ("0.95", "p95_ms"), ("0.99", "p99_ms"))


class FleetCollector(Collector):
    def __init__(self, engine: Engine, bundles: BundleCatalog, *, window_s: float = 300) -> None:
        self._engine = engine
        self._bundles = bundles
        self._window_s = window_s

    def register(self, registry: CollectorRegistry) -> None:
        registry.register(self)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        with Session(self._engine) as session:
            devices = GaugeMetricFamily(
                "edgefleet_devices",
                "Enrolled devices by state and profile",
                labels=["state", "profile"],
            )
            retired = col(Device.decommissioned_at).is_not(None)
            for online, profile, gone, n in session.exec(
                select(Device.online, Device.profile, retired, func.count()).group_by(
                    col(Device.online), col(Device.profile), retired
                )
            ).all():
                state = "decommissioned" if gone else "online" if online else "offline"
                devices.add_metric([state, profile], n)
            yield devices

            labels = ["model", "version", "profile"]
            requests = CounterMetricFamily(
                "edgefleet_inference_requests", "Requests served on devices", labels=labels
            )
            errors = CounterMetricFamily(
                "edgefleet_inference_errors", "Requests that failed on devices", labels=labels
            )
            nonfinite = CounterMetricFamily(
                "edgefleet_inference_nonfinite",
                "Responses with NaN/inf outputs on devices",
                labels=labels,
            )
            labelled = CounterMetricFamily(
                "edgefleet_feedback_labelled",
                "Predictions applications labelled (ground truth from the field), active role",
                labels=labels,
            )
            correct = CounterMetricFamily(
                "edgefleet_feedback_correct",
                "Labelled predictions that were right, active role",
                labels=labels,
            )
            late = CounterMetricFamily(
                "edgefleet_feedback_late",
                "Labels that found no kept prediction (unknown or expired request ids)",
                labels=labels,
            )
            totals = session.execute(
                sa_select(
                    col(TelemetryRollup.model),
                    col(TelemetryRollup.version),
                    col(TelemetryRollup.profile),
                    func.sum(TelemetryRollup.requests),
                    func.sum(TelemetryRollup.errors),
                    func.sum(TelemetryRollup.nonfinite),
                    func.sum(TelemetryRollup.labelled),
                    func.sum(TelemetryRollup.correct),
                    func.sum(TelemetryRollup.late),
                )
                .where(col(TelemetryRollup.role) == "active")
                .group_by(
                    col(TelemetryRollup.model),
                    col(TelemetryRollup.version),
                    col(TelemetryRollup.profile),
                )
            ).all()
            for model, version, profile, req, err, nf, lab, cor, lt in totals:
                requests.add_metric([model, version, profile], float(req or 0))
                errors.add_metric([model, version, profile], float(err or 0))
                nonfinite.add_metric([model, version, profile], float(nf or 0))
                labelled.add_metric([model, version, profile], float(lab or 0))
                correct.add_metric([model, version, profile], float(cor or 0))
                late.add_metric([model, version, profile], float(lt or 0))
            yield requests
            yield errors
            yield nonfinite
            yield labelled
            yield correct
            yield late

            latency = GaugeMetricFamily(
                "edgefleet_inference_latency_ms",
                f"Fleet latency quantiles over the last {self._window_s:.0f} s (merged sketches)",
                labels=[*labels, "quantile"],
            )
            drift = GaugeMetricFamily(
                "edgefleet_drift_psi",
                f"Worst PSI per tensor over the last {self._window_s:.0f} s",
                labels=[*labels, "tensor"],
            )
            accuracy = GaugeMetricFamily(
                "edgefleet_online_accuracy",
                f"Labelled predictions that were right over the last {self._window_s:.0f} s",
                labels=labels,
            )
            since = datetime.now(UTC) - timedelta(seconds=self._window_s)
            for model in sorted({row[0] for row in totals}):
                for h in summarize(session, self._bundles, model, since=since):
                    if h.accuracy is not None:
                        accuracy.add_metric([h.model, h.version, h.profile], h.accuracy)
                    for q, attr in QUANTILES:
                        value = getattr(h, attr)
                        if value is not None:
                            latency.add_metric([h.model, h.version, h.profile, q], value)
                    for d in h.drift:
                        drift.add_metric([h.model, h.version, h.profile, d.tensor], d.psi)
            yield latency
            yield drift
            yield accuracy

            dropped = GaugeMetricFamily(
                "edgefleet_telemetry_device_dropped_batches",
                "Batches device outboxes dropped (full or too old), as last reported",
            )
            total = session.exec(select(func.sum(TelemetryStream.dropped_batches_total))).one()
            dropped.add_metric([], float(total or 0))
            yield dropped
