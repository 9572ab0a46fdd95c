"""/v1/hil: rigs registered with the server, and the HIL jobs their runners take and answer."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, Response, UploadFile

from fleet_server.api.deps import Operator, SessionDep, StateDep, Viewer
from fleet_server.artifacts.responses import blob_response
from fleet_server.errors import InvalidInputError
from fleet_server.hil import service
from fleet_server.hil.tables import HilJobPublic, HilRigPublic

router = APIRouter(prefix="/v1/hil", tags=["hil"])


@router.post("/rigs", status_code=201, response_model=HilRigPublic)
def register_rig(
    body: service.RigRegister, session: SessionDep, principal: Operator
) -> HilRigPublic:
    """Register a rig (or replace its registration): rollouts may then name it as their HIL
    stage, and its runner takes the jobs for it."""
    return service.register_rig(session, body, principal.name)


@router.get("/rigs", response_model=list[HilRigPublic])
def list_rigs(session: SessionDep, _: Viewer) -> list[HilRigPublic]:
    return service.list_rigs(session)


@router.post(
    "/rigs/{rig}/claim",
    response_model=None,
    responses={200: {"description": "a job, with its lease token"}, 204: {"description": "none"}},
)
def claim_job(
    rig: str, body: service.ClaimBody, session: SessionDep, _: Operator
) -> dict[str, Any] | Response:
    """The rig's next job, now held by this runner (204 when there is none, or the rig is
    busy). The answer's ``lease`` is shown once; the verdict must present it."""
    claimed = service.claim(session, rig, body.runner, datetime.now(UTC))
    if claimed is None:
        return Response(status_code=204)
    job, lease = claimed
    return {"job": service.public(job).model_dump(mode="json"), "lease": lease}


@router.get("/jobs/{job_id}", response_model=HilJobPublic)
def show_job(job_id: str, session: SessionDep, _: Viewer) -> HilJobPublic:
    return service.public(service.get_job(session, job_id))


@router.post("/jobs/{job_id}/verdict", response_model=HilJobPublic)
def post_verdict(
    job_id: str,
    state: StateDep,
    session: SessionDep,
    principal: Operator,
    lease: Annotated[str, Form(description="the token the claim answered with")],
    passed: Annotated[bool, Form()],
    junit: Annotated[UploadFile, File(description="junit.xml")],
    report: Annotated[UploadFile, File(description="report.html")],
    summary: Annotated[str, Form(description="the runner's result.json")] = "",
) -> HilJobPublic:
    """The runner's verdict with its reports. Refused (409) unless this runner holds the job."""
    try:
        parsed = json.loads(summary) if summary else None
    except ValueError as e:
        raise InvalidInputError(f"summary is not JSON: {e}", field="summary") from e
    if parsed is not None and not isinstance(parsed, dict):
        raise InvalidInputError("summary must be a JSON object", field="summary")
    job = service.post_verdict(
        session,
        state.store,
        job_id,
        lease=lease,
        passed=passed,
        summary=parsed,
        junit=junit.file,
        report=report.file,
        actor=principal.name,
        now=datetime.now(UTC),
    )
    state.rollouts.wake()
    return service.public(job)


def _report(
    request: Request, state: StateDep, session: SessionDep, job_id: str, which: str
) -> Response:
    media_type = "text/html; charset=utf-8" if which == "report" else "application/xml"
    sha256 = service.report_sha256(service.get_job(session, job_id), which)
    return blob_response(state.store, sha256, request, session=session, media_type=media_type)


# Two fixed paths rather than one "/{name}": a template would also match "…/verdict" and
# answer a GET there with 422 instead of 405.
@router.get(
    "/jobs/{job_id}/report.html",
    response_class=Response,
    responses={200: {"content": {"text/html": {}}}},
)
def job_report(
    job_id: str, request: Request, state: StateDep, session: SessionDep, _: Viewer
) -> Response:
    """The job's report.html, as its runner posted it."""
    return _report(request, state, session, job_id, "report")


@router.get(
    "/jobs/{job_id}/junit.xml",
    response_class=Response,
    responses={200: {"content": {"application/xml": {}}}},
)
def job_junit(
    job_id: str, request: Request, state: StateDep, session: SessionDep, _: Viewer
) -> Response:
    """The job's junit.xml, as its runner posted it."""
    return _report(request, state, session, job_id, "junit")
