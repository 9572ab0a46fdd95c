from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column
from sqlmodel import Field, SQLModel

from fleet_server.database import UtcPublic


class AuditEventBase(SQLModel):
    at: datetime = Field(index=True)
    actor: str = Field(max_length=128, index=True)
    #: dotted verb, e.g. ``model.upload``, ``rollout.create``, ``keyring.install``
    action: str = Field(max_length=64, index=True)
    target: str = Field(max_length=256)
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class AuditEvent(AuditEventBase, table=True):
    __tablename__ = "audit_events"

    id: int | None = Field(default=None, primary_key=True)


class AuditEventPublic(AuditEventBase, UtcPublic):
    id: int
