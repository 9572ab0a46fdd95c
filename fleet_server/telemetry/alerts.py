"""Health evaluation and alerts: one function the rollout engine's gates call too.

:func:`evaluate` judges a model's versions on fleet telemetry over a window against the
model's :class:`AlertPolicy` — error rate, latency p95 against the previous version on the
same profile, worst PSI per tensor — and returns :class:`Finding` s with their figures. It
changes nothing. :func:`refresh_alerts` stores findings as open alerts (one per model, version,
profile, kind and tensor, updated while it lasts) and resolves the alerts no longer found.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlmodel import Session, col, select

from fleet_server.database import advisory_lock
from fleet_server.registry.tables import MLModel, ModelVersion
from fleet_server.telemetry.catalog import BundleCatalog
from fleet_server.telemetry.query import VersionHealth, summarize
from fleet_server.telemetry.tables import Alert, AlertPolicy

__all__ = ["Finding", "evaluate", "policy_for", "refresh_alerts"]


@dataclass(frozen=True)
class Finding:
    model: str
    version: str
    profile: str
    kind: str  # error_rate / latency_regression / drift
    subject: str
    value: float
    threshold: float
    message: str
    figures: dict[str, Any]


def policy_for(session: Session, model: str) -> AlertPolicy:
    return session.get(AlertPolicy, model) or AlertPolicy(model=model)


def _previous_version(session: Session, model: str, version: str) -> str | None:
    """The version registered just before ``version`` (the one a rollout replaces)."""
    rows = session.exec(
        select(ModelVersion.version, ModelVersion.id)
        .join(MLModel, col(MLModel.id) == col(ModelVersion.model_id))
        .where(MLModel.name == model)
        .order_by(col(ModelVersion.id))
    ).all()
    names = [r[0] for r in rows]
    if version not in names:
        return None
    i = names.index(version)
    return names[i - 1] if i > 0 else None


def evaluate(
    session: Session,
    bundles: BundleCatalog,
    model: str,
    *,
    version: str | None = None,
    profile: str | None = None,
    rollout_id: str | None = None,
    window_s: float = 900,
    now: datetime | None = None,
    policy: AlertPolicy | None = None,
) -> list[Finding]:
    """Findings for ``model`` (optionally one version / profile / rollout) over the last
    ``window_s``. A version with fewer than ``policy.min_requests`` requests is not judged."""
    now = now or datetime.now(UTC)
    since = now - timedelta(seconds=window_s)
    policy = policy or policy_for(session, model)
    findings: list[Finding] = []
    healths = summarize(
        session,
        bundles,
        model,
        version=version,
        profile=profile,
        rollout_id=rollout_id,
        since=since,
    )
    for h in healths:
        if h.requests < policy.min_requests:
            continue
        findings += _judge(session, bundles, h, policy, since)
    return findings


def _judge(
    session: Session,
    bundles: BundleCatalog,
    h: VersionHealth,
    policy: AlertPolicy,
    since: datetime,
) -> list[Finding]:
    out = []
    base = {"requests": h.requests, "errors": h.errors, "devices": h.devices}
    rate = h.error_rate
    if policy.max_error_rate is not None and rate is not None and rate > policy.max_error_rate:
        out.append(
            Finding(
                h.model,
                h.version,
                h.profile,
                "error_rate",
                "",
                rate,
                policy.max_error_rate,
                f"{h.errors} of {h.requests} requests failed ({rate:.2%} > "
                f"{policy.max_error_rate:.2%})",
                base,
            )
        )
    prior = _previous_version(session, h.model, h.version)
    if policy.max_latency_ratio is not None and prior is not None and h.p95_ms is not None:
        before = summarize(session, bundles, h.model, version=prior, profile=h.profile)
        prior_p95 = before[0].p95_ms if before else None
        if prior_p95:
            ratio = h.p95_ms / prior_p95
            if ratio > policy.max_latency_ratio:
                out.append(
                    Finding(
                        h.model,
                        h.version,
                        h.profile,
                        "latency_regression",
                        "",
                        ratio,
                        policy.max_latency_ratio,
                        f"p95 {h.p95_ms:.2f} ms is {ratio:.2f}x version {prior}'s "
                        f"{prior_p95:.2f} ms on {h.profile}",
                        {
                            **base,
                            "p95_ms": h.p95_ms,
                            "prior_version": prior,
                            "prior_p95_ms": prior_p95,
                        },
                    )
                )
    if policy.max_psi is not None:
        for d in h.drift:
            if d.psi > policy.max_psi:
                out.append(
                    Finding(
                        h.model,
                        h.version,
                        h.profile,
                        "drift",
                        f"{d.io}:{d.tensor}",
                        d.psi,
                        policy.max_psi,
                        f"{d.io} {d.tensor!r} drifted: PSI {d.psi:.3f} (group {d.worst_group}"
                        f", JS distance {d.js_distance:.3f}) > {policy.max_psi}",
                        {
                            **base,
                            "sampled": h.sampled,
                            "group": d.worst_group,
                            "psi": d.psi,
                            "js_distance": d.js_distance,
                        },
                    )
                )
    return out


def refresh_alerts(
    session: Session,
    bundles: BundleCatalog,
    models: set[str],
    *,
    window_s: float = 900,
    now: datetime | None = None,
) -> list[Alert]:
    """Evaluate ``models``; open or update an alert per finding, resolve the rest. Commits.
    Returns the alerts opened now."""
    now = now or datetime.now(UTC)
    opened = []
    for model in sorted(models):
        # One evaluation of a model at a time across ingest processes too (each would read
        # "no open alert" and open one).
        advisory_lock(session, f"alerts/{model}")
        findings = {
            (f.version, f.profile, f.kind, f.subject): f
            for f in evaluate(session, bundles, model, window_s=window_s, now=now)
        }
        current = {
            (a.version, a.profile, a.kind, a.subject): a
            for a in session.exec(
                select(Alert).where(Alert.model == model, Alert.state == "open")
            ).all()
        }
        for key, f in findings.items():
            alert = current.get(key)
            if alert is None:
                alert = Alert(
                    model=model,
                    version=f.version,
                    profile=f.profile,
                    kind=f.kind,
                    subject=f.subject,
                    message=f.message,
                    value=f.value,
                    threshold=f.threshold,
                    figures=f.figures,
                    raised_at=now,
                    updated_at=now,
                )
                opened.append(alert)
            else:
                alert.message, alert.value, alert.figures = f.message, f.value, f.figures
                alert.threshold, alert.updated_at = f.threshold, now
            session.add(alert)
        for key, alert in current.items():
            if key not in findings:
                alert.state, alert.resolved_at, alert.updated_at = "resolved", now, now
                session.add(alert)
    session.commit()
    return opened
