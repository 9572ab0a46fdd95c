"""What a server process holds for telemetry: the bundle catalog, the Prometheus registry
(fleet collector + ingest counters), the ingest subscriber, and alert refreshing after each
store (throttled per model)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy.engine import Engine
from sqlmodel import Session

from fleet_server.artifacts import ArtifactStore
from fleet_server.telemetry.alerts import refresh_alerts
from fleet_server.telemetry.catalog import BundleCatalog
from fleet_server.telemetry.ingest import (
    SHARED_FILTER,
    IngestConnection,
    IngestCounters,
    TelemetryIngest,
)
from fleet_server.telemetry.metrics import FleetCollector
from fleet_server.telemetry.store import Outcome

if TYPE_CHECKING:  # the control plane is handed in; telemetry does not build one
    from fleet_server.control.plane import ControlPlane

__all__ = ["TelemetryService"]

log = logging.getLogger(__name__)

#: Alerts of one model are re-evaluated at most this often.
ALERT_EVERY_S = 2.0


class TelemetryService:
    def __init__(
        self,
        engine: Engine,
        store: ArtifactStore,
        *,
        bucket_s: int = 60,
        window_s: float = 900,
        metrics_window_s: float = 300,
        ingest_metrics_dir: Path | None = None,
    ) -> None:
        """``ingest_metrics_dir``: reports are ingested by other processes (``edgefleet
        serve``'s ingest processes), whose counters are read from there (prometheus-client's
        multiprocess files) instead of this process's own."""
        self.engine = engine
        self.bundles = BundleCatalog(store)
        self.registry = CollectorRegistry()
        FleetCollector(engine, self.bundles, window_s=metrics_window_s).register(self.registry)
        if ingest_metrics_dir is None:
            self.counters = IngestCounters(self.registry)
            #: Where the other report counters of this process go (the control plane's).
            self.report_registry: CollectorRegistry = self.registry
        else:
            MultiProcessCollector(self.registry, path=str(ingest_metrics_dir))  # type: ignore[no-untyped-call]
            self.counters = IngestCounters(CollectorRegistry())
            self.report_registry = CollectorRegistry()
        self.bucket_s = bucket_s
        self.window_s = window_s
        self.ingest: TelemetryIngest | None = None
        self.connection: IngestConnection | None = None
        self._evaluated: dict[str, float] = {}
        self._lock = threading.Lock()
        self._scheduled: set[str] = set()
        #: One evaluation at a time: two (the ingest thread's and a timer's) reading "no open
        #: alert" at once would both open one.
        self._refreshing = threading.Lock()

    def start_ingest(
        self,
        mqtt_url: str | None = None,
        *,
        control: ControlPlane | None = None,
        tls: tuple[Path | None, Path | None, Path | None] = (None, None, None),
        credentials: tuple[str, str] | None = None,
    ) -> TelemetryIngest:
        """Ingest over the control plane's connection (the API server: call before the
        control plane starts), or over a connection of its own to ``mqtt_url``."""
        connection: IngestConnection | None = None
        publish: Callable[[str, bytes], None]
        if control is not None:
            publish = control.publish
        else:
            if mqtt_url is None:
                raise ValueError("telemetry ingest needs a broker URL or a control plane")
            connection = IngestConnection(
                mqtt_url,
                lambda topic, payload: ingest.offer(topic, payload),
                tls=tls,
                credentials=credentials,
            )
            publish = connection.publish
        ingest = TelemetryIngest(
            self.engine,
            self.bundles,
            self.counters,
            publish=publish,
            bucket_s=self.bucket_s,
            on_stored=self._stored,
        )
        ingest.start()
        if control is not None:
            control.attach_telemetry(SHARED_FILTER, ingest.offer)
        if connection is not None:
            connection.start()
        self.ingest, self.connection = ingest, connection
        return ingest

    def stop(self) -> None:
        if self.connection is not None:
            self.connection.stop()
        if self.ingest is not None:
            self.ingest.stop()

    def _stored(self, outcome: Outcome) -> None:
        """Re-evaluate the alerts of the models that got figures; a model evaluated less than
        ``ALERT_EVERY_S`` ago is evaluated once more when that time is up."""
        now = time.monotonic()
        due: set[str] = set()
        with self._lock:
            for model, _version, _profile in outcome.touched:
                wait = self._evaluated.get(model, -ALERT_EVERY_S) + ALERT_EVERY_S - now
                if wait <= 0:
                    due.add(model)
                    self._evaluated[model] = now
                elif model not in self._scheduled:
                    self._scheduled.add(model)
                    timer = threading.Timer(wait, self._later, args=(model,))
                    timer.daemon = True
                    timer.start()
        if due:
            self.refresh(due)

    def _later(self, model: str) -> None:
        with self._lock:
            self._scheduled.discard(model)
            self._evaluated[model] = time.monotonic()
        self.refresh({model})

    def refresh(self, models: set[str]) -> None:
        try:
            with self._refreshing, Session(self.engine, expire_on_commit=False) as session:
                opened = refresh_alerts(session, self.bundles, models, window_s=self.window_s)
        except Exception:
            log.exception("alert evaluation failed for %s", sorted(models))
            return
        for alert in opened:
            log.warning(
                "alert: %s %s on %s: %s", alert.model, alert.version, alert.profile, alert.message
            )
