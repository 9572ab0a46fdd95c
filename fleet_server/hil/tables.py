"""Rigs registered with the server, and HIL jobs.

- ``hil_rigs``: a rig by name, with its devices (id, profile, kind) and the rig file as it was
  registered. Its devices carry the label ``hil-rig=<name>``; a selector's cohort never
  includes a device with that label (rig devices are reached by id only).
- ``hil_jobs``: one per rollout that has a HIL stage: which rig, version and scenarios; its
  state (``pending`` → ``running`` → ``passed`` / ``failed`` / ``timed_out``), the runner that
  holds it and the hash of its lease token, the deadline, and the stored reports (sha256 of
  ``junit.xml`` and ``report.html`` in the artifact store).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Column
from sqlmodel import Field, SQLModel

from fleet_server.database import UtcPublic

__all__ = ["RIG_LABEL", "HilJob", "HilJobPublic", "HilJobState", "HilRig", "HilRigPublic"]

#: The label every rig device carries; selector cohorts skip devices that have it.
RIG_LABEL = "hil-rig"


class HilJobState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    PASSED = "passed"
    FAILED = "failed"
    #: No verdict by the deadline (no runner, or a runner that died or went silent).
    TIMED_OUT = "timed_out"
    #: The rollout ended (aborted by the operator, superseded) before a verdict.
    CANCELLED = "cancelled"


OPEN_STATES = frozenset({HilJobState.PENDING, HilJobState.RUNNING})


class HilRigBase(SQLModel):
    name: str = Field(primary_key=True, max_length=63)
    #: [{id, profile, kind}] as the rig file names them.
    devices: list[dict[str, str]] = Field(sa_column=Column(JSON, nullable=False))
    registered_at: datetime
    registered_by: str = Field(max_length=128)


class HilRig(HilRigBase, table=True):
    __tablename__ = "hil_rigs"

    #: The rig file as registered (TOML).
    text: str = ""


class HilRigPublic(HilRigBase, UtcPublic):
    pass


class HilJobBase(SQLModel):
    id: str = Field(primary_key=True, max_length=32)
    rollout_id: str = Field(foreign_key="rollouts.id", index=True, max_length=32)
    rig: str = Field(foreign_key="hil_rigs.name", index=True, max_length=63)
    model: str = Field(max_length=128)
    version: str = Field(max_length=64)
    scenarios: list[str] | None = Field(default=None, sa_column=Column(JSON))
    state: str = Field(default=HilJobState.PENDING, max_length=16, index=True)
    created_at: datetime
    deadline_at: datetime
    claimed_at: datetime | None = None
    claimed_by: str | None = Field(default=None, max_length=128)
    finished_at: datetime | None = None
    reason: str | None = Field(default=None, max_length=1000)
    #: The runner's result.json (per scenario and device).
    summary: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    junit_sha256: str | None = Field(default=None, max_length=64)
    report_sha256: str | None = Field(default=None, max_length=64)


class HilJob(HilJobBase, table=True):
    __tablename__ = "hil_jobs"

    lease_hash: str | None = Field(default=None, max_length=64)


class HilJobPublic(HilJobBase, UtcPublic):
    report_url: str | None = None
    junit_url: str | None = None
