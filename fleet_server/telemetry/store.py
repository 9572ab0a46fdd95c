"""Storing telemetry batches: checked, de-duplicated, folded into rollups, acknowledged.

The concepts have modules of their own: the checks (:mod:`.checks`), the bundle catalogue
(:mod:`.catalog`), the per-dialect bulk inserts (:mod:`.upserts`), the streams' watermarks
(:mod:`.watermarks`) and the rollup arithmetic (:mod:`.rollups`); this module is the
transaction that puts them in order.

:func:`store_batches` takes the batches one ingest worker drained from the broker and, in
one transaction: refuses the bad ones (counted by reason, never stored), inserts the keys of
the rest (a key already present is a duplicate — stored before, acknowledged again), folds the
new batches into the rollup rows, and advances each stream's contiguous watermark.

Several ingest processes may store batches of the same device at once (``$share/`` hands
messages round-robin). Rows are locked in one global order (batch keys, then streams, then
rollups, each sorted), so two transactions never wait on each other in a cycle; a transaction
that fails anyway (SQLite busy, a serialization error) is retried whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import delete
from sqlmodel import Session, col, select

from fleet_server.telemetry.catalog import BundleCatalog
from fleet_server.telemetry.checks import Rejection, validate
from fleet_server.telemetry.rollups import fold_rollups
from fleet_server.telemetry.tables import TelemetryBatchKey, TelemetryStream
from fleet_server.telemetry.upserts import insert_for, insert_keys
from fleet_server.telemetry.watermarks import advance_streams, lock_streams

__all__ = ["Outcome", "prune_keys", "store_batches"]


@dataclass
class Outcome:
    stored: int = 0
    duplicates: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    #: (device, stream) → the contiguous watermark to acknowledge
    acks: dict[tuple[str, str], int] = field(default_factory=dict)
    #: (model, version, profile) that received new figures
    touched: set[tuple[str, str, str]] = field(default_factory=set)


def store_batches(
    session: Session,
    messages: list[tuple[str, bytes]],
    bundles: BundleCatalog,
    *,
    bucket_s: int = 60,
    now: datetime | None = None,
) -> Outcome:
    """Store what is good in ``messages`` (topic, payload) in one transaction and commit."""
    now = now or datetime.now(UTC)
    outcome = Outcome()
    batches, refused, outcome.rejected = validate(session, messages, bundles, now)
    if not batches:
        session.rollback()
        return outcome
    insert = insert_for(session)
    # Streams first (rows locked in one order), then keys, then rollups: two processes storing
    # batches of one device take turns instead of waiting on each other in a cycle.
    streams = lock_streams(session, insert, sorted({(b.device_id, b.stream) for b in batches}))
    # De-duplicate within the drain too (a resend can arrive beside the original), and drop
    # what is acknowledged already: a resend whose acknowledgement was lost (its key may have
    # been pruned since).
    unique = {(b.device_id, b.stream, b.seq): b for b in batches}
    keys = sorted(k for k in unique if k[2] > streams[(k[0], k[1])].acked_seq)
    rows = [
        {
            "device_id": d,
            "stream": s,
            "seq": q,
            "interval_end": unique[(d, s, q)].interval_end,
            "received_at": now,
            "refused": refused.get(id(unique[(d, s, q)])),
        }
        for d, s, q in keys
    ]
    new_keys = insert_keys(session, insert, rows) if rows else set()
    new = [unique[k] for k in keys if k in new_keys]
    outcome.duplicates = len(batches) - len(new)
    new_figures = [b for b in new if id(b) not in refused]
    outcome.stored = len(new_figures)

    advance_streams(session, streams, batches, new, outcome.acks)
    fold_rollups(session, insert, new_figures, bundles, bucket_s, outcome.touched)
    session.commit()
    return outcome


def prune_keys(session: Session, *, older_than: datetime) -> int:
    """Delete batch keys received before ``older_than`` that their stream's watermark covers:
    a resend of one is recognised by the watermark alone. Commits; returns how many."""
    covered = (
        select(TelemetryStream.acked_seq)
        .where(
            TelemetryStream.device_id == TelemetryBatchKey.device_id,
            TelemetryStream.stream == TelemetryBatchKey.stream,
        )
        .scalar_subquery()
    )
    result = session.execute(
        delete(TelemetryBatchKey).where(
            col(TelemetryBatchKey.received_at) < older_than, col(TelemetryBatchKey.seq) <= covered
        )
    )
    session.commit()
    return int(getattr(result, "rowcount", 0) or 0)
