"""A rollout, its per-device targets and its event history.

- ``rollouts``: the plan (strategy, stages, rate, gates, timeouts) and where the engine is in
  it (state, stage, when the stage began and settled). Only the reconciler and the operator's
  commands change it, each under the rollout row's lock.
- ``rollout_targets``: one row per device the rollout has touched or will: which stage admitted
  it, when it was notified, what its slot held before (the rollback), and the server's own
  phase (``scheduled`` / ``notified`` / ``reverted`` / ``released`` / ``excluded``). What the
  device is doing is derived from its reports, so progress is never out of step with the fleet.
- ``rollout_events``: every decision (start, stage promoted, gate breach, abort, rollback,
  pause, …) with its figures, in order.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel
from sqlalchemy import JSON, Column, UniqueConstraint
from sqlmodel import Field, SQLModel

from edge_agent.protocol.lifecycle import SlotState
from fleet_server.database import UtcPublic
from fleet_server.hil.tables import HilJobPublic
from fleet_server.rollouts.spec import RolloutCreate

__all__ = [
    "GateFigure",
    "Rollout",
    "RolloutCreate",
    "RolloutEvent",
    "RolloutEventPublic",
    "RolloutPublic",
    "RolloutState",
    "RolloutTarget",
    "StageStatus",
    "TargetPhase",
    "TargetState",
    "TargetStatus",
]


class RolloutState(StrEnum):
    IN_PROGRESS = "in_progress"
    #: A stage passed its gates and waits for ``promote`` (manual approval).
    AWAITING_APPROVAL = "awaiting_approval"
    PAUSED = "paused"
    COMPLETED = "completed"
    #: Every target ended and some did not serve (no gate stopped it: all at once, no gates).
    FAILED = "failed"
    #: A gate breach or the operator stopped it; touched devices were rolled back.
    ABORTED = "aborted"
    #: A newer rollout on the same slot took its devices over.
    SUPERSEDED = "superseded"


ACTIVE_STATES = frozenset(
    {RolloutState.IN_PROGRESS, RolloutState.AWAITING_APPROVAL, RolloutState.PAUSED}
)


class TargetPhase(StrEnum):
    """The server's side of a target: what it has done for the device."""

    #: In the cohort and its stage, waiting for the rate limit (or a build).
    SCHEDULED = "scheduled"
    NOTIFIED = "notified"
    #: The rollout gave the device its previous version back.
    REVERTED = "reverted"
    #: It left the cohort: the rollout no longer acts on it (it keeps what it has).
    RELEASED = "released"
    #: No bundle for its profile could be built.
    EXCLUDED = "excluded"


class Rollout(SQLModel, table=True):
    __tablename__ = "rollouts"

    id: str = Field(primary_key=True, max_length=32)
    model_version_id: int = Field(foreign_key="model_versions.id", index=True)
    slot: str = Field(max_length=63)
    #: The older object form of a label selector (kept as it was given).
    selector: dict[str, str] | None = Field(default=None, sa_column=Column(JSON))
    created_at: datetime
    created_by: str = Field(max_length=128)
    #: The cohort: a selector expression, or null with a fixed ``devices`` list.
    cohort: str | None = Field(default=None, max_length=4096)
    devices: list[str] | None = Field(default=None, sa_column=Column(JSON))
    #: ``RolloutCreate.plan()``: strategy, stages, rate, gates, bake and timeouts.
    plan: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    state: str = Field(default=RolloutState.IN_PROGRESS, max_length=24, index=True)
    stage: int = 0
    stage_started_at: datetime | None = None
    #: When every device of the stage had ended (serving, failed or timed out): baking began.
    stage_settled_at: datetime | None = None
    ended_at: datetime | None = None
    #: Why it ended, when it did not complete.
    reason: str | None = Field(default=None, max_length=500)
    #: Gate figures of the current stage as last judged.
    figures: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    superseded_by: str | None = Field(default=None, max_length=32)
    #: Stage then activate: when the staged devices were told to switch (null before).
    activated_at: datetime | None = None
    #: Why it is ``awaiting_approval``: "stage" (passed, manual approval) or "evidence" (a
    #: gate had too little evidence within ``max_bake_s``).
    awaiting: str | None = Field(default=None, max_length=16)
    #: The stage whose missing evidence an operator accepted (``promote``).
    evidence_waived_stage: int | None = None


