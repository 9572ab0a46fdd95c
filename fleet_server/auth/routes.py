"""/v1/tokens (API tokens with roles, admin only; a token is shown once, at creation),
/v1/enrollment-tokens and /v1/devices/enroll (a device trades a one-time token for its
identity)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import Field
from sqlmodel import Session

from edge_agent.protocol.enrollment import EnrollRequest, EnrollResponse
from fleet_server.api.deps import Admin, AppState, Operator, SessionDep, StateDep
from fleet_server.api.principal import Role
from fleet_server.api.schemas import RequestBody
from fleet_server.audit.service import record
from fleet_server.auth import enrollment
from fleet_server.auth.mqtt_passwords import write_password_file
from fleet_server.auth.service import issue_api_token, list_api_tokens, revoke_api_token
from fleet_server.auth.tables import (
    ApiTokenPublic,
    EnrollmentTokenBatch,
    EnrollmentTokenBatchCreate,
    EnrollmentTokenCreate,
    EnrollmentTokenPublic,
)

router = APIRouter(tags=["auth"])


class TokenCreate(RequestBody):
    name: str = Field(min_length=1, max_length=128)
    role: Role


class TokenCreated(ApiTokenPublic):
    token: str


@router.post("/v1/tokens", status_code=201, response_model=TokenCreated)
def create_token(body: TokenCreate, session: SessionDep, principal: Admin) -> TokenCreated:
    record(session, principal.name, "token.create", body.name, role=body.role)
    token, row = issue_api_token(session, body.name, body.role)
    return TokenCreated.model_validate(row, update={"token": token})


@router.get("/v1/tokens", response_model=list[ApiTokenPublic])
def list_tokens(session: SessionDep, _: Admin) -> list[ApiTokenPublic]:
    return [ApiTokenPublic.model_validate(t) for t in list_api_tokens(session)]


@router.delete("/v1/tokens/{token_id}", response_model=ApiTokenPublic)
def revoke_token(
    token_id: Annotated[int, Path(ge=1, le=2**63 - 1)], session: SessionDep, principal: Admin
) -> ApiTokenPublic:
    return ApiTokenPublic.model_validate(revoke_api_token(session, token_id, principal.name))


@router.post(
    "/v1/enrollment-tokens",
    status_code=201,
    response_model=EnrollmentTokenPublic,
    tags=["devices"],
)
def create_enrollment_token(
    body: EnrollmentTokenCreate, state: StateDep, session: SessionDep, principal: Operator
) -> EnrollmentTokenPublic:
    """A one-time token a device trades for its identity at enrollment."""
    return enrollment.create_enrollment_token(
        session,
        state.catalog,
        body,
        default_ttl_s=state.settings.enrollment_token_ttl_s,
        actor=principal.name,
    )


@router.post(
    "/v1/enrollment-tokens/batch",
    status_code=201,
    response_model=EnrollmentTokenBatch,
    tags=["devices"],
)
def create_enrollment_tokens(
    body: EnrollmentTokenBatchCreate, state: StateDep, session: SessionDep, principal: Operator
) -> EnrollmentTokenBatch:
    """``count`` one-time tokens alike, for a batch of devices (one request, one transaction)."""
    return enrollment.create_enrollment_tokens(
        session,
        state.catalog,
        body,
        default_ttl_s=state.settings.enrollment_token_ttl_s,
        actor=principal.name,
    )


@router.post("/v1/devices/enroll", status_code=201, response_model=EnrollResponse, tags=["devices"])
async def enroll(body: EnrollRequest, state: StateDep) -> Response:
    """Called by ``edge-agent enroll``; authenticated by the enrollment token in the body."""
    # One hop to a worker thread for the whole of it, and the reply written as it is (a
    # pallet of devices enrolls at once; a plain route would hop for its session too, and
    # validate the reply it was just given).
    reply = await run_in_threadpool(_enroll, state, body)
    return Response(reply.model_dump_json(), status_code=201, media_type="application/json")


def _enroll(state: AppState, body: EnrollRequest) -> EnrollResponse:
    with Session(state.engine) as session:
        root = state.keys.signer(session).root_public  # no keys, no enrollment: checked first
        reply = enrollment.enroll(
            session,
            state.catalog,
            body,
            server_url=state.settings.resolved_public_url,
            mqtt_url=state.control.device_mqtt_url,
            root_public_key=root,
            ca=state.ca,
        )
        state.control.clear_desired(reply.device_id)
        if state.settings.broker_password_file is not None:
            write_password_file(session, state.settings.broker_password_file)
    return reply
