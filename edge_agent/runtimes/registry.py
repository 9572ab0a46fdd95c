"""Which runtime backends exist, and which are installed on this device."""

from __future__ import annotations

from edge_agent.contracts.errors import RuntimeBackendError
from edge_agent.runtimes.base import Runtime
from edge_agent.runtimes.litert import LiteRt
from edge_agent.runtimes.onnxruntime import OnnxRuntime
from edge_agent.runtimes.tensorrt import TensorRt

_BACKENDS: dict[str, type[Runtime]] = {
    OnnxRuntime.name: OnnxRuntime,
    LiteRt.name: LiteRt,
    TensorRt.name: TensorRt,
}


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
