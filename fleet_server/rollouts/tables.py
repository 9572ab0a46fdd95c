"""A rollout and its per-device targets. Progress is derived from what devices report, so it
is never out of step with the fleet."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel
from pydantic import Field as PydanticField
from sqlalchemy import JSON, Column, UniqueConstraint
from sqlmodel import Field, SQLModel

from edge_agent.protocol.desired import SLOT_PATTERN
from edge_agent.protocol.lifecycle import SlotState
from fleet_server.api.schemas import RequestBody


class Rollout(SQLModel, table=True):
    __tablename__ = "rollouts"

    id: str = Field(primary_key=True, max_length=32)
    model_version_id: int = Field(foreign_key="model_versions.id", index=True)
    slot: str = Field(max_length=63)
    selector: dict[str, str] | None = Field(default=None, sa_column=Column(JSON))
    created_at: datetime
    created_by: str = Field(max_length=128)


class RolloutTarget(SQLModel, table=True):
    __tablename__ = "rollout_targets"
    __table_args__ = (UniqueConstraint("rollout_id", "device_id"),)

    id: int | None = Field(default=None, primary_key=True)
    rollout_id: str = Field(foreign_key="rollouts.id", index=True, max_length=32)
    device_id: str = Field(foreign_key="devices.id", max_length=63)
    bundle_sha256: str = Field(foreign_key="bundles.sha256", max_length=64)
    desired_seq: int


class RolloutCreate(RequestBody):
    model: str
    version: str
    #: Explicit device ids…
    devices: list[str] | None = None
    #: …or a label selector (all labels must match).
    selector: dict[str, str] | None = None
    #: The slot on the device; default: the model name (shadows: "<shadow_of>-shadow").
    slot: str | None = PydanticField(default=None, pattern=SLOT_PATTERN)
    #: Shadow mode: run this version beside the given active slot on a share of its live
    #: requests, never answering with it; the devices report agreement and latency of both.
    shadow_of: str | None = PydanticField(default=None, pattern=SLOT_PATTERN)
    sample_rate: float = PydanticField(default=0.1, ge=0, le=1)


class TargetState(StrEnum):
    """Where one device is in a rollout, read from its reports."""

    PENDING = "pending"
    PROBATION = "probation"
    SERVING = "serving"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    REFUSED = "refused"


class RolloutState(StrEnum):
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"


class TargetStatus(BaseModel):
    device_id: str
    profile: str
    bundle_sha256: str
    runtime: str
    precision: str
    state: TargetState
    #: The slot's lifecycle state as the device last reported it.
    device_state: SlotState | None
    online: bool
    error: dict[str, Any] | None = None


class RolloutPublic(BaseModel):
    id: str
    model: str
    version: str
    slot: str
    selector: dict[str, str] | None
    created_at: datetime
    created_by: str
    state: RolloutState
    counts: dict[str, int]
    targets: list[TargetStatus]
