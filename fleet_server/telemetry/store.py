"""Storing telemetry batches: checked, de-duplicated, folded into rollups, acknowledged.

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

import io
import json
import logging
import tarfile
import threading
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from pydantic import ValidationError
from sqlalchemy import delete, text, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, select

from edge_agent.protocol.telemetry import (
    MAX_TELEMETRY_BYTES,
    LatencySketch,
    SlotFigures,
    TelemetryBatch,
)
from edge_agent.protocol.topics import parse_device_topic
from edge_agent.telemetry.drift import Baseline
from edge_agent.telemetry.sketch import RELATIVE_ACCURACY, merge_wires
from fleet_server.artifacts import ArtifactStore
from fleet_server.bundles.tables import Bundle
from fleet_server.database import aware
from fleet_server.devices.tables import Device
from fleet_server.registry.tables import MLModel, ModelVersion
from fleet_server.telemetry.tables import (
    TelemetryBatchKey,
    TelemetryDeviceBucket,
    TelemetryRollup,
    TelemetryStream,
)

__all__ = ["BundleCatalog", "Outcome", "Rejection", "bucket_of", "store_batches"]

log = logging.getLogger(__name__)

#: A batch more than this many sequences past what the device says it still holds is refused:
#: an agent sends at most a window of 64 past its oldest unacknowledged batch.
MAX_SEQ_AHEAD = 4096
#: Clock skew tolerated on interval_end.
MAX_FUTURE = timedelta(minutes=10)


@dataclass(frozen=True)
class BundleInfo:
    sha256: str
    model: str
    version: str
    profile: str
    baseline: Baseline | None


class BundleCatalog:
    """Bundle facts telemetry needs (model, version, profile, drift baseline), cached: a
    bundle never changes once built."""

    def __init__(self, store: ArtifactStore) -> None:
        self._store = store
        self._cache: dict[str, BundleInfo | None] = {}
        self._lock = threading.Lock()

    def get(self, session: Session, sha256: str) -> BundleInfo | None:
        with self._lock:
            if sha256 in self._cache:
                return self._cache[sha256]
        row = session.exec(
            select(Bundle.sha256, Bundle.profile, MLModel.name, ModelVersion.version)
            .join(ModelVersion, col(ModelVersion.id) == col(Bundle.model_version_id))
            .join(MLModel, col(MLModel.id) == col(ModelVersion.model_id))
            .where(Bundle.sha256 == sha256)
        ).first()
        info = None
        if row is not None:
            info = BundleInfo(row[0], row[2], row[3], row[1], self._baseline(sha256))
        with self._lock:
            if info is not None or len(self._cache) < 100_000:
                self._cache[sha256] = info
        return info

    def forget_unknown(self) -> None:
        """A bundle unknown a moment ago may have been built since."""
        with self._lock:
            self._cache = {k: v for k, v in self._cache.items() if v is not None}

    def _baseline(self, sha256: str) -> Baseline | None:
        path = self._store.path(sha256)
        try:
            with tarfile.open(path) as tar:
                member = tar.extractfile("baseline.json")
                if member is None:
                    return None
                return Baseline.from_json(json.load(io.BytesIO(member.read())))
        except (OSError, KeyError, ValueError, tarfile.TarError) as e:
            log.warning("bundle %s: no usable drift baseline (%s)", sha256[:12], e)
            return None


@dataclass(frozen=True)
class Rejection:
    device_id: str | None
    reason: str
    message: str


@dataclass
class Outcome:
    stored: int = 0
    duplicates: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    #: (device, stream) → the contiguous watermark to acknowledge
    acks: dict[tuple[str, str], int] = field(default_factory=dict)
    #: (model, version, profile) that received new figures
    touched: set[tuple[str, str, str]] = field(default_factory=set)


def bucket_of(moment: datetime, bucket_s: int) -> datetime:
    ts = moment.astimezone(UTC).timestamp()
    return datetime.fromtimestamp(ts - ts % bucket_s, UTC)


def _check_slot(slot: SlotFigures, info: BundleInfo | None) -> str | None:
    """Why a slot's figures cannot be stored against its bundle, or None."""
    if info is None:
        return "unknown_bundle"
    if (slot.model, slot.version) != (info.model, info.version):
        return "bundle_mismatch"
    if slot.latency_ms is not None and slot.latency_ms.relative_accuracy != RELATIVE_ACCURACY:
        return "bad_shape"
    for counts, reference in (
        (slot.inputs, info.baseline and info.baseline.inputs),
        (slot.outputs, info.baseline and info.baseline.outputs),
    ):
        for name, tensor in counts.items():
            want = (reference or {}).get(name)
            if want is None or want.kind != tensor.kind or want.shape != tensor.shape:
                return "bad_shape"
    return None


