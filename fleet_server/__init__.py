"""edgefleet fleet server: model registry, devices, bundles, rollouts, and the MQTT control
plane, as a FastAPI + SQLModel service. Each domain package holds routes → service → tables."""

from fleet_server.app import create_app
from fleet_server.settings import Settings

__all__ = ["Settings", "create_app"]
