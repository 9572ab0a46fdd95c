"""The converter seam: one converter per target runtime turns the source ONNX into an artifact
for a (runtime, precision) candidate. ``converters.registry`` maps runtime names to them;
``converters.build`` tries a profile's candidates in order and gates each.

    Converter.produce(target, job) -> Artifact

A converter imports its toolchain lazily, inside ``produce``. It raises ``ConversionError``
naming what failed and what to do; it never loads or gates the artifact itself (the build does,
in ``Artifact.gate_runtime``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from converters.data import Dataset, model_batch
from edge_agent.bundle.manifest import TensorSpec
from edge_agent.contracts.errors import ConversionError, EdgefleetError
from edge_agent.runtimes import LoadOptions, get_runtime
from firmware_profiles import Profile

__all__ = ["Artifact", "ConversionJob", "Converter", "Log", "Target", "load_for_gate"]

Log = Callable[[str], None]


@dataclass(frozen=True)
class Target:
    runtime: str
    precision: str
    versions: str


@dataclass(frozen=True)
class ConversionJob:
    """What every candidate of one build converts from."""

    source: Path
    work: Path
    profile: Profile
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    calibration: Dataset | None
    log: Log
    #: Inputs quantization keeps in fp32 (state, configuration).
    fp32_inputs: frozenset[str] = frozenset()
    #: Every candidate the build will try (converters that share work plan for them all).
    targets: tuple[Target, ...] = ()
    #: The shape of one real feed of each input (from the validation set): what a converter
    #: that needs static shapes fixes dynamic dimensions to.
    feed_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return model_batch(self.inputs)

    def out_dir(self, target: Target) -> Path:
        path = self.work / f"{target.runtime}-{target.precision}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def require_calibration(self, target: Target) -> Dataset:
        if self.calibration is None:
            raise ConversionError(
                f"{target.precision} needs a calibration set (upload one with the model version)",
                reason="no_calibration",
            )
        return self.calibration


@dataclass
class Artifact:
    path: Path
    toolchain: dict[str, str]
    #: Which runtime the parity gate ran it in (for the report).
    evaluated_in: str
    #: Runtime used for the gate and the self-test vectors (differs from the target for
    #: TensorRT, which has no GPU here).
    gate_runtime: str
    #: Further files the bundle carries under ``model/`` (a TensorRT recipe).
    extra: list[Path] = field(default_factory=list)


class Converter(ABC):
    #: The runtime name this converter produces artifacts for.
    runtime: str
    #: Self-test tolerances (atol, rtol) per precision for this runtime's artifacts.
    selftest_tolerance: ClassVar[dict[str, tuple[float, float]]]

    @abstractmethod
    def produce(self, target: Target, job: ConversionJob) -> Artifact: ...


def onnx_versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def load_for_gate(runtime_name: str, path: Path) -> Any:
    """Load ``path`` in ``runtime_name`` on the build host, to gate it or compute vectors."""
    runtime = get_runtime(runtime_name)
    if runtime.version() is None:
        raise ConversionError(
            f"the {runtime_name} runtime is not installed on the build host, so its artifact "
            "cannot be checked",
            reason="runtime_missing",
        )
    try:
        return runtime.load(path, LoadOptions(threads=1))
    except EdgefleetError as e:
        raise ConversionError(
            f"the artifact does not load in {runtime_name}: {e.message}",
            reason="artifact_unusable",
        ) from e
