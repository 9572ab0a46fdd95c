"""Each telemetry stream's watermark: the highest sequence up to which every batch of the
stream is stored (what the device is acknowledged, and may forget). Stream rows are created
when new and locked in one sorted order, so two ingest processes storing batches of one
device take turns instead of waiting on each other in a cycle."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import tuple_
from sqlmodel import Session, col, select

from edge_agent.protocol.telemetry import TelemetryBatch
from fleet_server.database import aware
from fleet_server.telemetry.checks import MAX_SEQ_AHEAD
from fleet_server.telemetry.tables import TelemetryBatchKey, TelemetryStream
from fleet_server.telemetry.upserts import PG_INSERT_STREAMS, insert_missing

__all__ = ["advance_streams", "lock_streams"]


def lock_streams(
    session: Session, insert: Any, pairs: list[tuple[str, str]]
) -> dict[tuple[str, str], TelemetryStream]:
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
    rows: dict[tuple[str, str], TelemetryStream] = {}
    for chunk in _chunks(pairs, STREAMS_PER_QUERY):
        for r in session.exec(
            select(TelemetryStream)
            .where(tuple_(TelemetryStream.device_id, TelemetryStream.stream).in_(chunk))
            .order_by(col(TelemetryStream.device_id), col(TelemetryStream.stream))
            .with_for_update()
        ).all():
            rows[(r.device_id, r.stream)] = r
    return rows


def advance_streams(
    session: Session,
    rows: dict[tuple[str, str], TelemetryStream],
    batches: list[TelemetryBatch],
    new: list[TelemetryBatch],
    acks: dict[tuple[str, str], int],
) -> None:
    """Each stream's contiguous watermark after this drain (into ``acks``) and the newest
    fresh batch's process figures."""
    by_stream: dict[tuple[str, str], list[TelemetryBatch]] = defaultdict(list)
    for b in batches:
        by_stream[(b.device_id, b.stream)].append(b)
    new_ids = {id(b) for b in new}
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
        session.add(row)


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
    row: TelemetryStream,
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
