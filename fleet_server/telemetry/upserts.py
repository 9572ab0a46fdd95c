"""Bulk statements per dialect. SQLite: ``INSERT … ON CONFLICT DO NOTHING`` and UPDATE with
executemany. PostgreSQL: one statement over ``json_to_recordset`` of one JSON parameter, so a
drain's rows cost one ``json.dumps`` in C: psycopg parses a multi-row VALUES statement with
thousands of placeholders for longer than the server takes to run it, and dumps a Python
list as an array one element at a time (a regular expression per string)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from fleet_server.database import json_rows
from fleet_server.telemetry.tables import TelemetryBatchKey

__all__ = [
    "PG_ENROLLED",
    "PG_INSERT_DEVICE_BUCKETS",
    "PG_INSERT_KEYS",
    "PG_INSERT_STREAMS",
    "PG_LOCK_STREAMS",
    "PG_UPDATE_STREAMS",
    "insert_for",
    "insert_keys",
    "insert_missing",
    "is_postgres",
    "pg_rows",
]


def is_postgres(session: Session) -> bool:
    return bool(session.get_bind().dialect.name == "postgresql")


def insert_for(session: Session) -> Any:
    return postgresql.insert if is_postgres(session) else sqlite.insert


def pg_rows(rows: list[dict[str, Any]]) -> dict[str, str]:
    """The parameters of a ``json_to_recordset`` statement: ``rows`` as one JSON text."""
    return {"rows": json_rows(rows)}


def _record(columns: dict[str, str]) -> str:
    kinds = ", ".join(f"{name} {kind}" for name, kind in columns.items())
    return f"json_to_recordset(CAST(:rows AS json)) AS u({kinds})"


def pg_json_insert(table: str, columns: dict[str, str], returning: str = "") -> Any:
    """PostgreSQL: many rows in one statement that skips those already there. ``columns``:
    name → SQL type."""
    names = ", ".join(columns)
    sql = (
        f"INSERT INTO {table} ({names}) SELECT {names} FROM {_record(columns)} "
        "ON CONFLICT DO NOTHING" + (f" RETURNING {returning}" if returning else "")
    )
    return text(sql)


PG_INSERT_KEYS = pg_json_insert(
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
_STREAM_COUNTS = {
    "device_id": "varchar",
    "stream": "varchar",
    "acked_seq": "bigint",
    "max_seq": "bigint",
    "batches": "bigint",
    "dropped_batches_total": "bigint",
}
_STREAM_FIGURES = {
    "last_batch_at": "timestamptz",
    "cpu_percent": "float8",
    "rss_bytes": "bigint",
    "temperature_c": "float8",
}
PG_INSERT_STREAMS = pg_json_insert("telemetry_streams", _STREAM_COUNTS)
PG_INSERT_DEVICE_BUCKETS = pg_json_insert(
    "telemetry_device_buckets",
    {"bucket_start": "timestamptz", "bundle_sha256": "varchar", "device_id": "varchar"},
)
#: The streams' rows, locked in one order.
PG_LOCK_STREAMS = text(
    f"SELECT {', '.join([*_STREAM_COUNTS, *_STREAM_FIGURES])} FROM telemetry_streams "
    "WHERE (device_id, stream) IN (SELECT device_id, stream FROM "
    + _record({"device_id": "varchar", "stream": "varchar"})
    + ") ORDER BY device_id, stream FOR UPDATE"
)
#: Every stream of a drain written by one statement.
PG_UPDATE_STREAMS = text(
    "UPDATE telemetry_streams AS t SET "
    + ", ".join(f"{name} = u.{name}" for name in [*_STREAM_COUNTS, *_STREAM_FIGURES][2:])
    + f" FROM {_record(_STREAM_COUNTS | _STREAM_FIGURES)} "
    "WHERE t.device_id = u.device_id AND t.stream = u.stream"
)
#: Which of the devices are enrolled (and not decommissioned): one statement text for any
#: number.
PG_ENROLLED = text(
    "SELECT id FROM devices WHERE id = ANY(CAST(:ids AS varchar[])) AND decommissioned_at IS NULL"
)


def insert_keys(
    session: Session, insert: Any, rows: list[dict[str, Any]]
) -> set[tuple[str, str, int]]:
    """Insert the batch keys that are not there yet; return those inserted."""
    if is_postgres(session):
        inserted = session.execute(PG_INSERT_KEYS, pg_rows(rows)).all()
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
    if is_postgres(session):
        session.execute(pg, pg_rows(rows))
    else:
        session.execute(insert(table).on_conflict_do_nothing(), rows)
