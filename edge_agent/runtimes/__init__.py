"""The runtime seam: load a model file, run it, close it.

    Runtime.load(path, options) -> LoadedModel
    LoadedModel.run(feeds) -> outputs
    LoadedModel.close()

Backends import their inference library lazily, so a device carries only the runtime it uses.
Any exception a backend's library raises comes out as :class:`RuntimeBackendError`.
"""

from edge_agent.runtimes.base import (
    LoadedModel,
    LoadOptions,
    Runtime,
    check_feeds,
    runtime_threads,
    usable_cpus,
)
from edge_agent.runtimes.registry import available_runtimes, get_runtime

__all__ = [
    "LoadOptions",
    "LoadedModel",
    "Runtime",
    "available_runtimes",
    "check_feeds",
    "get_runtime",
    "runtime_threads",
    "usable_cpus",
]
