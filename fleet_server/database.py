"""Engine and sessions. SQLite for the embedded default, PostgreSQL (psycopg 3) in production.

The schema is made and changed by migrations (:mod:`fleet_server.schema`), which import every
domain's tables; this module imports none, so every domain can use it.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import msgspec
from pydantic import field_validator
from sqlalchemy import ColumnElement, String, any_, bindparam, event, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, create_engine


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


#: Ids per ``IN`` list on SQLite (its limit on variables is far above; a statement is cheap).
IDS_PER_QUERY = 500


def among(session: Session, column: Any, ids: list[str]) -> list[ColumnElement[bool]]:
    """Clauses that together pick the rows whose ``column`` is one of ``ids``: on PostgreSQL
    one ``= ANY(array)`` (one statement text, whatever the number: psycopg converts an
    ``IN`` list of 500 placeholders anew each time, most of a 10,000-device read); on SQLite
    one ``IN`` list per :data:`IDS_PER_QUERY`."""
    if session.get_bind().dialect.name == "postgresql":
        return [column == any_(bindparam(None, ids, type_=ARRAY(String)))] if ids else []
    return [column.in_(ids[i : i + IDS_PER_QUERY]) for i in range(0, len(ids), IDS_PER_QUERY)]


def json_rows(rows: list[dict[str, Any]]) -> str:
    """``rows`` as one JSON text for a PostgreSQL ``json_to_recordset`` parameter (datetimes
    as RFC 3339, NaN and infinities as null), encoded by msgspec: ``json.dumps`` with a
    Python hook for each datetime took ~4 % of a telemetry ingest process's CPU. PostgreSQL
    text cannot hold NUL (``\\u0000``), which a device may put in any free text it sends:
    such strings lose it, rather than failing the statement."""
    dumped = msgspec.json.encode(rows)
    if b"\\u0000" in dumped:
        dumped = msgspec.json.encode(_without_nul(rows))
    return dumped.decode()


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value


def aware(value: datetime) -> datetime:
    """Datetimes come back from SQLite (and ``timestamp`` columns) without a zone; all of
    edgefleet's are UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class UtcPublic(SQLModel):
    """Mixed into API schemas (``…Public``): every datetime they hold is UTC-aware, so a row
    maps to its schema in one ``model_validate`` with no field-by-field copy."""

    @field_validator("*", mode="after")
    @classmethod
    def _utc(cls, value: object) -> object:
        return aware(value) if isinstance(value, datetime) else value


def advisory_lock(session: Session, name: str) -> None:
    """Serialise one named thing (a rollout's slot, a build's inputs) across server processes
    until the session's transaction ends: a PostgreSQL transaction-scoped advisory lock.
    SQLite has one writer, and serves one server process: nothing to do."""
    if session.get_bind().dialect.name != "postgresql":
        return
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": advisory_key(name)})


def advisory_key(name: str) -> int:
    """The PostgreSQL advisory-lock key (a signed 64-bit integer) that stands for ``name``."""
    key = int.from_bytes(hashlib.sha256(f"edgefleet/{name}".encode()).digest()[:8], "big")
    return key - (1 << 63)
