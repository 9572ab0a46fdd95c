"""/v1/audit: query the audit log (admin)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BeforeValidator

from fleet_server.api.deps import Admin, SessionDep
from fleet_server.audit import service
from fleet_server.audit.tables import AuditEventPublic

router = APIRouter(prefix="/v1/audit", tags=["audit"])


def _iso_8601(value: object) -> object:
    # pydantic would read "0.5" as a Unix time; the schema promises a date-time.
    if isinstance(value, str) and not re.match(r"^\d{4}-\d{2}-\d{2}", value):
        raise ValueError("an ISO 8601 date-time, e.g. 2026-11-30T12:00:00Z")
    return value


@router.get("", response_model=list[AuditEventPublic])
def audit(
    session: SessionDep,
    _: Admin,
    actor: str | None = None,
    action: Annotated[str | None, Query(description="e.g. rollout or rollout.create")] = None,
    target: str | None = None,
    since: Annotated[
        datetime | None,
        BeforeValidator(_iso_8601),
        Query(description="ISO 8601, e.g. 2026-11-30T12:00:00Z"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AuditEventPublic]:
    """Newest first."""
    return service.query(
        session, actor=actor, action=action, target=target, since=since, limit=limit
    )