def _validate(
    session: Session,
    messages: Iterable[tuple[str, bytes]],
    bundles: BundleCatalog,
    now: datetime,
    outcome: Outcome,
) -> tuple[list[TelemetryBatch], dict[int, str]]:
    """The batches to store, and (by ``id``) those of them whose figures are refused."""
    parsed: list[TelemetryBatch] = []
    for topic, payload in messages:
        where = parse_device_topic(topic)
        device_id = where[0] if where else None
        if where is None or where[1] != "telemetry":
            outcome.rejected.append(Rejection(None, "bad_topic", f"not a telemetry topic: {topic}"))
            continue
        if len(payload) > MAX_TELEMETRY_BYTES:
            outcome.rejected.append(
                Rejection(
                    device_id, "too_large", f"{len(payload)} bytes (limit {MAX_TELEMETRY_BYTES})"
                )
            )
            continue
        try:
            batch = TelemetryBatch.from_bytes(payload)
        except (ValueError, ValidationError) as e:
            outcome.rejected.append(Rejection(device_id, "malformed", str(e)[:300]))
            continue
        if batch.device_id != device_id:
            outcome.rejected.append(
                Rejection(device_id, "device_mismatch", f"batch names device {batch.device_id!r}")
            )
            continue
        if batch.seq > batch.floor + MAX_SEQ_AHEAD or batch.interval_end > now + MAX_FUTURE:
            outcome.rejected.append(
                Rejection(
                    device_id, "future_seq", f"seq {batch.seq} / interval_end from the future"
                )
            )
            continue
        parsed.append(batch)
    if not parsed:
        return [], {}
    enrolled = set(
        session.exec(
            select(Device.id).where(col(Device.id).in_({b.device_id for b in parsed}))
        ).all()
    )
    good = []
    refused: dict[int, str] = {}
    for batch in parsed:
        if batch.device_id not in enrolled:
            outcome.rejected.append(Rejection(batch.device_id, "unknown_device", "not enrolled"))
            continue
        problem = next(
            (
                p
                for s in batch.slots
                if (p := _check_slot(s, bundles.get(session, s.bundle_sha256)))
            ),
            None,
        )
        if problem is not None:
            outcome.rejected.append(
                Rejection(
                    batch.device_id,
                    problem,
                    f"batch {batch.seq}: a slot's figures do not fit its bundle",
                )
            )
            refused[id(batch)] = problem
        good.append(batch)
    return good, refused


def _insert(session: Session) -> Any:
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


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
    batches, refused = _validate(session, messages, bundles, now, outcome)
    if not batches:
        session.rollback()
        return outcome
    insert = _insert(session)
    # Streams first (rows locked in one order), then keys, then rollups: two processes storing
    # batches of one device take turns instead of waiting on each other in a cycle.
    streams = _lock_streams(session, insert, sorted({(b.device_id, b.stream) for b in batches}))
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
    new_keys = _insert_keys(session, insert, rows) if rows else set()
    new = [unique[k] for k in keys if k in new_keys]
    outcome.duplicates = len(batches) - len(new)
    new_figures = [b for b in new if id(b) not in refused]
    outcome.stored = len(new_figures)

    _advance_streams(session, streams, batches, new, outcome)
    _fold_rollups(session, insert, new_figures, bundles, bucket_s, outcome)
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


