"""/v1/tokens (API tokens with roles, admin only; a token is shown once, at creation),
/v1/enrollment-tokens and /v1/devices/enroll (a device trades a one-time token for its
identity)."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from sqlmodel import Session

from edge_agent.contracts.errors import TransportError
from edge_agent.protocol.enrollment import (
    CertificateRenewal,
    CertificateRequest,
    EnrollRequest,
    EnrollResponse,
)
from edge_agent.protocol.topics import DEVICE_ID_PATTERN
from fleet_server.api.deps import Admin, AppState, Operator, PrincipalDep, SessionDep, StateDep
from fleet_server.api.principal import Principal, Role
from fleet_server.api.schemas import RequestBody
from fleet_server.api.structs import struct_body, struct_openapi
from fleet_server.audit.service import record
from fleet_server.auth import enrollment
from fleet_server.auth.broker_files import BrokerFiles
from fleet_server.auth.decommission import decommission
from fleet_server.auth.renewal import renew_certificate
from fleet_server.auth.service import issue_api_token, list_api_tokens, revoke_api_token
from fleet_server.auth.tables import (
    ApiTokenPublic,
    EnrollmentTokenBatch,
    EnrollmentTokenBatchCreate,
    EnrollmentTokenCreate,
    EnrollmentTokenPublic,
)
from fleet_server.errors import PermissionDeniedError

log = logging.getLogger(__name__)

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


@router.post(
    "/v1/devices/enroll",
    status_code=201,
    tags=["devices"],
    openapi_extra=struct_openapi(EnrollRequest, EnrollResponse, 201),
)
async def enroll(
    state: StateDep, body: Annotated[EnrollRequest, struct_body(EnrollRequest)]
) -> Response:
    """Called by ``edge-agent enroll``; authenticated by the enrollment token in the body."""
    # One hop to a worker thread for the whole of it, and the reply written as it is (a
    # pallet of devices enrolls at once; a plain route would hop for its session too, and
    # validate the reply it was just given).
    reply = await run_in_threadpool(_enroll, state, body)
    return Response(reply.to_json(), status_code=201, media_type="application/json")


def _enroll(state: AppState, body: EnrollRequest) -> EnrollResponse:
    with Session(state.engine) as session:
        root = state.keys.signer(session).root_public  # no keys, no enrollment: checked first
        done = enrollment.enroll(
            session,
            state.catalog,
            body,
            server_url=state.settings.resolved_public_url,
            mqtt_url=state.control.device_mqtt_url,
            root_public_key=root,
            ca=state.ca,
            certificate_validity_s=state.settings.device_certificate_validity_s,
        )
        state.control.clear_desired(body.device_id)
        if done.again:
            # A decommissioned id back in service: its deny block leaves the ACL, its new
            # password joins the password file, and the broker rereads them.
            _, reload_error = BrokerFiles.from_settings(state.settings).sync(session, state.ca)
        elif state.password_writes is not None:
            # A new device changes the password file only, and a pallet of them shares its
            # writes and reloads (fleet_server.auth.broker_files.GroupedWrites).
            try:
                _, reload_error = state.password_writes.write()
            except OSError as e:
                # Enrolled all the same (the token is spent): the file is written again at the
                # next enrollment and at start.
                log.error("%s enrolled, but the broker's password file was not written: %s",
                          body.device_id, e)  # fmt: skip
                reload_error = None
        else:
            reload_error = None
        if reload_error is not None:
            log.warning(
                "%s: %s enrolled, the broker has not reread its files", reload_error,
                body.device_id,
            )  # fmt: skip
    return done.reply


def _the_device_itself(
    device_id: Annotated[str, Path(pattern=DEVICE_ID_PATTERN)], principal: PrincipalDep
) -> Principal:
    """The device named in the path, authenticated by its own credential (a dependency, so
    that anyone else is refused before the body is looked at)."""
    if principal.device_id != device_id:
        raise PermissionDeniedError("only the device itself renews its certificate")
    return principal


@router.post(
    "/v1/devices/{device_id}/certificate",
    tags=["devices"],
    openapi_extra=struct_openapi(CertificateRequest, CertificateRenewal),
)
def renew_device_certificate(
    device_id: Annotated[str, Path(pattern=DEVICE_ID_PATTERN)],
    state: StateDep,
    session: SessionDep,
    _: Annotated[Principal, Depends(_the_device_itself)],
    body: Annotated[CertificateRequest, struct_body(CertificateRequest)],
) -> Response:
    """A device's new MQTT client certificate, for a certificate request of a new key (CN =
    its id), before the one it has expires. Only the device itself may ask (its credential);
    the old certificate stays valid until it expires, since the device switches only once
    the broker accepted the new one."""
    renewal = renew_certificate(
        session,
        state.ca,
        device_id,
        body.csr,
        validity_s=state.settings.device_certificate_validity_s,
    )
    return Response(renewal.to_json(), media_type="application/json")


class DecommissionBody(RequestBody):
    reason: str = Field(default="", max_length=500)


class DecommissionReply(BaseModel):
    device_id: str
    decommissioned_at: datetime
    #: Client certificates revoked (named in the broker's CRL).
    certificates_revoked: int
    #: The broker's files that changed (CRL, ACL, password file).
    broker_files: list[str]
    #: Whether the broker was told to reread them (None: no reload command is configured).
    broker_reloaded: bool | None
    #: The device's retained messages (desired state, status, online) were cleared.
    retained_cleared: bool
    #: What still needs a hand: a reload that failed or was not configured, a broker that did
    #: not acknowledge.
    warnings: list[str]


@router.post(
    "/v1/devices/{device_id}/decommission", response_model=DecommissionReply, tags=["devices"]
)
def decommission_device(
    device_id: Annotated[str, Path(pattern=DEVICE_ID_PATTERN)],
    state: StateDep,
    session: SessionDep,
    principal: Admin,
    body: DecommissionBody | None = None,
) -> DecommissionReply:
    """Take a device out of service for good (lost, sold, retired): its REST credential and
    client certificates are revoked (the broker's CRL and ACL rewritten and reloaded), its
    retained messages cleared, and it leaves every cohort; its history stays. Enrolling the
    id again takes a new token."""
    files = BrokerFiles.from_settings(state.settings)
    done = decommission(
        session,
        device_id,
        actor=principal.name,
        reason=body.reason if body is not None else "",
        ca=state.ca,
        files=files,
    )
    warnings: list[str] = []
    reloaded: bool | None = None
    if files.reload_command:
        try:
            files.reload()
            reloaded = True
        except TransportError as e:
            reloaded = False
            warnings.append(f"{e.message}: reload the broker by hand for the revocation to hold")
    elif done.files:
        warnings.append(
            "no EDGEFLEET_BROKER_RELOAD_COMMAND is set: reload the broker (kill -HUP) for the "
            "revocation to hold"
        )
    elif not files.configured:
        warnings.append(
            "the server does not manage the broker's CRL or ACL (EDGEFLEET_BROKER_CRL_FILE, "
            "EDGEFLEET_BROKER_ACL_FILE): the device's certificate is still accepted by it"
        )
    cleared = state.control.clear_retained(device_id)
    if not cleared:
        warnings.append("the broker did not acknowledge clearing the device's retained messages")
    state.rollouts.wake()
    return DecommissionReply(
        device_id=device_id,
        decommissioned_at=done.at,
        certificates_revoked=done.certificates_revoked,
        broker_files=[str(p) for p in done.files],
        broker_reloaded=reloaded,
        retained_cleared=cleared,
        warnings=warnings,
    )
