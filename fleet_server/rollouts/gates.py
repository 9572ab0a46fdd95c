"""Health gates: each a figure of the current stage's devices against its threshold.

Install failures, agent rollbacks and time-outs are shares of the stage's devices, read from
their reports (so a breach can stop a stage before all of it has run). Error rate, latency p95
against the previous version on the same profile, and drift (PSI) come from fleet telemetry
tagged with this rollout since the stage began (:func:`fleet_server.telemetry.query.summarize`),
so devices outside the stage, or the same version from another rollout, never count. Shadow
agreement is the candidate's top-1 agreement with the active model, as the devices report it.

The prediction shift compares the candidate's answers with the previous version's (what the
stage's devices ran before; for a shadow, the active version beside it) over the same window
and profile (:mod:`fleet_server.telemetry.shift`). The accuracy gates read the labels
applications sent back: the candidate's online accuracy, and its drop against the previous
version's over the same window.

A figure that cannot be judged yet (too few requests, labels or predictions) is ``ok=None``:
the engine waits for its evidence (up to ``max_bake_s``) and never passes a stage on it. A
gate that does not apply (the prediction shift when the previous version has no predictions
in telemetry) is ``applies=False``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
from sqlalchemy import func
from sqlmodel import Session, col, select

from edge_agent.telemetry.drift import TensorDrift
from fleet_server.rollouts.progress import TargetView, bucket_start
from fleet_server.rollouts.spec import EVIDENCE_SETTINGS, GateSpec
from fleet_server.rollouts.tables import GateFigure, TargetState
from fleet_server.telemetry.catalog import BundleCatalog
from fleet_server.telemetry.query import (
    ONLINE,
    Predictions,
    Roles,
    VersionHealth,
    predictions,
    summarize,
)
from fleet_server.telemetry.shift import MIN_SHIFT_VALUES, OutputShift, compare_outputs, rebin
from fleet_server.telemetry.tables import TelemetryDeviceBucket

__all__ = ["GATE_NAMES", "breaches", "judge", "lacking"]

GATE_NAMES = tuple(n for n in GateSpec.model_fields if n not in EVIDENCE_SETTINGS)
#: How far back the previous version's latency is read, before the rollout began; and its
#: predictions and labels, when the stage's own window holds too few of them.
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
    shadow_of: str | None = None,
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
    role: Roles = "shadow" if shadow else ONLINE
    compared = (gates.max_prediction_shift, gates.min_accuracy, gates.max_accuracy_drop)
    if any(c is not None for c in compared):
        sides = _sides(session, model, rollout_id, views, role, shadow_of, since, created_at)
        if gates.max_prediction_shift is not None:
            figures.append(_shift(session, bundles, sides, gates.max_prediction_shift))
        if gates.min_accuracy is not None:
            figures.append(_min_accuracy(sides, gates.min_accuracy, gates.min_labels))
        if gates.max_accuracy_drop is not None:
            figures.append(_accuracy_drop(sides, gates.max_accuracy_drop, gates.min_labels))
    wanted = (gates.max_error_rate, gates.max_latency_ratio, gates.max_psi)
    if all(w is None for w in wanted):
        return figures
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


def lacking(figures: Sequence[GateFigure]) -> list[GateFigure]:
    """Gates that apply and cannot be judged yet: a stage waits for their evidence."""
    return [f for f in figures if f.ok is None and f.applies]


# --- the candidate against the version it replaces ------------------------------------------------
@dataclass
class _Side:
    """One profile of the stage: the candidate's answers and labels, and the previous
    version's (``widened``: read back to before the rollout, the window had too few)."""

    profile: str
    candidate: Predictions
    previous: Predictions
    previous_version: str | None
    widened: bool = False
    #: The previous version counted enough predictions (here or widened) to compare with.
    comparable: bool = False


def _sides(
    session: Session,
    model: str,
    rollout_id: str,
    views: Sequence[TargetView],
    role: Roles,
    shadow_of: str | None,
    since: datetime,
    created_at: datetime,
) -> list[_Side]:
    by_profile: dict[str, list[TargetView]] = defaultdict(list)
    for v in views:
        if v.target.bundle_sha256:
            by_profile[v.device.profile].append(v)
    sides = []
    for profile, mine in sorted(by_profile.items()):
        candidate = predictions(
            session,
            model,
            shas={v.target.bundle_sha256 for v in mine if v.target.bundle_sha256},
            role=role,
            rollout_ids={rollout_id},
            since=since,
        )
        shas: set[str] = set()
        rollouts: set[str] | None = set()
        versions: Counter[str] = Counter()
        for v in mine:
            if shadow_of is not None:  # a shadow is compared with the active slot beside it
                slot = ((v.device.reported or {}).get("slots") or {}).get(shadow_of) or {}
                active = slot.get("active") or {}
                if active.get("bundle_sha256"):
                    shas.add(active["bundle_sha256"])
                    versions[str(active.get("version"))] += 1
                rollouts = None
            elif v.target.previous and v.target.previous.get("bundle_sha256"):
                shas.add(str(v.target.previous["bundle_sha256"]))
                assert rollouts is not None
                rollouts.add(str(v.target.previous.get("rollout_id") or ""))
                versions[str(v.target.previous["version"])] += 1
        previous = predictions(
            session, model, shas=shas, role=ONLINE, rollout_ids=rollouts, since=since
        )
        widened = False
        if shas and _thin(previous):
            earlier = created_at - timedelta(seconds=PRIOR_WINDOW_S)
            previous = predictions(
                session, model, shas=shas, role=ONLINE, rollout_ids=rollouts, since=earlier
            )
            widened = True
        version = versions.most_common(1)[0][0] if versions else None
        sides.append(_Side(profile, candidate, previous, version, widened, not _thin(previous)))
    return sides


