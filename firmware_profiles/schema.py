"""The profile schema. Every field is required unless it has a default; unknown keys are errors,
so a typo in a profile file fails loudly instead of silently falling back to a default."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Self

import msgspec
from msgspec import Meta, field
from packaging.specifiers import InvalidSpecifier, SpecifierSet

Precision = Literal["fp32", "fp16", "int8"]
RuntimeName = Literal["onnxruntime", "litert", "tensorrt"]
Family = Literal["jetson", "raspberry-pi", "x86"]
Arch = Literal["aarch64", "armv7l", "x86_64"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}\Z")


class _Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """msgspec, not pydantic: the agent loads the catalog, and a device pays for what its
    process imports (issue 24)."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = msgspec.to_builtins(self)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        """Raises ValueError (msgspec's ValidationError) naming the field."""
        return msgspec.convert(data, cls)

    def replace(self, **changes: Any) -> Self:
        return msgspec.structs.replace(self, **changes)


class RuntimeSpec(_Strict, frozen=True, kw_only=True):
    name: RuntimeName
    #: PEP 440 range of runtime versions a bundle for this profile may require, e.g. ">=1.17".
    versions: str
    precisions: Annotated[list[Precision], Meta(min_length=1)]
    #: onnxruntime execution providers in order of preference (ignored by other runtimes).
    providers: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        try:
            SpecifierSet(self.versions)
        except InvalidSpecifier as e:
            raise ValueError(f"versions: not a PEP 440 version range: {self.versions!r}") from e


class Firmware(_Strict, frozen=True, kw_only=True):
    os: str
    glibc_min: str
    jetpack: str | None = None
    l4t: str | None = None
    kernel_min: str | None = None


class Accelerator(_Strict, frozen=True, kw_only=True):
    kind: Literal["none", "cuda"]
    #: CUDA compute capability ("8.7" for Orin); engines are keyed on it.
    cuda_sm: str | None = None
    dla_cores: Annotated[int, Meta(ge=0)] = 0
    cpu_features: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind == "cuda" and not self.cuda_sm:
            raise ValueError("accelerator.kind = 'cuda' needs cuda_sm")


class Resources(_Strict, frozen=True, kw_only=True):
    threads: Annotated[int, Meta(gt=0, le=256)]
    memory_budget_mb: Annotated[int, Meta(gt=0)]
    max_bundle_bytes: Annotated[int, Meta(gt=0)]


class ThresholdOverride(_Strict, frozen=True, kw_only=True):
    """Thresholds for one precision; unset ones come from the profile's defaults, and
    ``inf`` switches a check off (max abs error means little on unnormalised logits)."""

    max_abs_error: Annotated[float, Meta(gt=0)] | None = None
    max_rel_l2: Annotated[float, Meta(gt=0)] | None = None
    min_top1_agreement: Annotated[float, Meta(ge=0, le=1)] | None = None


class ParityThresholds(_Strict, frozen=True, kw_only=True):
    """How closely a compiled artifact must agree with the original on the validation set."""

    max_abs_error: Annotated[float, Meta(gt=0)]
    max_rel_l2: Annotated[float, Meta(gt=0)]
    min_top1_agreement: Annotated[float, Meta(ge=0, le=1)]
    fp16: ThresholdOverride | None = None
    int8: ThresholdOverride | None = None

    def for_precision(self, precision: str) -> dict[str, float | None]:
        """Threshold name → value (None: not checked) for artifacts of ``precision``."""
        values: dict[str, float | None] = {
            "max_abs_error": self.max_abs_error,
            "max_rel_l2": self.max_rel_l2,
            "min_top1_agreement": self.min_top1_agreement,
        }
        override = {"fp16": self.fp16, "int8": self.int8}.get(precision)
        if override is not None:
            values.update({k: v for k, v in override.to_dict().items() if v is not None})
        return {k: None if v == float("inf") else v for k, v in values.items()}


class LatencyBudget(_Strict, frozen=True, kw_only=True):
    p95_ms: Annotated[float, Meta(gt=0)]


class Profile(_Strict, frozen=True, kw_only=True):
    name: str
    family: Family
    arch: Arch
    description: str
    firmware: Firmware
    accelerator: Accelerator
    #: Precisions in order of preference; a build tries them in this order.
    precisions: Annotated[list[Precision], Meta(min_length=1)]
    #: Runtimes in order of preference; a build targets the first one it can produce.
    runtimes: Annotated[list[RuntimeSpec], Meta(min_length=1)]
    resources: Resources
    parity: ParityThresholds
    latency: LatencyBudget

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError("name: must be lowercase letters, digits and '-', 2-63 characters")
        names = [r.name for r in self.runtimes]
        if len(set(names)) != len(names):
            raise ValueError(f"runtimes are listed twice: {names}")
        if "tensorrt" in names and self.accelerator.kind != "cuda":
            raise ValueError("runtime 'tensorrt' needs accelerator.kind = 'cuda'")

    def runtime(self, name: str) -> RuntimeSpec | None:
        return next((r for r in self.runtimes if r.name == name), None)
