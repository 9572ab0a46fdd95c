"""Engine and sessions. SQLite for the embedded default, PostgreSQL (psycopg 3) in production.

Tables are created at start-up by ``fleet_server.app``, which imports every domain's tables;
this module imports none, so every domain can use it.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import field_validator
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel, create_engine


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
