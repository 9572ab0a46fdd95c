"""What a server process holds for telemetry: the bundle catalog, the Prometheus registry
(fleet collector + ingest counters), the ingest subscriber, and alert refreshing after each
store (throttled per model)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine
from sqlmodel import Session

from fleet_server.artifacts import ArtifactStore
from fleet_server.telemetry.alerts import refresh_alerts
from fleet_server.telemetry.ingest import IngestCounters, TelemetryIngest
from fleet_server.telemetry.metrics import FleetCollector
from fleet_server.telemetry.store import BundleCatalog, Outcome

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
    ) -> None:
        self.engine = engine
        self.bundles = BundleCatalog(store)
        self.registry = CollectorRegistry()
        FleetCollector(engine, self.bundles, window_s=metrics_window_s).register(self.registry)
        self.counters = IngestCounters(self.registry)
        self.bucket_s = bucket_s
        self.window_s = window_s
        self.ingest: TelemetryIngest | None = None
        self._evaluated: dict[str, float] = {}
        self._lock = threading.Lock()
        self._scheduled: set[str] = set()

    def start_ingest(
        self,
        mqtt_url: str,
        *,
        tls: tuple[Path | None, Path | None, Path | None] = (None, None, None),
        credentials: tuple[str, str] | None = None,
    ) -> TelemetryIngest:
        self.ingest = TelemetryIngest(
            self.engine,
            mqtt_url,
            self.bundles,
            self.counters,
            bucket_s=self.bucket_s,
            tls=tls,
            credentials=credentials,
            on_stored=self._stored,
        )
        self.ingest.start()
        return self.ingest

    def stop(self) -> None:
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
            with Session(self.engine, expire_on_commit=False) as session:
                opened = refresh_alerts(session, self.bundles, models, window_s=self.window_s)
        except Exception:
            log.exception("alert evaluation failed for %s", sorted(models))
            return
        for alert in opened:
            log.warning(
                "alert: %s %s on %s: %s", alert.model, alert.version, alert.profile, alert.message
            )
