"""What each dashboard page shows, read from the domains' services: plain dictionaries and
lists for the templates, nothing the REST API does not also say."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlmodel import Session, col, select

from edge_agent.protocol.lifecycle import SlotState
from fleet_server.audit import service as audit
from fleet_server.database import aware
from fleet_server.devices import service as devices
from fleet_server.devices.selectors import Selector
from fleet_server.devices.tables import Device
from fleet_server.registry import service as registry
from fleet_server.rollouts import service as rollouts
from fleet_server.rollouts.tables import RolloutPublic, RolloutState
from fleet_server.telemetry.catalog import BundleCatalog
from fleet_server.telemetry.query import series, summarize
from fleet_server.telemetry.tables import TelemetryStream, TelemetryStreamPublic
from fleet_server.versions import service as versions

#: A device's health, worst first: the order the fleet page counts them in.
HEALTH = ("failed", "rolled back", "offline", "updating", "serving", "idle")
_UPDATING = {
    SlotState.DOWNLOADING,
    SlotState.VERIFYING,
    SlotState.STAGING,
    SlotState.SWITCHING,
    SlotState.PROBATION,
    SlotState.ROLLING_BACK,
}


@dataclass
class DeviceRow:
    id: str
    profile: str
    labels: dict[str, str]
    online: bool
    last_seen_at: datetime | None
    agent_version: str | None
    health: str
    #: slot → (state, "model version" or "", error reason or "")
    slots: dict[str, tuple[str, str, str]] = field(default_factory=dict)

    @property
    def versions(self) -> list[str]:
        return [v for _, v, _ in self.slots.values() if v]


def device_row(device: Device) -> DeviceRow:
    reported = device.reported or {}
    slots: dict[str, tuple[str, str, str]] = {}
    for name, slot in sorted((reported.get("slots") or {}).items()):
        active = slot.get("active") or {}
        serving = f"{active['model']} {active['version']}" if active else ""
        error = (slot.get("error") or {}).get("reason", "")
        slots[name] = (slot.get("state", "?"), serving, error)
    states = {s for s, _, _ in slots.values()}
    if SlotState.FAILED in states:
        health = "failed"
    elif SlotState.ROLLED_BACK in states:
        health = "rolled back"
    elif not device.online:
        health = "offline"
    elif states & _UPDATING:
        health = "updating"
    elif any(v for _, v, _ in slots.values()):
        health = "serving"
    else:
        health = "idle"
    return DeviceRow(
        id=device.id,
        profile=device.profile,
        labels=dict(device.labels),
        online=device.online,
        last_seen_at=aware(device.last_seen_at) if device.last_seen_at else None,
        agent_version=device.agent_version,
        health=health,
        slots=slots,
    )


def fleet(session: Session, selector: Selector | None) -> dict[str, Any]:
    rows = [device_row(d) for d in devices.list_devices(session, selector)]
    by_health = Counter(r.health for r in rows)
    return {
        "devices": rows,
        "by_profile": sorted(Counter(r.profile for r in rows).items()),
        "by_version": sorted(Counter(v for r in rows for v in r.versions).items()),
        "by_health": [(h, by_health[h]) for h in HEALTH if by_health[h]],
    }


def device(session: Session, device_id: str) -> dict[str, Any]:
    row = devices.get_device(session, device_id)
    streams = session.exec(
        select(TelemetryStream)
        .where(TelemetryStream.device_id == device_id)
        .order_by(col(TelemetryStream.last_batch_at).desc())
    ).all()
    return {
        "device": device_row(row),
        "runtimes": row.runtimes or {},
        "refusal": (row.reported or {}).get("refusal"),
        "history": devices.transitions(session, device_id),
        "telemetry": TelemetryStreamPublic.model_validate(streams[0]) if streams else None,
    }


def actions(found: RolloutPublic) -> tuple[str, ...]:
    """The buttons a rollout's page offers: what the engine would accept now (promote cuts
    a bake short, so not in the last stage unless that stage waits for approval)."""
    if found.state == RolloutState.PAUSED:
        return ("resume", "abort")
    if found.state == RolloutState.AWAITING_APPROVAL:
        return ("pause", "promote", "abort")
    if found.state == RolloutState.IN_PROGRESS:
        last = found.stage >= len(found.stages) - 1
        return ("pause", "abort") if last else ("pause", "promote", "abort")
    return ()


def rollout(session: Session, rollout_id: str) -> RolloutPublic:
    return rollouts.get_rollout(session, rollout_id)


def rollout_list(session: Session) -> list[RolloutPublic]:
    return rollouts.list_rollouts(session, include_targets=False)


def models(session: Session) -> list[dict[str, Any]]:
    """Each model with its versions, newest first."""
    return [
        {"name": m.name, "versions": [v.version for v in reversed(m.versions)]}
        for m in registry.list_models(session)
    ]


#: The gates that judge a version against the one it replaces (or runs beside).
COMPARISONS = (
    "max_prediction_shift",
    "min_accuracy",
    "max_accuracy_drop",
    "max_latency_ratio",
    "min_shadow_agreement",
)


def version(
    session: Session, bundles: BundleCatalog, name: str, number: str, since_s: float
) -> dict[str, Any]:
    since = datetime.now(UTC) - timedelta(seconds=since_s)
    seen = versions.overview(session, name, number)
    active = summarize(session, bundles, name, version=number, since=since)
    shadow = summarize(session, bundles, name, version=number, since=since, role="shadow")
    involved = rollouts.list_rollouts(session, include_targets=False, model=name, version=number)
    return {
        "version": seen,
        "active": [h.to_json() for h in active],
        "shadow": [h.to_json() for h in shadow],
        "rollouts": involved,
        "comparisons": COMPARISONS,
    }


def version_series(
    session: Session, bundles: BundleCatalog, name: str, number: str, since_s: float
) -> dict[str, Any]:
    """The charts' data, aligned for uPlot: one x axis (bucket starts, Unix seconds) and per
    profile a y series for each figure (null where a bucket has no point)."""
    since = datetime.now(UTC) - timedelta(seconds=since_s)
    points = series(session, bundles, name, version=number, since=since)
    xs = sorted({_unix(p["bucket_start"]) for p in points})
    at = {x: i for i, x in enumerate(xs)}
    charts: dict[str, dict[str, list[float | None]]] = {}

    def put(chart: str, label: str, i: int, value: float | None) -> None:
        charts.setdefault(chart, {}).setdefault(label, [None] * len(xs))[i] = value

    for p in points:
        i, profile = at[_unix(p["bucket_start"])], p["profile"]
        for q in ("p50", "p95", "p99"):
            put("latency_ms", f"{profile} {q}", i, p["latency_ms"][q])
        for d in p["drift"]:
            if d["io"] == "input":
                put("input_psi", f"{profile} {d['tensor']}", i, d["psi"])
        if p["labelled"]:
            put("accuracy", profile, i, p["accuracy"])
        put("requests", profile, i, p["requests"])
    return {
        "x": xs,
        "from": since.timestamp(),
        "to": datetime.now(UTC).timestamp(),
        "charts": {k: dict(sorted(v.items())) for k, v in charts.items()},
    }


def _unix(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def audit_log(session: Session, action: str | None, limit: int) -> list[Any]:
    return list(audit.query(session, action=action or None, limit=limit))
