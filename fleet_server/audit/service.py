from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, or_
from sqlmodel import Session, col, select

from fleet_server.audit.tables import AuditEvent, AuditEventPublic

_EVENTS = AuditEvent.__table__  # type: ignore[attr-defined]


def record(session: Session, actor: str, action: str, target: str, **detail: Any) -> None:
    """Write an entry in the caller's transaction: it is committed (or rolled back) with it.
    One plain INSERT on the session's connection (no ORM object to flush, no ORM statement
    machinery: every enrollment writes one)."""
    session.connection().execute(
        insert(_EVENTS).values(
            at=datetime.now(UTC), actor=actor, action=action, target=target, detail=detail
        )
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
