"""Telemetry REST: fleet figures per model version x profile, their series over time, a
device's own telemetry, alerts and per-model alert policies, and ``GET /metrics``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import Field
from sqlmodel import col, select

from edge_agent.protocol.telemetry import Role
from fleet_server.api.deps import Operator, SessionDep, StateDep, Viewer
from fleet_server.api.schemas import RequestBody
from fleet_server.errors import NotFoundError
from fleet_server.registry.tables import MLModel
from fleet_server.telemetry.alerts import policy_for
from fleet_server.telemetry.query import series, summarize
from fleet_server.telemetry.tables import (
    Alert,
    AlertPolicy,
    AlertPolicyBase,
    AlertPublic,
    TelemetryStream,
    TelemetryStreamPublic,
)

router = APIRouter(tags=["telemetry"])

SinceS = Annotated[float, Query(gt=0, le=366 * 86400, description="Look back this many seconds")]


def _model(session: SessionDep, name: str) -> None:
    if session.exec(select(MLModel.id).where(MLModel.name == name)).first() is None:
        raise NotFoundError(f"model {name!r} is not registered", model=name)


@router.get("/v1/telemetry/models/{model}")
def model_health(
    model: str,
    state: StateDep,
    session: SessionDep,
    _: Viewer,
    version: str | None = None,
    profile: str | None = None,
    rollout_id: str | None = None,
    role: Role = "active",
    since_s: SinceS = 3600,
    by_rollout: bool = False,
) -> list[dict[str, Any]]:
    """Per version x profile (x rollout with ``by_rollout``): devices reporting, requests,
    errors, NaN/inf, fleet p50/p95/p99 (merged sketches), drift (PSI, JS distance per tensor)
    and online accuracy (labels from the field) over the last ``since_s``."""
    _model(session, model)
    since = datetime.now(UTC) - timedelta(seconds=since_s)
    found = summarize(
        session,
        state.telemetry.bundles,
        model,
        version=version,
        profile=profile,
        rollout_id=rollout_id,
        since=since,
        role=role,
        by_rollout=by_rollout,
    )
    return [h.to_json() for h in found]


@router.get("/v1/telemetry/models/{model}/series")
def model_series(
    model: str,
    state: StateDep,
    session: SessionDep,
    _: Viewer,
    version: str | None = None,
    profile: str | None = None,
    since_s: SinceS = 3600,
) -> list[dict[str, Any]]:
    """One point per rollup bucket x version x profile."""
    _model(session, model)
    since = datetime.now(UTC) - timedelta(seconds=since_s)
    return series(
        session, state.telemetry.bundles, model, version=version, profile=profile, since=since
    )


@router.get("/v1/telemetry/devices/{device_id}", response_model=list[TelemetryStreamPublic])
def device_telemetry(device_id: str, session: SessionDep, _: Viewer) -> list[TelemetryStreamPublic]:
    """The device's telemetry streams: acknowledged sequence, drops, CPU, RSS, temperature."""
    rows = session.exec(
        select(TelemetryStream)
        .where(TelemetryStream.device_id == device_id)
        .order_by(col(TelemetryStream.last_batch_at))
    ).all()
    return [TelemetryStreamPublic.model_validate(r) for r in rows]


@router.get("/v1/alerts", response_model=list[AlertPublic])
def list_alerts(
    session: SessionDep,
    _: Viewer,
    state: Literal["open", "resolved", "all"] = "open",
    model: str | None = None,
) -> list[AlertPublic]:
    q = select(Alert)
    if state != "all":
        q = q.where(Alert.state == state)
    if model is not None:
        q = q.where(Alert.model == model)
    rows = session.exec(q.order_by(col(Alert.raised_at).desc()).limit(1000)).all()
    return [AlertPublic.model_validate(r) for r in rows]


class AlertPolicyUpdate(RequestBody):
    max_error_rate: float | None = Field(default=None, ge=0, le=1)
    max_latency_ratio: float | None = Field(default=None, gt=1)
    max_psi: float | None = Field(default=None, gt=0)
    min_requests: int = Field(default=100, ge=1)


@router.get("/v1/models/{model}/alert-policy", response_model=AlertPolicyBase)
def show_policy(model: str, session: SessionDep, _: Viewer) -> AlertPolicyBase:
    _model(session, model)
    return AlertPolicyBase.model_validate(policy_for(session, model))


@router.put("/v1/models/{model}/alert-policy", response_model=AlertPolicyBase)
def set_policy(
    model: str, body: AlertPolicyUpdate, session: SessionDep, _: Operator
) -> AlertPolicyBase:
    """Replace the model's thresholds (a field left out or null disables that check)."""
    _model(session, model)
    row = session.get(AlertPolicy, model) or AlertPolicy(model=model)
    for name, value in body.model_dump().items():
        setattr(row, name, value)
    session.add(row)
    session.commit()
    return AlertPolicyBase.model_validate(row)


@router.get("/metrics", tags=["health"], response_class=Response)
def metrics(state: StateDep, _: Viewer) -> Response:
    """The fleet in Prometheus text format (authenticated: scrape with a viewer token)."""
    return Response(generate_latest(state.telemetry.registry), media_type=CONTENT_TYPE_LATEST)
