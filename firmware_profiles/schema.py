"""The profile schema. Every field is required unless it has a default; unknown keys are errors,
so a typo in a profile file fails loudly instead of silently falling back to a default."""

from __future__ import annotations

import re
from typing import Literal

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Precision = Literal["fp32", "fp16", "int8"]
RuntimeName = Literal["onnxruntime", "litert", "tensorrt"]
Family = Literal["jetson", "raspberry-pi", "x86"]
Arch = Literal["aarch64", "armv7l", "x86_64"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RuntimeSpec(_Strict):
    name: RuntimeName
    #: PEP 440 range of runtime versions a bundle for this profile may require, e.g. ">=1.17".
    versions: str
    precisions: list[Precision] = Field(min_length=1)
    #: onnxruntime execution providers in order of preference (ignored by other runtimes).
    providers: list[str] = Field(default_factory=list)

    @field_validator("versions")
    @classmethod
    def _specifier(cls, value: str) -> str:
        try:
            SpecifierSet(value)
        except InvalidSpecifier as e:
            raise ValueError(f"not a PEP 440 version range: {value!r}") from e
        return value


class Firmware(_Strict):
    os: str
    glibc_min: str
    jetpack: str | None = None
    l4t: str | None = None
    kernel_min: str | None = None


class Accelerator(_Strict):
    kind: Literal["none", "cuda"]
    #: CUDA compute capability ("8.7" for Orin); engines are keyed on it.
    cuda_sm: str | None = None
    dla_cores: int = Field(default=0, ge=0)
    cpu_features: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _cuda_needs_sm(self) -> Accelerator:
        if self.kind == "cuda" and not self.cuda_sm:
            raise ValueError("accelerator.kind = 'cuda' needs cuda_sm")
        return self


class Resources(_Strict):
    threads: int = Field(gt=0, le=256)
    memory_budget_mb: int = Field(gt=0)
    max_bundle_bytes: int = Field(gt=0)


class ThresholdOverride(_Strict):
    """Thresholds for one precision; unset ones come from the profile's defaults, and
    ``inf`` switches a check off (max abs error means little on unnormalised logits)."""

    max_abs_error: float | None = Field(default=None, gt=0)
    max_rel_l2: float | None = Field(default=None, gt=0)
    min_top1_agreement: float | None = Field(default=None, ge=0, le=1)


class ParityThresholds(_Strict):
    """How closely a compiled artifact must agree with the original on the validation set."""

    max_abs_error: float = Field(gt=0)
    max_rel_l2: float = Field(gt=0)
    min_top1_agreement: float = Field(ge=0, le=1)
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
            values.update(override.model_dump(exclude_none=True))
        return {k: None if v == float("inf") else v for k, v in values.items()}


class LatencyBudget(_Strict):
    p95_ms: float = Field(gt=0)


class Profile(_Strict):
    name: str
    family: Family
    arch: Arch
    description: str
    firmware: Firmware
    accelerator: Accelerator
    #: Precisions in order of preference; a build tries them in this order.
    precisions: list[Precision] = Field(min_length=1)
    #: Runtimes in order of preference; a build targets the first one it can produce.
    runtimes: list[RuntimeSpec] = Field(min_length=1)
    resources: Resources
    parity: ParityThresholds
    latency: LatencyBudget

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must be lowercase letters, digits and '-', 2-63 characters")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        names = [r.name for r in self.runtimes]
        if len(set(names)) != len(names):
            raise ValueError(f"runtimes are listed twice: {names}")
        if "tensorrt" in names and self.accelerator.kind != "cuda":
            raise ValueError("runtime 'tensorrt' needs accelerator.kind = 'cuda'")
        return self

    def runtime(self, name: str) -> RuntimeSpec | None:
        return next((r for r in self.runtimes if r.name == name), None)
