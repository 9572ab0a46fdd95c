"""edgefleet edge agent: the daemon that runs models on a device, and the shared contracts.

``edge_agent.protocol`` (MQTT topics and messages) and ``edge_agent.bundle`` (bundle format)
are imported by the fleet server and converters too; nothing here imports them back.
"""

#: The package's one version (pyproject.toml reads it from here). A literal, not
#: ``importlib.metadata``: that module and what it brings (email, zipfile, csv) cost a device
#: process ~0.8 MiB resident (issue 24).
__version__ = "0.1.0"

__all__ = ["__version__"]
