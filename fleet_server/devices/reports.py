"""Storing what devices report: status reports and presence, a drained batch at a time.

A fleet of 10,000 reports each lifecycle step of a rollout (~10 reports a device), so a batch
is stored as plain rows: the devices' rows are read (and locked, on PostgreSQL, in id order)
once, each report is applied in order to a :class:`ReportRow`, and the rows that changed are
written with one UPDATE and the new history rows with one INSERT. Only the newest accepted
report of a device is turned into the JSON the row keeps.

Rules: a report older than the one stored (two server processes may each take one of a
device's reports from the share group) only counts as a sign of life; a report's last
transition becomes a history row once (a report sent again adds none).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, insert, text, update
from sqlalchemy import select as sa_select
from sqlmodel import Session

from edge_agent.protocol.status import ReportedStatus
from fleet_server.database import among, aware, json_rows
from fleet_server.devices.tables import Device, DeviceTransition

__all__ = ["ReportRow", "store_reports", "take_status"]

_DEVICES = Device.__table__  # type: ignore[attr-defined]
_TRANSITIONS = DeviceTransition.__table__  # type: ignore[attr-defined]


@dataclass(slots=True)
class ReportRow:
    """What reports change on one device's row, as plain values."""

    id: str
    #: The stored report's time and last transition (JSON), or the newest accepted since.
    reported_at: datetime | None
    last_transition: dict[str, Any] | None
    reported_seq: int
    online: bool
    refused: bool = False
    #: The newest report accepted in this batch (stored when the batch is written).
    accepted: ReportedStatus | None = None
    presence_changed: bool = False


def take_status(row: ReportRow, status: ReportedStatus) -> dict[str, Any] | None:
    """Apply ``status`` to ``row``; its last transition as a history row when it is new."""
    if row.reported_at is not None and row.reported_at > aware(status.reported_at):
        return None
    row.reported_at = aware(status.reported_at)
    row.reported_seq = status.desired_seq
    row.refused = status.refusal is not None
    row.accepted = status
    moved = status.last_transition
    if moved is None:
        row.last_transition = None
        return None
    as_json = moved.to_dict()
    if as_json == row.last_transition:
        return None
    row.last_transition = as_json
    return {
        "device_id": row.id,
        "slot": moved.slot,
        "from_state": str(moved.from_state),
        "to_state": str(moved.to_state),
        "event": str(moved.event),
        "at": moved.at,
        "bundle_sha256": moved.bundle_sha256,
        "reason": _text(moved.reason, 64),
        "message": _text(moved.message, 500),
    }


def _text(value: str | None, limit: int | None = None) -> str | None:
    """A device's free text as a column can hold it: PostgreSQL text refuses NUL (one such
    report would fail the whole batch it came in), and a column may have a length."""
    return (value or "").replace("\x00", "")[:limit] or None


def store_reports(
    session: Session, reports: list[tuple[str, ReportedStatus | bool]], *, lock: bool = True
) -> list[ReportRow]:
    """Store ``reports`` (device id, and a status or whether it is online), in order, for
    enrolled devices (others are ignored); the caller commits. Returns the devices' rows."""
    now = datetime.now(UTC)
    rows = _read(session, sorted({d for d, _ in reports}), lock=lock)
    transitions: list[dict[str, Any]] = []
    for device_id, content in reports:
        row = rows.get(device_id)
        if row is None:
            continue
        if isinstance(content, bool):
            row.presence_changed = row.presence_changed or row.online != content
            row.online = content
        elif (moved := take_status(row, content)) is not None:
            transitions.append(moved)
    changes = []
    for row in rows.values():
        change: dict[str, Any] = {"b_id": row.id, "last_seen_at": now, "online": row.online}
        if row.accepted is not None:
            status = row.accepted
            change.update(
                reported=status.to_dict(),
                reported_seq=status.desired_seq,
                agent_version=_text(status.agent_version),
            )
            if status.runtimes:
                change["runtimes"] = dict(status.runtimes)
        changes.append(change)
    # One statement per set of columns written.
    by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for change in changes:
        by_columns.setdefault(tuple(sorted(change)), []).append(change)
    postgres = session.get_bind().dialect.name == "postgresql"
    for columns, params in by_columns.items():
        if postgres:  # one statement, one JSON parameter (no per-row round of the pipeline)
            session.execute(_pg_update(columns), {"rows": json_rows(params)})
            continue
        values: dict[str, Any] = {c: bindparam(c) for c in columns if c != "b_id"}
        session.execute(
            update(_DEVICES).where(_DEVICES.c.id == bindparam("b_id")).values(**values), params
        )
    if transitions and postgres:
        session.execute(_PG_TRANSITIONS, {"rows": json_rows(transitions)})
    elif transitions:
        session.execute(insert(_TRANSITIONS), transitions)
    return list(rows.values())


#: The SQL types of the columns a report writes (PostgreSQL's bulk statements).
_PG_TYPES = {
    "b_id": "varchar",
    "last_seen_at": "timestamptz",
    "online": "boolean",
    "reported": "json",
    "reported_seq": "integer",
    "agent_version": "varchar",
    "runtimes": "json",
}
_PG_TRANSITIONS = text(
    "INSERT INTO device_transitions (device_id, slot, from_state, to_state, event, at, "
    "bundle_sha256, reason, message) SELECT device_id, slot, from_state, to_state, event, at, "
    "bundle_sha256, reason, message FROM json_to_recordset(CAST(:rows AS json)) AS u("
    "device_id varchar, slot varchar, from_state varchar, to_state varchar, event varchar, "
    "at timestamptz, bundle_sha256 varchar, reason varchar, message varchar)"
)


@functools.lru_cache(maxsize=16)
def _pg_update(columns: tuple[str, ...]) -> Any:
    names = [c for c in columns if c != "b_id"]
    return text(
        "UPDATE devices AS d SET "
        + ", ".join(f"{c} = u.{c}" for c in names)
        + " FROM json_to_recordset(CAST(:rows AS json)) AS u("
        + ", ".join(f"{c} {_PG_TYPES[c]}" for c in columns)
        + ") WHERE d.id = u.b_id"
    )


def _read(session: Session, device_ids: list[str], *, lock: bool) -> dict[str, ReportRow]:
    out: dict[str, ReportRow] = {}
    c = _DEVICES.c
    for clause in among(session, c.id, device_ids):
        # A decommissioned device's reports are ignored, as an unknown device's are.
        query = (
            sa_select(c.id, c.reported, c.reported_seq, c.online)
            .where(clause, c.decommissioned_at.is_(None))
            .order_by(c.id)
        )
        if lock:
            query = query.with_for_update()
        for device_id, reported, seq, online in session.execute(query).all():
            reported = reported or {}
            at = reported.get("reported_at")
            out[device_id] = ReportRow(
                id=device_id,
                reported_at=aware(datetime.fromisoformat(at)) if at else None,
                last_transition=reported.get("last_transition"),
                reported_seq=seq or 0,
                online=bool(online),
                refused=bool(reported.get("refusal")),
            )
    return out
