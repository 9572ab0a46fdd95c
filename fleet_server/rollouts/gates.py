"""Health gates: each a figure of the current stage's devices against its threshold.

Install failures, agent rollbacks and time-outs are shares of the stage's devices, read from
their reports (so a breach can stop a stage before all of it has run). Error rate, latency p95
against the previous version on the same profile, and drift (PSI) come from fleet telemetry
tagged with this rollout since the stage began (:func:`fleet_server.telemetry.query.summarize`),
so devices outside the stage, or the same version from another rollout, never count. Shadow
agreement is the candidate's top-1 agreement with the active model, as the devices report it.

A figure that cannot be judged yet (no requests, no prior version on a profile) is ``ok=None``:
it neither passes nor breaches. Only ``min_devices_reporting`` makes figures mandatory.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import func
from sqlmodel import Session, col, select

from fleet_server.rollouts.progress import TargetView, bucket_start
from fleet_server.rollouts.spec import GateSpec
from fleet_server.rollouts.tables import GateFigure, TargetState
from fleet_server.telemetry.query import VersionHealth, summarize
from fleet_server.telemetry.store import BundleCatalog
from fleet_server.telemetry.tables import TelemetryDeviceBucket

__all__ = ["GATE_NAMES", "breaches", "judge"]

GATE_NAMES = tuple(n for n in GateSpec.model_fields if n != "min_requests")
#: How far back the previous version's latency is read, before the rollout began.
PRIOR_WINDOW_S = 3600


def _share(
    name: str, views: Sequence[TargetView], states: set[TargetState], threshold: float | None
) -> GateFigure | None:
    if threshold is None:
        return None
    if not views:
        return GateFigure(gate=name, value=None, threshold=threshold, ok=None, detail="no devices")
    hit = sum(1 for v in views if v.state in states)
    pct = 100.0 * hit / len(views)
    return GateFigure(
        gate=name,
        value=round(pct, 3),
        threshold=threshold,
        ok=pct <= threshold,
        detail=f"{hit} of {len(views)} devices",
    )


def judge(
    session: Session,
    bundles: BundleCatalog,
    *,
    rollout_id: str,
    model: str,
    version: str,
    created_at: datetime,
    stage_started_at: datetime,
    views: Sequence[TargetView],
    gates: GateSpec,
    shadow: bool,
    telemetry: bool = True,
    bucket_s: int = 60,
) -> list[GateFigure]:
    """Every configured gate's figure for the stage whose devices are ``views`` (notified or
    waiting, not released). ``telemetry=False`` skips the gates that read telemetry (the
    reconciler checks the cheap ones on every tick, all of them after the bake time).
    Telemetry is read from the rollup bucket (``bucket_s``) the stage began in: figures are
    this rollout's and this version's only, so the part of that bucket before the stage can
    only hold an earlier stage's devices."""
    since = bucket_start(stage_started_at, bucket_s)
    figures = [
        f
        for f in (
            _share(
                "max_install_failure_pct",
                views,
                {TargetState.FAILED, TargetState.REFUSED},
                gates.max_install_failure_pct,
            ),
            _share(
                "max_agent_rollback_pct",
                views,
                {TargetState.ROLLED_BACK},
                gates.max_agent_rollback_pct,
            ),
            _share("max_timed_out_pct", views, {TargetState.TIMED_OUT}, gates.max_timed_out_pct),
        )
        if f is not None
    ]
    if gates.min_shadow_agreement is not None:
        figures.append(_agreement(views, gates.min_shadow_agreement, gates.min_requests))
    if not telemetry:
        return figures
    if gates.min_devices_reporting is not None:
        reporting = _devices_reporting(session, views, since)
        figures.append(
            GateFigure(
                gate="min_devices_reporting",
                value=reporting,
                threshold=gates.min_devices_reporting,
                ok=reporting >= gates.min_devices_reporting,
                detail=f"{reporting} of {len(views)} devices sent telemetry in this stage",
            )
        )
    wanted = (gates.max_error_rate, gates.max_latency_ratio, gates.max_psi)
    if all(w is None for w in wanted):
        return figures
    role = "shadow" if shadow else "active"
    healths = [
        h
        for h in summarize(
            session,
            bundles,
            model,
            version=version,
            rollout_id=rollout_id,
            since=since,
            role=role,
        )
        if h.requests >= gates.min_requests
    ]
    if gates.max_error_rate is not None:
        figures.append(_worst_error_rate(healths, gates.max_error_rate))
    if gates.max_latency_ratio is not None:
        figures.append(
            _latency(session, bundles, model, healths, views, created_at, gates.max_latency_ratio)
        )
    if gates.max_psi is not None:
        worst = [(h.worst_psi, h.profile) for h in healths if h.worst_psi is not None]
        if worst:
            value, profile = max(worst)
            figures.append(
                GateFigure(
                    gate="max_psi",
                    value=round(value, 4),
                    threshold=gates.max_psi,
                    ok=value <= gates.max_psi,
                    detail=f"worst PSI on {profile}",
                )
            )
        else:
            figures.append(_unjudged("max_psi", gates.max_psi, "no drift counts yet"))
    return figures