class RolloutTarget(SQLModel, table=True):
    __tablename__ = "rollout_targets"
    __table_args__ = (UniqueConstraint("rollout_id", "device_id"),)

    id: int | None = Field(default=None, primary_key=True)
    rollout_id: str = Field(foreign_key="rollouts.id", index=True, max_length=32)
    device_id: str = Field(foreign_key="devices.id", max_length=63)
    bundle_sha256: str | None = Field(default=None, foreign_key="bundles.sha256", max_length=64)
    #: The document that gave the device this rollout's version (0 before it was notified).
    desired_seq: int = 0
    phase: str = Field(default=TargetPhase.NOTIFIED, max_length=16)
    #: The stage (0-based) that admitted it.
    stage: int = 0
    added_at: datetime | None = None
    notified_at: datetime | None = None
    #: The slot's assignment before this rollout (``SlotAssignment`` as JSON); null: empty.
    previous: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    #: Why it is excluded or released.
    note: str | None = Field(default=None, max_length=500)
    #: Why the device did not take the version (failed, rolled back, refused), as it last
    #: reported it: kept after a fleet rollback has cleared the device's own record.
    error: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    #: When the device switched to the version (its own report of the switch, as first seen).
    switched_at: datetime | None = None


class RolloutEventBase(SQLModel):
    rollout_id: str = Field(index=True, max_length=32)
    at: datetime
    #: created / promoted / awaiting_approval / approved / gate_breach / aborted / rollback /
    #: paused / resumed / completed / failed / superseded / device_joined / device_released /
    #: device_excluded
    kind: str = Field(max_length=32)
    stage: int | None = None
    actor: str = Field(default="reconciler", max_length=128)
    message: str = Field(default="", max_length=1000)
    figures: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class RolloutEvent(RolloutEventBase, table=True):
    __tablename__ = "rollout_events"

    id: int | None = Field(default=None, primary_key=True)


class RolloutEventPublic(RolloutEventBase, UtcPublic):
    id: int


# --- API schemas -------------------------------------------------------------------------------


class TargetState(StrEnum):
    """Where one device is in a rollout: the server's phase, then its reports."""

    #: In the cohort, not notified yet (a later stage, the rate limit, a build).
    WAITING = "waiting"
    #: Notified; nothing reported for this version yet.
    PENDING = "pending"
    DOWNLOADING = "downloading"
    #: Stage then activate: loaded and warmed beside the active version, waiting to switch.
    STAGED = "staged"
    PROBATION = "probation"
    SERVING = "serving"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    REFUSED = "refused"
    TIMED_OUT = "timed_out"
    #: The rollout gave it its previous version back (fleet rollback).
    REVERTED = "reverted"
    RELEASED = "released"
    EXCLUDED = "excluded"


#: States in which a notified device's part is over (for this stage's purposes).
ENDED = frozenset(
    {
        TargetState.STAGED,
        TargetState.SERVING,
        TargetState.FAILED,
        TargetState.ROLLED_BACK,
        TargetState.REFUSED,
        TargetState.TIMED_OUT,
    }
)


class TargetStatus(BaseModel):
    device_id: str
    profile: str
    bundle_sha256: str | None
    runtime: str | None
    precision: str | None
    state: TargetState
    stage: int
    #: The slot's lifecycle state as the device last reported it.
    device_state: SlotState | None
    online: bool
    error: dict[str, Any] | None = None
    note: str | None = None


class GateFigure(BaseModel):
    gate: str
    #: The figure now (None: nothing to judge yet).
    value: float | None
    threshold: float
    #: True: within the threshold; False: breached; None: not enough evidence yet.
    ok: bool | None
    detail: str = ""
    #: False: the gate does not apply to this stage (the prediction shift when the previous
    #: version has no predictions in telemetry): it neither blocks nor passes anything.
    applies: bool = True
    #: What the figure was computed from (the prediction shift: both distributions).
    data: dict[str, Any] | None = None


class StageStatus(BaseModel):
    index: int
    percent: float
    #: targeted / notified / downloading / staged / active / failed / rolled_back / timed_out …
    counts: dict[str, int]
    #: pending / waiting_for_hil / running / baking / waiting_for_evidence / passed /
    #: awaiting_approval / …
    state: str


class RolloutPublic(BaseModel):
    id: str
    model: str
    version: str
    slot: str
    selector: dict[str, str] | str | None
    devices: list[str] | None = None
    strategy: str
    plan: dict[str, Any]
    created_at: datetime
    created_by: str
    state: RolloutState
    stage: int
    stage_started_at: datetime | None
    ended_at: datetime | None
    reason: str | None
    superseded_by: str | None
    activated_at: datetime | None = None
    counts: dict[str, int]
    stages: list[StageStatus]
    gates: list[GateFigure]
    targets: list[TargetStatus]
    events: list[RolloutEventPublic]
    #: The HIL stage's job (rig, state, verdict, report links), when the rollout has one.
    hil: HilJobPublic | None = None
    #: Awaiting approval of a passed stage ("stage") or of one whose gates lacked evidence
    #: within max_bake_s ("evidence").
    awaiting: str | None = None