def _thin(p: Predictions) -> bool:
    counted = [c.sum(axis=1).min() for outputs in p.outputs.values() for _k, c in outputs.values()]
    return not counted or max(counted) < MIN_SHIFT_VALUES


def _in_reference_bins(
    session: Session, bundles: BundleCatalog, p: Predictions, reference: dict[str, TensorDrift]
) -> dict[str, np.ndarray]:
    """Every bundle's output counts re-binned into ``reference`` and summed."""
    total: dict[str, np.ndarray] = {}
    for sha, outputs in p.outputs.items():
        info = bundles.get(session, sha)
        if info is None or info.baseline is None:
            continue
        for name, (_kind, counts) in outputs.items():
            source, target = info.baseline.outputs.get(name), reference.get(name)
            if source is None or target is None or source.shape != counts.shape:
                continue
            moved = rebin(counts, source, target)
            if moved is not None:
                total[name] = total[name] + moved if name in total else moved
    return total


def _shift(
    session: Session, bundles: BundleCatalog, sides: Sequence[_Side], threshold: float
) -> GateFigure:
    gate = "max_prediction_shift"
    judged: list[tuple[OutputShift, _Side]] = []
    waiting: list[str] = []
    for side in sides:
        if not side.comparable:
            continue  # too few predictions of the previous version to compare with here
        # The previous version's binning: that of its bundle with the most counted values.
        ref_sha = max(
            side.previous.outputs,
            key=lambda sha: sum(int(c.sum()) for _k, c in side.previous.outputs[sha].values()),
        )
        info = bundles.get(session, ref_sha)
        if info is None or info.baseline is None or not info.baseline.outputs:
            continue
        reference = info.baseline.outputs
        before = _in_reference_bins(session, bundles, side.previous, reference)
        after = _in_reference_bins(session, bundles, side.candidate, reference)
        shifts = compare_outputs(before, after, reference)
        scored = [s for s in shifts if s.psi is not None]
        if scored:
            judged.append((max(scored, key=lambda s: s.psi or 0.0), side))
        else:
            have = min((s.values for s in shifts), default=0)
            waiting.append(f"{side.profile}: {have} of {MIN_SHIFT_VALUES} predictions per group")
    if not judged and not waiting:
        return GateFigure(
            gate=gate,
            value=None,
            threshold=threshold,
            ok=None,
            applies=False,
            detail=f"off: the previous version has no predictions in telemetry to compare "
            f"with (fewer than {MIN_SHIFT_VALUES} in this stage and the hour before the rollout)",
        )
    if judged:
        worst, side = max(judged, key=lambda j: j[0].psi or 0.0)
        assert worst.psi is not None and worst.js_distance is not None
        breached = any((s.psi or 0.0) > threshold for s, _ in judged)
        data = {
            "profile": side.profile,
            "previous_version": side.previous_version,
            "previous_window": "since before the rollout" if side.widened else "this stage",
            **worst.to_json(),
        }
        detail = (
            f"{worst.output} on {side.profile}: PSI {worst.psi:.3f}, JS {worst.js_distance:.3f} "
            f"against {side.previous_version} over {worst.values} predictions"
        )
        if breached or not waiting:
            return GateFigure(gate=gate, value=round(worst.psi, 4), threshold=threshold,
                              ok=not breached, detail=detail, data=data)  # fmt: skip
    return _unjudged(gate, threshold, "; ".join(waiting))


def _min_accuracy(sides: Sequence[_Side], threshold: float, min_labels: int) -> GateFigure:
    gate = "min_accuracy"
    rated = [
        (s.candidate.correct / s.candidate.labelled, s)
        for s in sides
        if s.candidate.labelled >= min_labels
    ]
    low = [r for r in rated if r[0] < threshold]
    if not low and (not rated or len(rated) < len(sides)):
        have = sum(s.candidate.labelled for s in sides)
        why = f"{have} labelled predictions (needs {min_labels} per profile)"
        return _unjudged(gate, threshold, why)
    value, side = min(low or rated, key=lambda r: r[0])
    return GateFigure(
        gate=gate,
        value=round(value, 4),
        threshold=threshold,
        ok=value >= threshold,
        detail=f"{side.candidate.correct} of {side.candidate.labelled} right on {side.profile}",
    )


def _accuracy_drop(sides: Sequence[_Side], threshold: float, min_labels: int) -> GateFigure:
    gate = "max_accuracy_drop"
    drops: list[tuple[float, str]] = []
    short: list[str] = []
    for s in sides:
        before, after = s.previous, s.candidate
        if before.labelled < min_labels or after.labelled < min_labels:
            short.append(
                f"{s.profile}: {after.labelled} and {before.labelled} labels "
                f"(needs {min_labels} each)"
            )
            continue
        a, b = before.correct / before.labelled, after.correct / after.labelled
        detail = (
            f"{b:.4f} on {s.profile} against {s.previous_version}'s {a:.4f} "
            f"({after.labelled} and {before.labelled} labels)"
        )
        drops.append((a - b, detail))
    breached = [d for d in drops if d[0] > threshold]
    if not drops or (short and not breached):
        return _unjudged(gate, threshold, "; ".join(short) or "no labelled predictions yet")
    value, detail = max(drops)
    return GateFigure(
        gate=gate, value=round(value, 4), threshold=threshold, ok=value <= threshold, detail=detail
    )


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
            role=ONLINE,
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
