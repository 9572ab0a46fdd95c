from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import or_
from sqlmodel import Session, col, select

from fleet_server.audit.tables import AuditEvent, AuditEventPublic


def record(session: Session, actor: str, action: str, target: str, **detail: Any) -> None:
    """Stage an entry; it is committed (or rolled back) with the caller's transaction."""
    session.add(
        AuditEvent(at=datetime.now(UTC), actor=actor, action=action, target=target, detail=detail)
    )


def query(
    session: Session,
    *,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
) -> list[AuditEventPublic]:
    stmt = select(AuditEvent).order_by(col(AuditEvent.id).desc()).limit(limit)
    if actor:
        stmt = stmt.where(AuditEvent.actor == actor)
    if action:
        # "rollout" matches "rollout.create"; "rollout.create" matches itself.
        stmt = stmt.where(
            or_(col(AuditEvent.action) == action, col(AuditEvent.action).startswith(action + "."))
        )
    if target:
        stmt = stmt.where(AuditEvent.target == target)
    if since:
        stmt = stmt.where(AuditEvent.at >= since)
    return [AuditEventPublic.model_validate(e) for e in session.exec(stmt).all()]
