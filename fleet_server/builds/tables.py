"""A build job: (model version, profile, options) → a gated, signed bundle, or an error.

Jobs are cached by ``cache_key`` = sha256 of (model sha256, profile definition, calibration and
validation sha256, options, converter toolchain versions): asking for the same build again
returns the existing job (or its bundle) instead of compiling again.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, model_validator
from pydantic import Field as PydanticField
from sqlalchemy import JSON, Column, Text
from sqlmodel import Field, SQLModel

from fleet_server.api.schemas import RequestBody
from fleet_server.builds.states import BuildState
from fleet_server.database import UtcPublic


class BuildBase(SQLModel):
    id: str = Field(primary_key=True, max_length=32)
    profile: str = Field(max_length=63)
    cache_key: str = Field(max_length=64, index=True)
    #: A :class:`BuildState` (stored as its string).
    state: str = Field(max_length=16, index=True)
    options: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    #: Every candidate tried, with its parity report (see converters.build).
    candidates: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False)
    )
    bundle_sha256: str | None = Field(default=None, max_length=64)
    runtime: str | None = Field(default=None, max_length=32)
    precision: str | None = Field(default=None, max_length=8)
    error: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    peak_rss_mb: float | None = None
    created_at: datetime
    created_by: str = Field(max_length=128)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    #: The server process running it, and until when its claim holds (renewed while it runs;
    #: a build whose process died is taken over by another once the lease has run out).
    claimed_by: str | None = Field(default=None, max_length=128)
    lease_until: datetime | None = None
    #: How many times a process has started it (a build that kills its server each time
    #: fails after a few, instead of taking every server down in turn).
    attempts: int = 0


class Build(BuildBase, table=True):
    __tablename__ = "builds"

    model_version_id: int = Field(foreign_key="model_versions.id", index=True)
    log: str = Field(default="", sa_column=Column(Text, nullable=False))


class BuildCreate(RequestBody):
    model: str
    version: str
    profile: str
    #: Parity threshold overrides: max_abs_error, max_rel_l2, min_top1_agreement (null: off).
    thresholds: dict[str, float | None] = PydanticField(default_factory=dict)
    #: Only these runtimes (default: all the profile lists).
    runtimes: list[str] | None = None
    #: Only these precisions (default: the profile's).
    precisions: list[str] | None = None
    #: Inputs that are state or configuration, kept in fp32 by quantization (not
    #: calibrated). Default: scalars, integer inputs, and inputs not led by the batch axis.
    fp32_inputs: list[str] | None = None


class BuildPublic(BuildBase, UtcPublic):
    model: str
    version: str
    state: BuildState  # the stored string, as its enum
    seconds: float | None

    @model_validator(mode="after")
    def _duration(self) -> BuildPublic:
        if self.seconds is None and self.started_at and self.finished_at:
            self.seconds = (self.finished_at - self.started_at).total_seconds()
        return self


class BuildLog(BaseModel):
    id: str
    state: BuildState
    #: Log text from ``offset`` (characters) on; pass ``next_offset`` to follow it.
    text: str
    next_offset: int
