"""What the registry, the builds, the fleet and its telemetry say about model versions.

- :func:`overview`: one version's card, metadata and lineage (its parents, their parents, and
  the versions derived from it), its bundles per profile with their parity figures, and the
  devices that serve it now (by profile, from their own reports).
- :func:`diff`: two versions side by side: the input/output differences that would break a
  caller (:mod:`fleet_server.registry.compat`), size and precision per profile, parity
  figures, and — where telemetry exists — p95 latency, error rate, online accuracy and the
  worst drift per profile.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from fleet_server.bundles.tables import Bundle
from fleet_server.devices.tables import Device
from fleet_server.registry.compat import io_differences
from fleet_server.registry.service import get_version, public_version
from fleet_server.registry.tables import MLModel, ModelVersion
from fleet_server.telemetry.catalog import BundleCatalog
from fleet_server.telemetry.query import summarize

__all__ = ["diff", "overview"]

#: Parity figures shown per bundle (from its signed manifest's parity report).
PARITY_FIGURES = ("max_abs_error", "rel_l2_error", "top1_agreement", "speedup")


def _bundles(session: Session, row: ModelVersion) -> list[dict[str, Any]]:
    out = []
    for b in session.exec(
        select(Bundle)
        .where(Bundle.model_version_id == row.id)
        .order_by(col(Bundle.profile), col(Bundle.created_at))
    ).all():
        # The manifest's parity report: the chosen artifact's figures, and those rejected.
        parity = ((b.manifest or {}).get("parity") or {}).get("chosen") or {}
        out.append(
            {
                "profile": b.profile,
                "runtime": b.runtime,
                "precision": b.precision,
                "bundle_sha256": b.sha256,
                "size": b.size,
                "parity": {k: parity.get(k) for k in PARITY_FIGURES},
                "created_at": b.created_at.isoformat(),
            }
        )
    return out


def _lineage(session: Session, model: MLModel, row: ModelVersion) -> dict[str, Any]:
    versions = {
        v.version: v
        for v in session.exec(select(ModelVersion).where(ModelVersion.model_id == model.id))
    }
    ancestors: list[str] = []
    todo = list(row.parents or [])
    while todo and len(ancestors) < 100:
        v = todo.pop(0)
        if v in ancestors or v not in versions:
            continue
        ancestors.append(v)
        todo.extend(versions[v].parents or [])
    children = sorted(v for v, r in versions.items() if row.version in (r.parents or []))
    return {"parents": list(row.parents or []), "ancestors": ancestors, "children": children}


def _running(session: Session, model: str, version: str) -> dict[str, Any]:
    """Devices whose own report says a slot serves ``version`` (active, or as a shadow)."""
    by_profile: Counter[str] = Counter()
    slots: Counter[str] = Counter()
    for profile, reported in session.exec(select(Device.profile, Device.reported)).all():
        for slot, s in ((reported or {}).get("slots") or {}).items():
            active = s.get("active") or {}
            if active.get("model") == model and active.get("version") == version:
                by_profile[profile] += 1
                slots[slot] += 1
    return {"devices": sum(by_profile.values()), "by_profile": dict(by_profile),
            "by_slot": dict(slots)}  # fmt: skip


def overview(session: Session, name: str, version: str) -> dict[str, Any]:
    model, row = get_version(session, name, version)
    return {
        **public_version(row, name).model_dump(mode="json"),
        "lineage": _lineage(session, model, row),
        "bundles": _bundles(session, row),
        "running": _running(session, name, version),
    }


def diff(
    session: Session, bundles: BundleCatalog, name: str, a: str, b: str, since: datetime
) -> dict[str, Any]:
    _, old = get_version(session, name, a)
    _, new = get_version(session, name, b)
    changes = io_differences(old.inputs, old.outputs, new.inputs, new.outputs)
    profiles: dict[str, dict[str, Any]] = {}
    for side, row in (("a", old), ("b", new)):
        for built in _bundles(session, row):  # the newest bundle of each profile wins
            entry = profiles.setdefault(built["profile"], {"a": None, "b": None})
            entry[side] = {k: built[k] for k in ("runtime", "precision", "size", "parity")}
        for h in summarize(session, bundles, name, version=row.version, since=since):
            entry = profiles.setdefault(h.profile, {"a": None, "b": None})
            entry.setdefault("telemetry", {"a": None, "b": None})[side] = {
                "devices": h.devices,
                "requests": h.requests,
                "p95_ms": h.p95_ms,
                "error_rate": h.error_rate,
                "labelled": h.labelled,
                "accuracy": h.accuracy,
                "worst_psi": h.worst_psi,
            }
    return {
        "model": name,
        "a": a,
        "b": b,
        "compatible": not changes,
        "io_differences": changes,
        "size": {"a": old.size, "b": new.size},
        "profiles": dict(sorted(profiles.items())),
        "since": since.isoformat(),
    }
