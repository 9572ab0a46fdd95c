"""Fleet telemetry: ingest ($share/), rollups, drift, alerts, /metrics."""