def breaches(figures: Sequence[GateFigure]) -> list[GateFigure]:
    return [f for f in figures if f.ok is False]


def _unjudged(gate: str, threshold: float, why: str) -> GateFigure:
    return GateFigure(gate=gate, value=None, threshold=threshold, ok=None, detail=why)


def _devices_reporting(session: Session, views: Sequence[TargetView], since: datetime) -> int:
    shas = {v.target.bundle_sha256 for v in views if v.target.bundle_sha256}
    ids = {v.device.id for v in views}
    if not shas or not ids:
        return 0
    rows = session.exec(
        select(func.distinct(TelemetryDeviceBucket.device_id)).where(
            col(TelemetryDeviceBucket.bundle_sha256).in_(shas),
            col(TelemetryDeviceBucket.bucket_start) >= since,
        )
    ).all()
    return len(ids.intersection(rows))


def _worst_error_rate(healths: Sequence[VersionHealth], threshold: float) -> GateFigure:
    rated = [(h.error_rate, h) for h in healths if h.error_rate is not None]
    if not rated:
        return _unjudged("max_error_rate", threshold, "too few requests yet")
    rate, worst = max(rated, key=lambda r: r[0])
    return GateFigure(
        gate="max_error_rate",
        value=round(rate, 6),
        threshold=threshold,
        ok=rate <= threshold,
        detail=f"{worst.errors} of {worst.requests} requests failed on {worst.profile}",
    )


def _latency(
    session: Session,
    bundles: BundleCatalog,
    model: str,
    healths: Sequence[VersionHealth],
    views: Sequence[TargetView],
    created_at: datetime,
    threshold: float,
) -> GateFigure:
    # The version each profile's devices ran before this rollout (the commonest one).
    prior_by_profile: dict[str, Counter[str]] = defaultdict(Counter)
    for v in views:
        if v.target.previous:
            prior_by_profile[v.device.profile][str(v.target.previous["version"])] += 1
    ratios: list[tuple[float, str]] = []
    for h in healths:
        profile, p95 = h.profile, h.p95_ms
        priors = prior_by_profile.get(profile)
        if not priors or p95 is None:
            continue
        prior_version = priors.most_common(1)[0][0]
        before = summarize(
            session,
            bundles,
            model,
            version=prior_version,
            profile=profile,
            since=created_at - timedelta(seconds=PRIOR_WINDOW_S),
        )
        prior_p95 = before[0].p95_ms if before else None
        if prior_p95:
            ratios.append(
                (
                    p95 / prior_p95,
                    f"p95 {p95:.2f} ms vs {prior_version}'s {prior_p95:.2f} ms on {profile}",
                )
            )
    if not ratios:
        return _unjudged(
            "max_latency_ratio", threshold, "no latency of both versions on one profile yet"
        )
    ratio, detail = max(ratios)
    return GateFigure(
        gate="max_latency_ratio",
        value=round(ratio, 4),
        threshold=threshold,
        ok=ratio <= threshold,
        detail=detail,
    )


def _agreement(views: Sequence[TargetView], threshold: float, min_samples: int) -> GateFigure:
    agree = samples = 0.0
    for v in views:
        slots = (v.device.reported or {}).get("slots") or {}
        shadow = next(
            (
                s["shadow"]
                for s in slots.values()
                if (s.get("shadow") or {}).get("bundle_sha256") == v.target.bundle_sha256
            ),
            None,
        )
        if not shadow or shadow.get("top1_agreement") is None:
            continue
        n = float(shadow.get("samples") or 0)
        agree += float(shadow["top1_agreement"]) * n
        samples += n
    if samples < min_samples:
        return _unjudged(
            "min_shadow_agreement", threshold, f"{samples:.0f} compared samples so far"
        )
    value = agree / samples
    return GateFigure(
        gate="min_shadow_agreement",
        value=round(value, 4),
        threshold=threshold,
        ok=value >= threshold,
        detail=f"top-1 agreement over {samples:.0f} samples",
    )
