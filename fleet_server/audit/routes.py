"""/v1/audit: query the audit log (admin)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query

from fleet_server.api.deps import Admin, SessionDep
from fleet_server.audit import service
from fleet_server.audit.tables import AuditEventPublic

router = APIRouter(prefix="/v1/audit", tags=["audit"])


@router.get("", response_model=list[AuditEventPublic])
def audit(
    session: SessionDep,
    _: Admin,
    actor: str | None = None,
    action: Annotated[str | None, Query(description="e.g. rollout or rollout.create")] = None,
    target: str | None = None,
    since: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AuditEventPublic]:
    """Newest first."""
    return service.query(
        session, actor=actor, action=action, target=target, since=since, limit=limit
    )
