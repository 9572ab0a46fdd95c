"""Telemetry retention: rollups downsampled to coarser buckets as they age, and pruned.

A policy is a list of tiers, finest first. The first is the ingest bucket
(``EDGEFLEET_TELEMETRY_BUCKET_S``). Each tier says how long its rows are kept before they are
merged into the next, coarser tier. The default, ``7d,1h:90d,1d``, means:

- minute rows are kept 7 days;
- then they become hourly rows, kept 90 days;
- then they become daily rows, kept for good.

A last tier with a keep (``…,1d:5y``) is pruned past it.

A coarse row is the merge of the fine rows it replaces: counts summed, latency sketches merged
(DDSketch merges exactly), drift histograms summed. Its fine rows are deleted in the same
transaction. So every span of time is held at exactly one resolution, and every query (which
sums the rows in its range) reads whichever resolution covers it. A range that starts or ends
inside a coarse bucket counts that bucket only if the bucket starts inside the range. Only
whole coarse buckets older than the fine tier's keep are merged. A batch that arrives late for
a merged span lands in its own fine row, and it is merged at the next run, or in the coarse
row that starts at the same instant.

The rows that count distinct devices (``telemetry_device_buckets``) follow the same spans: the
devices of a span are kept once, at the span's start.

The server runs this once an hour (:class:`RetentionLoop`). ``edgefleet telemetry retention
--apply`` runs it by hand, optionally as of a later time (``--now``) to see what a policy
keeps.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import delete, func, insert, literal, select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from edge_agent.contracts.errors import ConfigError
from edge_agent.protocol.telemetry import LatencySketch
from edge_agent.telemetry.sketch import merge_wires
from fleet_server.database import advisory_lock
from fleet_server.telemetry.rollups import bucket_of
from fleet_server.telemetry.tables import TelemetryDeviceBucket, TelemetryRollup

log = logging.getLogger(__name__)

_ROLLUPS = TelemetryRollup.__table__  # type: ignore[attr-defined]
_DEVICES = TelemetryDeviceBucket.__table__  # type: ignore[attr-defined]

DEFAULT_POLICY = "7d,1h:90d,1d"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
#: Coarse buckets merged per transaction.
SPANS_PER_TRANSACTION = 24


def _seconds(text: str, what: str, setting: str) -> int:
    match = re.fullmatch(r"(\d+)([smhdwy])", text.strip())
    if match is None or int(match.group(1)) == 0:
        raise ConfigError(
            f"{setting}: {what} {text!r} is not a duration like 90s, 10m, 1h, 7d, 2w or 5y"
        )
    return int(match.group(1)) * _UNITS[match.group(2)]


@dataclass(frozen=True)
class Tier:
    resolution_s: int
    #: How long rows at this resolution are kept (then merged into the next tier, or pruned
    #: for the last); None: for good.
    keep_s: int | None


@dataclass(frozen=True)
class RetentionPolicy:
    tiers: tuple[Tier, ...]

    @classmethod
    def parse(
        cls, text: str, bucket_s: int, setting: str = "EDGEFLEET_TELEMETRY_RETENTION"
    ) -> RetentionPolicy:
        """``KEEP[,RESOLUTION[:KEEP]]…``: the ingest buckets' keep, then each coarser tier's
        resolution and keep (none on the last: for good). ``forever`` keeps ingest buckets
        for good (no downsampling)."""
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise ConfigError(f"{setting} is empty (the default is {DEFAULT_POLICY!r})")
        if parts == ["forever"]:
            return cls((Tier(bucket_s, None),))
        tiers = [Tier(bucket_s, _seconds(parts[0], "the first keep", setting))]
        for part in parts[1:]:
            resolution, _, keep = part.partition(":")
            tiers.append(
                Tier(
                    _seconds(resolution, "a resolution", setting),
                    _seconds(keep, "a keep", setting) if keep else None,
                )
            )
        for fine, coarse in itertools.pairwise(tiers):
            if fine.keep_s is None:
                raise ConfigError(f"{setting}: only the last tier may be kept for good")
            if coarse.resolution_s <= fine.resolution_s or coarse.resolution_s % fine.resolution_s:
                raise ConfigError(
                    f"{setting}: each resolution must be a multiple of the one before "
                    f"({coarse.resolution_s} s after {fine.resolution_s} s)"
                )
            if fine.keep_s < coarse.resolution_s:
                raise ConfigError(
                    f"{setting}: a tier must be kept at least as long as the next one's "
                    f"resolution ({fine.keep_s} s before {coarse.resolution_s} s buckets)"
                )
        return cls(tuple(tiers))


@dataclass
class Applied:
    #: Fine rollup rows merged away, coarse rows written, rows pruned past the last keep.
    merged: int = 0
    written: int = 0
    pruned: int = 0
    #: Device-count rows merged away or pruned.
    device_rows: int = 0
    spans: int = 0
    by_tier: dict[int, int] = field(default_factory=dict)


def apply(engine: Engine, policy: RetentionPolicy, now: datetime | None = None) -> Applied:
    """Merge every whole coarse bucket older than its fine tier's keep, and prune past the
    last tier's keep. Safe to run again and from several processes (each span is merged in a
    transaction that deletes what it read; a second run finds nothing left)."""
    now = now or datetime.now(UTC)
    done = Applied()
    tiers = policy.tiers
    for index, (fine, coarse) in enumerate(itertools.pairwise(tiers)):
        assert fine.keep_s is not None
        cutoff = bucket_of(now - timedelta(seconds=fine.keep_s), coarse.resolution_s)
        spans = _spans(engine, fine, index == 0, coarse.resolution_s, cutoff)
        for i in range(0, len(spans), SPANS_PER_TRANSACTION):
            chunk = spans[i : i + SPANS_PER_TRANSACTION]
            with Session(engine) as session:
                # One process at a time (several servers run this hourly): a second finds the
                # spans already merged.
                advisory_lock(session, "telemetry-retention")
                merged, written, devices = _merge(session, fine, index == 0, coarse, chunk)
                session.commit()
            done.merged += merged
            done.written += written
            done.device_rows += devices
            done.spans += len(chunk)
            done.by_tier[coarse.resolution_s] = done.by_tier.get(coarse.resolution_s, 0) + written
    last = tiers[-1]
    if last.keep_s is not None:
        horizon = bucket_of(now - timedelta(seconds=last.keep_s), last.resolution_s)
        with Session(engine) as session:
            conn = session.connection()
            done.pruned = conn.execute(
                delete(_ROLLUPS).where(_ROLLUPS.c.bucket_start < horizon)
            ).rowcount
            done.device_rows += conn.execute(
                delete(_DEVICES).where(_DEVICES.c.bucket_start < horizon)
            ).rowcount
            session.commit()
    return done


def _fine_rows(fine: Tier, first: bool) -> Any:
    # Rows as ingest writes them carry no resolution; merged rows carry theirs.
    if first:
        return _ROLLUPS.c.resolution_s.is_(None)
    return _ROLLUPS.c.resolution_s == fine.resolution_s


def _spans(
    engine: Engine, fine: Tier, first: bool, coarse_s: int, cutoff: datetime
) -> list[datetime]:
    with engine.connect() as conn:
        starts = conn.execute(
            select(_ROLLUPS.c.bucket_start)
            .where(_fine_rows(fine, first), _ROLLUPS.c.bucket_start < cutoff)
            .distinct()
        ).scalars()
        return sorted({bucket_of(s, coarse_s) for s in starts})


def _merge(
    session: Session, fine: Tier, first: bool, coarse: Tier, spans: list[datetime]
) -> tuple[int, int, int]:
    conn = session.connection()
    width = timedelta(seconds=coarse.resolution_s)
    lo, hi = spans[0], spans[-1] + width
    rows = conn.execute(
        select(_ROLLUPS).where(
            _ROLLUPS.c.bucket_start >= lo,
            _ROLLUPS.c.bucket_start < hi,
            _fine_rows(fine, first) | (_ROLLUPS.c.resolution_s == coarse.resolution_s),
        )
    ).all()
    wanted = set(spans)
    groups: dict[tuple[datetime, str, str, str], list[Any]] = defaultdict(list)
    for row in rows:
        span = bucket_of(row.bucket_start, coarse.resolution_s)
        if span in wanted:
            groups[(span, row.bundle_sha256, row.rollout_id, row.role)].append(row)
    ids = [r.id for group in groups.values() for r in group]
    merged = sum(
        1 for group in groups.values() for r in group if r.resolution_s != coarse.resolution_s
    )
    for i in range(0, len(ids), 500):
        conn.execute(delete(_ROLLUPS).where(_ROLLUPS.c.id.in_(ids[i : i + 500])))
    if groups:
        conn.execute(
            insert(_ROLLUPS),
            [_combined(key[0], coarse.resolution_s, group) for key, group in groups.items()],
        )
    devices = 0
    for span in spans:
        end = span + width
        inside = (_DEVICES.c.bucket_start > span) & (_DEVICES.c.bucket_start < end)
        conn.execute(
            _insert_ignore(conn.dialect.name).from_select(
                ["bucket_start", "bundle_sha256", "device_id"],
                select(literal(span, _DEVICES.c.bucket_start.type), _DEVICES.c.bundle_sha256,
                       _DEVICES.c.device_id).where(inside).distinct(),
            )
        )  # fmt: skip
        devices += conn.execute(delete(_DEVICES).where(inside)).rowcount
    return merged, len(groups), devices


def _insert_ignore(dialect: str) -> Any:
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(_DEVICES).on_conflict_do_nothing()
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(_DEVICES).on_conflict_do_nothing()


def _combined(span: datetime, resolution_s: int, group: list[Any]) -> dict[str, Any]:
    first = group[0]
    sketches = [LatencySketch.from_dict(r.latency_sketch) for r in group if r.latency_sketch]
    merged = merge_wires(sketches) if sketches else None
    return {
        "bucket_start": span,
        "resolution_s": resolution_s,
        "bundle_sha256": first.bundle_sha256,
        "model": first.model,
        "version": first.version,
        "profile": first.profile,
        "rollout_id": first.rollout_id,
        "role": first.role,
        **{
            name: sum(int(getattr(r, name)) for r in group)
            for name in (
                "requests",
                "errors",
                "nonfinite",
                "sampled",
                "labelled",
                "correct",
                "late",
            )
        },
        "latency_sketch": merged.to_dict() if merged is not None else None,
        "inputs": _histograms([r.inputs for r in group]),
        "outputs": _histograms([r.outputs for r in group]),
    }


def _histograms(stored: list[dict[str, Any]]) -> dict[str, Any]:
    """Drift histograms summed tensor by tensor (one bundle: the same shapes)."""
    sums: dict[str, tuple[str, np.ndarray]] = {}
    for entries in stored:
        for name, entry in (entries or {}).items():
            counts = np.asarray(entry["counts"], np.int64)
            if name in sums and sums[name][1].shape == counts.shape:
                sums[name] = (sums[name][0], sums[name][1] + counts)
            elif name not in sums:
                sums[name] = (entry["kind"], counts)
    return {name: {"kind": kind, "counts": c.tolist()} for name, (kind, c) in sums.items()}


def row_count(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            "rollups": int(conn.execute(select(func.count()).select_from(_ROLLUPS)).scalar_one()),
            "device_buckets": int(
                conn.execute(select(func.count()).select_from(_DEVICES)).scalar_one()
            ),
        }


class RetentionLoop:
    """Applies the policy once every ``interval_s`` on a daemon thread (the first run a
    minute after start), logging what it did; a failure is logged and retried next time."""

    def __init__(self, engine: Engine, policy: RetentionPolicy, interval_s: float = 3600.0,
                 first_after_s: float = 60.0) -> None:  # fmt: skip
        self.engine, self.policy = engine, policy
        self.interval_s, self.first_after_s = interval_s, first_after_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> RetentionLoop:
        if len(self.policy.tiers) > 1 or self.policy.tiers[0].keep_s is not None:
            self._thread = threading.Thread(target=self._run, name="edgefleet-retention",
                                            daemon=True)  # fmt: skip
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        wait = self.first_after_s
        while not self._stop.wait(wait):
            wait = self.interval_s
            try:
                done = apply(self.engine, self.policy)
            except Exception:
                log.exception("telemetry retention failed; retrying in %.0f s", self.interval_s)
                continue
            if done.merged or done.pruned or done.device_rows:
                log.info(
                    "telemetry retention: %d rows merged into %d over %d spans, %d pruned, "
                    "%d device rows", done.merged, done.written, done.spans, done.pruned,
                    done.device_rows,
                )  # fmt: skip
