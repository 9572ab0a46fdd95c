"""edgefleet fleet server: model registry, devices, bundles, rollouts, and the MQTT control
plane, as a FastAPI + SQLModel service. Each domain package holds routes → service → tables.

The application factory is :func:`fleet_server.app.create_app`; the package itself imports
nothing heavy, so the CLI starts quickly.
"""
