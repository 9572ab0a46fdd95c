"""Engine and sessions. SQLite for the embedded default, PostgreSQL (psycopg 3) in production.

Tables are created at start-up from the SQLModel metadata of every domain package.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

from sqlalchemy import event
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


def create_tables(engine: Engine) -> None:
    # Import every domain's tables so their metadata is registered.
    from fleet_server.audit import tables as _audit  # noqa: F401
    from fleet_server.auth import tables as _auth  # noqa: F401
    from fleet_server.bundles import tables as _bundles  # noqa: F401
    from fleet_server.devices import tables as _devices  # noqa: F401
    from fleet_server.keys import tables as _keys  # noqa: F401
    from fleet_server.registry import tables as _registry  # noqa: F401
    from fleet_server.rollouts import tables as _rollouts  # noqa: F401

    SQLModel.metadata.create_all(engine)


def session_scope(engine: Engine) -> Iterator[Session]:
    with Session(engine) as session:
        yield session


def aware(value: datetime) -> datetime:
    """Datetimes come back from SQLite (and ``timestamp`` columns) without a zone; all of
    edgefleet's are UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
