"""Bulk inserts that skip rows already there, per dialect: SQLite's ``INSERT … ON CONFLICT
DO NOTHING`` with executemany, PostgreSQL's one statement over ``unnest`` of one array per
column (psycopg parses a multi-row VALUES statement with thousands of placeholders for longer
than the server takes to run it)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from fleet_server.telemetry.tables import TelemetryBatchKey

__all__ = [
    "PG_INSERT_DEVICE_BUCKETS",
    "PG_INSERT_KEYS",
    "PG_INSERT_STREAMS",
    "insert_for",
    "insert_keys",
    "insert_missing",
]


def insert_for(session: Session) -> Any:
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


def pg_unnest_insert(table: str, columns: dict[str, str], returning: str = "") -> Any:
    """PostgreSQL: many rows in one statement, one array per column. (psycopg parses a
    multi-row VALUES statement with thousands of placeholders for longer than the server
    takes to run it.) ``columns``: name → SQL type."""
    arrays = ", ".join(f"CAST(:{name} AS {kind}[])" for name, kind in columns.items())
    sql = (
        f"INSERT INTO {table} ({', '.join(columns)}) SELECT * FROM unnest({arrays}) "
        "ON CONFLICT DO NOTHING" + (f" RETURNING {returning}" if returning else "")
    )
    return text(sql)


PG_INSERT_KEYS = pg_unnest_insert(
    "telemetry_batches",
    {
        "device_id": "varchar",
        "stream": "varchar",
        "seq": "bigint",
        "interval_end": "timestamptz",
        "received_at": "timestamptz",
        "refused": "varchar",
    },
    returning="device_id, stream, seq",
)
PG_INSERT_STREAMS = pg_unnest_insert(
    "telemetry_streams",
    {
        "device_id": "varchar",
        "stream": "varchar",
        "acked_seq": "bigint",
        "max_seq": "bigint",
        "batches": "bigint",
        "dropped_batches_total": "bigint",
    },
)
PG_INSERT_DEVICE_BUCKETS = pg_unnest_insert(
    "telemetry_device_buckets",
    {"bucket_start": "timestamptz", "bundle_sha256": "varchar", "device_id": "varchar"},
)


def columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {name: [r[name] for r in rows] for name in rows[0]}


def insert_keys(
    session: Session, insert: Any, rows: list[dict[str, Any]]
) -> set[tuple[str, str, int]]:
    """Insert the batch keys that are not there yet; return those inserted."""
    if session.get_bind().dialect.name == "postgresql":
        inserted = session.execute(PG_INSERT_KEYS, columns(rows)).all()
    else:  # executemany, RETURNING only what was inserted
        inserted = session.execute(
            insert(TelemetryBatchKey)
            .on_conflict_do_nothing()
            .returning(
                TelemetryBatchKey.device_id, TelemetryBatchKey.stream, TelemetryBatchKey.seq
            ),
            rows,
        ).all()
    return {(r[0], r[1], int(r[2])) for r in inserted}


def insert_missing(
    session: Session, insert: Any, table: Any, pg: Any, rows: list[dict[str, Any]]
) -> None:
    if not rows:
        return
    if session.get_bind().dialect.name == "postgresql":
        session.execute(pg, columns(rows))
    else:
        session.execute(insert(table).on_conflict_do_nothing(), rows)
