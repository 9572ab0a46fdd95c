"""Reading the rollups: fleet figures per model version x profile, over a time range.

Counts are summed, latency sketches merged (so p50/p95/p99 are the fleet's, exact to the
sketch's 1 %), drift histograms summed per bundle and scored against that bundle's baseline
(PSI and Jensen-Shannon distance per feature / channel; the worst is reported per tensor).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import func
from sqlmodel import Session, col, select

from edge_agent.protocol.telemetry import LatencySketch
from edge_agent.telemetry.drift import js_distance, psi
from edge_agent.telemetry.sketch import merge_wire, merge_wires, quantile
from fleet_server.database import aware
from fleet_server.telemetry.catalog import BundleCatalog
from fleet_server.telemetry.rollups import add_counts
from fleet_server.telemetry.tables import TelemetryDeviceBucket, TelemetryRollup

__all__ = [
    "MIN_DRIFT_VALUES",
    "ONLINE",
    "DriftScore",
    "Predictions",
    "Roles",
    "Totals",
    "VersionHealth",
    "predictions",
    "series",
    "summarize",
    "totals",
]

#: One role, several, or None for every role (see edge_agent.protocol.telemetry.Role).
Roles = str | tuple[str, ...] | None
#: The roles whose figures answer for a deployed version in rollout gates: online requests
#: and a local stream's messages, one input at a time. Batch scoring is reported, not gated:
#: a batch's latency is many rows', and a night's files are not the live input distribution.
ONLINE: tuple[str, ...] = ("active", "stream")

#: A group is scored only once this many of its values were counted: with 10 bins, PSI of a
#: sample of n values from the reference distribution itself is ~9/n, so fewer would raise
#: alerts on noise.
MIN_DRIFT_VALUES = 250


@dataclass(frozen=True)
class DriftScore:
    tensor: str
    io: str  # input / output
    worst_group: int
    psi: float
    js_distance: float


@dataclass
class VersionHealth:
    model: str
    version: str
    profile: str
    devices: int = 0
    requests: int = 0
    errors: int = 0
    nonfinite: int = 0
    sampled: int = 0
    labelled: int = 0
    correct: int = 0
    late: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    drift: list[DriftScore] = field(default_factory=list)
    #: Grouped by rollout: the rollout that deployed the version (None: none did).
    rollout_id: str | None = None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def worst_psi(self) -> float | None:
        values = [d.psi for d in self.drift if np.isfinite(d.psi)]
        return max(values) if values else None

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "profile": self.profile,
            "rollout_id": self.rollout_id,
            "devices": self.devices,
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "nonfinite": self.nonfinite,
            "sampled": self.sampled,
            "labelled": self.labelled,
            "correct": self.correct,
            "late": self.late,
            "accuracy": self.accuracy,
            "latency_ms": {"p50": self.p50_ms, "p95": self.p95_ms, "p99": self.p99_ms},
            "worst_psi": self.worst_psi,
            "drift": [
                {
                    "tensor": d.tensor,
                    "io": d.io,
                    "worst_group": d.worst_group,
                    "psi": _finite(d.psi),
                    "js_distance": _finite(d.js_distance),
                }
                for d in self.drift
            ],
        }


def _finite(value: float) -> float | None:
    return round(float(value), 6) if np.isfinite(value) else None


def _rows(
    session: Session,
    model: str,
    *,
    version: str | None,
    profile: str | None,
    rollout_id: str | None,
    since: datetime | None,
    until: datetime | None,
    role: Roles,
) -> list[TelemetryRollup]:
    q = select(TelemetryRollup).where(TelemetryRollup.model == model)
    if version is not None:
        q = q.where(TelemetryRollup.version == version)
    if profile is not None:
        q = q.where(TelemetryRollup.profile == profile)
    if rollout_id is not None:
        q = q.where(TelemetryRollup.rollout_id == rollout_id)
    if since is not None:
        q = q.where(col(TelemetryRollup.bucket_start) >= since)
    if until is not None:
        q = q.where(col(TelemetryRollup.bucket_start) < until)
    q = _of_roles(q, role)
    return list(session.exec(q.order_by(col(TelemetryRollup.bucket_start))).all())


def _of_roles(q: Any, role: Roles) -> Any:
    if isinstance(role, tuple):
        return q.where(col(TelemetryRollup.role).in_(role))
    return q if role is None else q.where(TelemetryRollup.role == role)


def _health(rows: list[TelemetryRollup], bundles: BundleCatalog, session: Session) -> VersionHealth:
    first = rows[0]
    h = VersionHealth(first.model, first.version, first.profile)
    sketches = []
    per_bundle: dict[str, dict[str, dict[str, tuple[str, np.ndarray]]]] = defaultdict(
        lambda: {"input": {}, "output": {}}
    )
    for r in rows:
        h.requests += r.requests
        h.errors += r.errors
        h.nonfinite += r.nonfinite
        h.sampled += r.sampled
        h.labelled += r.labelled
        h.correct += r.correct
        h.late += r.late
        if r.latency_sketch:
            sketches.append(LatencySketch.from_dict(r.latency_sketch))
        for io, stored in (("input", r.inputs), ("output", r.outputs)):
            for name, entry in stored.items():
                add_counts(per_bundle[r.bundle_sha256][io], entry["kind"], name, entry["counts"])
    if sketches:
        merged = merge_wire(sketches)
        h.p50_ms, h.p95_ms, h.p99_ms = (quantile(merged, q) for q in (0.5, 0.95, 0.99))
    worst: dict[tuple[str, str], DriftScore] = {}
    for sha, by_io in per_bundle.items():
        info = bundles.get(session, sha)
        if info is None or info.baseline is None or not info.baseline.reference:
            continue
        for io, tensors in by_io.items():
            reference = info.baseline.inputs if io == "input" else info.baseline.outputs
            for name, (_kind, counts) in tensors.items():
                drift = reference.get(name)
                if drift is None or drift.shape != counts.shape:
                    continue
                scores = psi(counts, drift.expected)
                scores[counts.sum(axis=1) < MIN_DRIFT_VALUES] = np.nan
                if not np.isfinite(scores).any():
                    continue
                g = int(np.nanargmax(scores))
                js = js_distance(counts, drift.expected)
                score = DriftScore(name, io, g, float(scores[g]), float(js[g]))
                if (io, name) not in worst or score.psi > worst[(io, name)].psi:
                    worst[(io, name)] = score
    h.drift = sorted(worst.values(), key=lambda d: (d.io, d.tensor))
    return h


def _devices(
    session: Session, shas: set[str], since: datetime | None, until: datetime | None
) -> int:
    if not shas:
        return 0
    q = select(func.count(func.distinct(TelemetryDeviceBucket.device_id))).where(
        col(TelemetryDeviceBucket.bundle_sha256).in_(shas)
    )
    if since is not None:
        q = q.where(col(TelemetryDeviceBucket.bucket_start) >= since)
    if until is not None:
        q = q.where(col(TelemetryDeviceBucket.bucket_start) < until)
    return int(session.exec(q).one())


def summarize(
    session: Session,
    bundles: BundleCatalog,
    model: str,
    *,
    version: str | None = None,
    profile: str | None = None,
    rollout_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    role: Roles = "active",
    by_rollout: bool = False,
) -> list[VersionHealth]:
    """Fleet figures per (version, profile) of ``model`` in [since, until); with
    ``by_rollout``, per (version, profile, the rollout that deployed it)."""
    groups: dict[tuple[str, str, str], list[TelemetryRollup]] = defaultdict(list)
    for r in _rows(
        session,
        model,
        version=version,
        profile=profile,
        rollout_id=rollout_id,
        since=since,
        until=until,
        role=role,
    ):
        groups[(r.version, r.profile, r.rollout_id if by_rollout else "")].append(r)
    out = []
    for key in sorted(groups):
        rows = groups[key]
        h = _health(rows, bundles, session)
        h.devices = _devices(session, {r.bundle_sha256 for r in rows}, since, until)
        if by_rollout:
            h.rollout_id = key[2] or None
        out.append(h)
    return out


def series(
    session: Session,
    bundles: BundleCatalog,
    model: str,
    *,
    version: str | None = None,
    profile: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[dict[str, Any]]:
    """One point per (rollup bucket, version, profile): counts, quantiles, worst PSI."""
    groups: dict[tuple[datetime, str, str], list[TelemetryRollup]] = defaultdict(list)
    for r in _rows(
        session,
        model,
        version=version,
        profile=profile,
        rollout_id=None,
        since=since,
        until=until,
        role="active",
    ):
        groups[(aware(r.bucket_start), r.version, r.profile)].append(r)
    points = []
    for (bucket, _v, _p), rows in sorted(groups.items()):
        h = _health(rows, bundles, session)
        # A merged bucket's width (retention's coarser tiers); None: the ingest bucket.
        resolution = rows[0].resolution_s
        points.append({"bucket_start": bucket.isoformat(), "resolution_s": resolution,
                       **h.to_json()})  # fmt: skip
    return points


@dataclass(frozen=True)
class Totals:
    """One version's requests, errors, labels and merged latency sketch over a range (all
    profiles)."""

    requests: int
    errors: int
    latency: LatencySketch | None
    labelled: int = 0
    correct: int = 0


def totals(
    session: Session,
    model: str,
    *,
    version: str,
    rollout_id: str | None,
    since: datetime | None,
    role: Roles = "active",
) -> Totals:
    rows = _rows(session, model, version=version, profile=None, rollout_id=rollout_id,
                 since=since, until=None, role=role)  # fmt: skip
    sketches = [LatencySketch.from_dict(r.latency_sketch) for r in rows if r.latency_sketch]
    return Totals(
        requests=sum(r.requests for r in rows),
        errors=sum(r.errors for r in rows),
        latency=merge_wires(sketches) if sketches else None,
        labelled=sum(r.labelled for r in rows),
        correct=sum(r.correct for r in rows),
    )


@dataclass
class Predictions:
    """What some bundles of one profile answered over a range: each output's counts in its
    own bundle's drift bins (summed per bundle), and the labels they got."""

    #: bundle sha256 → output name → (kind, counts)
    outputs: dict[str, dict[str, tuple[str, np.ndarray]]] = field(default_factory=dict)
    requests: int = 0
    labelled: int = 0
    correct: int = 0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None


def predictions(
    session: Session,
    model: str,
    *,
    shas: set[str],
    role: Roles,
    rollout_ids: set[str] | None,
    since: datetime,
) -> Predictions:
    """The outputs and labels of bundles ``shas`` in role ``role`` since ``since``
    (``rollout_ids``: only as deployed by these rollouts; "" is none)."""
    out = Predictions()
    if not shas:
        return out
    q = select(TelemetryRollup).where(
        TelemetryRollup.model == model,
        col(TelemetryRollup.bundle_sha256).in_(shas),
        col(TelemetryRollup.bucket_start) >= since,
    )
    q = q.where(
        col(TelemetryRollup.role).in_(role)
        if isinstance(role, tuple)
        else TelemetryRollup.role == role
    )
    if rollout_ids is not None:
        q = q.where(col(TelemetryRollup.rollout_id).in_(rollout_ids))
    for r in session.exec(q).all():
        out.requests += r.requests
        out.labelled += r.labelled
        out.correct += r.correct
        into = out.outputs.setdefault(r.bundle_sha256, {})
        for name, entry in r.outputs.items():
            add_counts(into, entry["kind"], name, entry["counts"])
    return out
