"""Each telemetry stream's watermark: the highest sequence up to which every batch of the
stream is stored (what the device is acknowledged, and may forget). Stream rows are created
when new and locked in one sorted order, so two ingest processes storing batches of one
device take turns instead of waiting on each other in a cycle.

Rows are read and written as plain values (:class:`StreamRow`): one SELECT … FOR UPDATE per
200 streams and one UPDATE statement for the drain, no ORM object per stream."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, tuple_, update
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from edge_agent.protocol.telemetry import TelemetryBatch
from fleet_server.database import aware
from fleet_server.telemetry.checks import MAX_SEQ_AHEAD
from fleet_server.telemetry.tables import TelemetryBatchKey, TelemetryStream
from fleet_server.telemetry.upserts import (
    PG_INSERT_STREAMS,
    PG_LOCK_STREAMS,
    PG_UPDATE_STREAMS,
    insert_missing,
    is_postgres,
    pg_rows,
)

__all__ = ["StreamRow", "advance_streams", "lock_streams"]

_STREAMS = TelemetryStream.__table__  # type: ignore[attr-defined]


@dataclass(slots=True)
class StreamRow:
    """One ``telemetry_streams`` row as plain values."""

    device_id: str
    stream: str
    acked_seq: int
    max_seq: int
    batches: int
    dropped_batches_total: int
    last_batch_at: datetime | None
    cpu_percent: float | None
    rss_bytes: int | None
    temperature_c: float | None


_COLUMNS = [_STREAMS.c[name] for name in StreamRow.__slots__]


def lock_streams(
    session: Session, insert: Any, pairs: list[tuple[str, str]]
) -> dict[tuple[str, str], StreamRow]:
    """The rows of ``pairs`` (created if new), locked for this transaction, in sorted order."""
    insert_missing(
        session,
        insert,
        TelemetryStream,
        PG_INSERT_STREAMS,
        [
            {
                "device_id": d,
                "stream": s,
                "acked_seq": 0,
                "max_seq": 0,
                "batches": 0,
                "dropped_batches_total": 0,
            }
            for d, s in pairs
        ],
    )
    rows: dict[tuple[str, str], StreamRow] = {}
    if is_postgres(session):
        found = session.execute(
            PG_LOCK_STREAMS, pg_rows([{"device_id": d, "stream": s} for d, s in pairs])
        ).all()
        for values in found:
            row = StreamRow(*values)
            rows[(row.device_id, row.stream)] = row
        return rows
    key = tuple_(_STREAMS.c.device_id, _STREAMS.c.stream)
    for chunk in _chunks(pairs, STREAMS_PER_QUERY):
        query = (
            sa_select(*_COLUMNS)
            .where(key.in_(chunk))
            .order_by(_STREAMS.c.device_id, _STREAMS.c.stream)
            .with_for_update()
        )
        for values in session.execute(query).all():
            row = StreamRow(*values)
            rows[(row.device_id, row.stream)] = row
    return rows


def advance_streams(
    session: Session,
    rows: dict[tuple[str, str], StreamRow],
    batches: list[TelemetryBatch],
    new: list[TelemetryBatch],
    acks: dict[tuple[str, str], int],
) -> None:
    """Each stream's contiguous watermark after this drain (into ``acks``) and the newest
    fresh batch's process figures, written in one UPDATE."""
    by_stream: dict[tuple[str, str], list[TelemetryBatch]] = defaultdict(list)
    for b in batches:
        by_stream[(b.device_id, b.stream)].append(b)
    new_ids = {id(b) for b in new}
    changed = []
    for pair in sorted(by_stream):
        row = rows[pair]
        mine = by_stream[pair]
        mark = max([row.acked_seq, *(b.floor for b in mine)])
        # Walk this drain's sequences (stored now, or before: duplicates); the database
        # is asked only when it holds more past the mark — after a gap.
        mark = _walk(mark, sorted({b.seq for b in mine}))
        if row.max_seq > mark:
            stored = session.exec(
                select(TelemetryBatchKey.seq)
                .where(
                    TelemetryBatchKey.device_id == row.device_id,
                    TelemetryBatchKey.stream == row.stream,
                    col(TelemetryBatchKey.seq) > mark,
                )
                .order_by(col(TelemetryBatchKey.seq))
                .limit(MAX_SEQ_AHEAD)
            ).all()
            mark = _walk(mark, list(stored))
        row.max_seq = max(row.max_seq, mark, *(b.seq for b in mine))
        _advance(row, mark, mine, new_ids, acks)
        changed.append(row)
    if not changed:
        return
    params = [_params(row) for row in changed]
    if is_postgres(session):
        renamed = [{_PG_NAMES.get(k, k): v for k, v in p.items()} for p in params]
        session.execute(PG_UPDATE_STREAMS, pg_rows(renamed))
    else:
        session.execute(_UPDATE, params)


_UPDATE = (
    update(_STREAMS)
    .where(
        _STREAMS.c.device_id == bindparam("b_device"), _STREAMS.c.stream == bindparam("b_stream")
    )
    .values({name: bindparam(name) for name in StreamRow.__slots__[2:]})
)


_PG_NAMES = {"b_device": "device_id", "b_stream": "stream"}


def _params(row: StreamRow) -> dict[str, Any]:
    return {
        "b_device": row.device_id,
        "b_stream": row.stream,
        "acked_seq": row.acked_seq,
        "max_seq": row.max_seq,
        "batches": row.batches,
        "dropped_batches_total": row.dropped_batches_total,
        "last_batch_at": row.last_batch_at,
        "cpu_percent": row.cpu_percent,
        "rss_bytes": row.rss_bytes,
        "temperature_c": row.temperature_c,
    }


def _walk(watermark: int, ascending: list[int]) -> int:
    """The watermark after stepping through ``ascending`` while contiguous."""
    for seq in ascending:
        if seq > watermark + 1:
            break
        watermark = max(watermark, seq)
    return watermark


#: Streams whose rows are read and locked in one query.
STREAMS_PER_QUERY = 200


def _chunks(items: list[tuple[str, str]], size: int) -> list[list[tuple[str, str]]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _advance(
    row: StreamRow,
    watermark: int,
    mine: list[TelemetryBatch],
    new_ids: set[int],
    acks: dict[tuple[str, str], int],
) -> None:
    """Set the stream's watermark and take the newest fresh batch's figures."""
    row.acked_seq = watermark
    fresh = [b for b in mine if id(b) in new_ids]
    if fresh:
        newest = max(fresh, key=lambda b: b.seq)
        row.batches += len(fresh)
        row.dropped_batches_total = max(row.dropped_batches_total, newest.dropped_batches_total)
        if row.last_batch_at is None or newest.interval_end >= aware(row.last_batch_at):
            row.last_batch_at = newest.interval_end
            row.cpu_percent = newest.process.cpu_percent
            row.rss_bytes = newest.process.rss_bytes
            row.temperature_c = newest.process.temperature_c
    acks[(row.device_id, row.stream)] = watermark