def _pg_unnest_insert(table: str, columns: dict[str, str], returning: str = "") -> Any:
    """PostgreSQL: many rows in one statement, one array per column. (psycopg parses a
    multi-row VALUES statement with thousands of placeholders for longer than the server
    takes to run it.) ``columns``: name → SQL type."""
    arrays = ", ".join(f"CAST(:{name} AS {kind}[])" for name, kind in columns.items())
    sql = (
        f"INSERT INTO {table} ({', '.join(columns)}) SELECT * FROM unnest({arrays}) "
        "ON CONFLICT DO NOTHING" + (f" RETURNING {returning}" if returning else "")
    )
    return text(sql)


_PG_INSERT_KEYS = _pg_unnest_insert(
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
_PG_INSERT_STREAMS = _pg_unnest_insert(
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
_PG_INSERT_DEVICE_BUCKETS = _pg_unnest_insert(
    "telemetry_device_buckets",
    {"bucket_start": "timestamptz", "bundle_sha256": "varchar", "device_id": "varchar"},
)


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {name: [r[name] for r in rows] for name in rows[0]}


def _insert_keys(
    session: Session, insert: Any, rows: list[dict[str, Any]]
) -> set[tuple[str, str, int]]:
    """Insert the batch keys that are not there yet; return those inserted."""
    if session.get_bind().dialect.name == "postgresql":
        inserted = session.execute(_PG_INSERT_KEYS, _columns(rows)).all()
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


def _insert_missing(
    session: Session, insert: Any, table: Any, pg: Any, rows: list[dict[str, Any]]
) -> None:
    if not rows:
        return
    if session.get_bind().dialect.name == "postgresql":
        session.execute(pg, _columns(rows))
    else:
        session.execute(insert(table).on_conflict_do_nothing(), rows)


def _lock_streams(
    session: Session, insert: Any, pairs: list[tuple[str, str]]
) -> dict[tuple[str, str], TelemetryStream]:
    """The rows of ``pairs`` (created if new), locked for this transaction, in sorted order."""
    _insert_missing(
        session,
        insert,
        TelemetryStream,
        _PG_INSERT_STREAMS,
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


def _advance_streams(
    session: Session,
    rows: dict[tuple[str, str], TelemetryStream],
    batches: list[TelemetryBatch],
    new: list[TelemetryBatch],
    outcome: Outcome,
) -> None:
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
        _advance(row, mark, mine, new_ids, outcome)
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
    outcome: Outcome,
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
    outcome.acks[(row.device_id, row.stream)] = watermark


@dataclass
class _Delta:
    requests: int = 0
    errors: int = 0
    nonfinite: int = 0
    sampled: int = 0
    labelled: int = 0
    correct: int = 0
    late: int = 0
    sketches: list[LatencySketch] = field(default_factory=list)
    #: tensor → (kind, every batch's counts): summed once per drain, not per batch.
    inputs: dict[str, tuple[str, list[list[list[int]]]]] = field(default_factory=dict)
    outputs: dict[str, tuple[str, list[list[list[int]]]]] = field(default_factory=dict)
    devices: set[str] = field(default_factory=set)

    @staticmethod
    def collect(
        into: dict[str, tuple[str, list[list[list[int]]]]], name: str, kind: str, counts: Any
    ) -> None:
        into.setdefault(name, (kind, []))[1].append(counts)

    @staticmethod
    def summed(
        collected: dict[str, tuple[str, list[list[list[int]]]]],
    ) -> dict[str, tuple[str, np.ndarray]]:
        """Each tensor's counts summed (every batch's had the baseline's shape: checked)."""
        return {
            name: (kind, np.asarray(many, np.int64).sum(axis=0))
            for name, (kind, many) in collected.items()
        }


def add_counts(into: dict[str, tuple[str, np.ndarray]], kind: str, name: str, counts: Any) -> None:
    array = np.asarray(counts, np.int64)
    if name in into and into[name][1].shape == array.shape:
        into[name] = (kind, into[name][1] + array)
    elif name not in into:
        into[name] = (kind, array)


def _fold_rollups(
    session: Session,
    insert: Any,
    new: list[TelemetryBatch],
    bundles: BundleCatalog,
    bucket_s: int,
    outcome: Outcome,
) -> None:
    deltas: dict[tuple[datetime, str, str, str], _Delta] = defaultdict(_Delta)
    for batch in new:
        bucket = bucket_of(batch.interval_end, bucket_s)
        for s in batch.slots:
            d = deltas[(bucket, s.bundle_sha256, s.rollout_id or "", s.role)]
            d.requests += s.requests
            d.errors += s.errors
            d.nonfinite += s.nonfinite
            d.sampled += s.sampled
            d.labelled += s.labelled
            d.correct += s.correct
            d.late += s.late
            if s.latency_ms is not None:
                d.sketches.append(s.latency_ms)
            for name, t in s.inputs.items():
                _Delta.collect(d.inputs, name, t.kind, t.counts)
            for name, t in s.outputs.items():
                _Delta.collect(d.outputs, name, t.kind, t.counts)
            d.devices.add(batch.device_id)
    if not deltas:
        return
    keys = sorted(deltas)
    infos = {sha: bundles.get(session, sha) for _, sha, _, _ in keys}
    session.execute(
        insert(TelemetryRollup).on_conflict_do_nothing(),
        [
            {
                "bucket_start": bucket,
                "bundle_sha256": sha,
                "rollout_id": rollout,
                "role": role,
                "model": infos[sha].model,  # type: ignore[union-attr]
                "version": infos[sha].version,  # type: ignore[union-attr]
                "profile": infos[sha].profile,  # type: ignore[union-attr]
                "requests": 0,
                "errors": 0,
                "nonfinite": 0,
                "sampled": 0,
                "labelled": 0,
                "correct": 0,
                "late": 0,
                "inputs": {},
                "outputs": {},
            }
            for bucket, sha, rollout, role in keys
        ],
    )
    for key in keys:
        bucket, sha, rollout, role = key
        d = deltas[key]
        row = session.exec(
            select(TelemetryRollup)
            .where(
                TelemetryRollup.bucket_start == bucket,
                TelemetryRollup.bundle_sha256 == sha,
                TelemetryRollup.rollout_id == rollout,
                TelemetryRollup.role == role,
            )
            .with_for_update()
        ).one()
        row.requests += d.requests
        row.errors += d.errors
        row.nonfinite += d.nonfinite
        row.sampled += d.sampled
        row.labelled += d.labelled
        row.correct += d.correct
        row.late += d.late
        if d.sketches:
            existing = (
                [LatencySketch.model_validate(row.latency_sketch)] if row.latency_sketch else []
            )
            merged = merge_wires(existing + d.sketches)
            row.latency_sketch = merged.model_dump() if merged else None
        row.inputs = _merged_json(row.inputs, _Delta.summed(d.inputs))
        row.outputs = _merged_json(row.outputs, _Delta.summed(d.outputs))
        session.add(row)
        info = infos[sha]
        assert info is not None
        outcome.touched.add((info.model, info.version, info.profile))
    device_rows = sorted(
        {(bucket, sha, dev) for (bucket, sha, _, _), d in deltas.items() for dev in d.devices}
    )
    _insert_missing(
        session,
        insert,
        TelemetryDeviceBucket,
        _PG_INSERT_DEVICE_BUCKETS,
        [{"bucket_start": b, "bundle_sha256": s, "device_id": dev} for b, s, dev in device_rows],
    )


def _merged_json(
    stored: dict[str, Any], delta: dict[str, tuple[str, np.ndarray]]
) -> dict[str, Any]:
    current: dict[str, tuple[str, np.ndarray]] = {
        name: (entry["kind"], np.asarray(entry["counts"], np.int64))
        for name, entry in stored.items()
    }
    for name, (kind, counts) in delta.items():
        add_counts(current, kind, name, counts)
    return {
        name: {"kind": kind, "counts": counts.tolist()} for name, (kind, counts) in current.items()
    }
