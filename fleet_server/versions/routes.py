"""/v1/models/{name}/versions/{version}/overview and /v1/models/{name}/diff."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query

from fleet_server.api.deps import SessionDep, StateDep, Viewer
from fleet_server.versions import service

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("/{name}/versions/{version}/overview")
def version_overview(name: str, version: str, session: SessionDep, _: Viewer) -> dict[str, Any]:
    """The version as pushed (card, metadata), its lineage, its bundles per profile with
    their parity figures, and the devices that serve it now."""
    return service.overview(session, name, version)


@router.get("/{name}/diff")
def diff_versions(
    name: str,
    state: StateDep,
    session: SessionDep,
    _: Viewer,
    a: Annotated[str, Query(description="the version deployed now (the baseline)")],
    b: Annotated[str, Query(description="the version to compare with it")],
    since_s: Annotated[float, Query(gt=0, le=90 * 86400)] = 86400,
) -> dict[str, Any]:
    """Two versions side by side: input/output differences (what would break a caller of
    ``a``), size, precision and parity per profile, and telemetry over the last ``since_s``."""
    since = datetime.now(UTC) - timedelta(seconds=since_s)
    return service.diff(session, state.telemetry.bundles, name, a, b, since)
