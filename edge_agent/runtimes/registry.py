"""Which runtime backends exist, and which are installed on this device."""

from __future__ import annotations

from typing import get_args

from edge_agent.contracts.errors import RuntimeBackendError
from edge_agent.runtimes.base import Runtime
from edge_agent.runtimes.litert import LiteRt
from edge_agent.runtimes.onnxruntime import OnnxRuntime
from edge_agent.runtimes.tensorrt import TensorRt
from firmware_profiles import RuntimeName

_BACKENDS: dict[str, type[Runtime]] = {b.name: b for b in (OnnxRuntime, LiteRt, TensorRt)}
# The one list of runtime names is the profiles' (firmware_profiles.RuntimeName): a profile
# may only name a runtime an agent has a backend for.
assert set(_BACKENDS) == set(get_args(RuntimeName)), "a profile runtime has no backend"


def get_runtime(name: str) -> Runtime:
    try:
        return _BACKENDS[name]()
    except KeyError:
        raise RuntimeBackendError(
            f"no runtime backend named {name!r} in this agent (have: {', '.join(_BACKENDS)})",
            reason="runtime_missing",
        ) from None


def available_runtimes() -> dict[str, str]:
    """Runtime name → installed version, for the runtimes whose library is importable."""
    found = {}
    for name, backend in _BACKENDS.items():
        version = backend().version()
        if version is not None:
            found[name] = version
    return found
