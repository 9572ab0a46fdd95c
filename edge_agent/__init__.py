"""edgefleet edge agent: the daemon that runs models on a device, and the shared contracts.

``edge_agent.protocol`` (MQTT topics and messages) and ``edge_agent.bundle`` (bundle format)
are imported by the fleet server and converters too; nothing here imports them back.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgefleet")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
