"""/v1/tokens: API tokens with roles (admin only). A token is shown once, at creation."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlmodel import col, select

from fleet_server.api.deps import Admin, SessionDep
from fleet_server.audit.service import record
from fleet_server.auth.service import Role, issue_api_token
from fleet_server.auth.tables import ApiToken
from fleet_server.database import aware
from fleet_server.errors import ConflictError, NotFoundError

router = APIRouter(prefix="/v1/tokens", tags=["auth"])


class TokenCreate(BaseModel):
    name: str = Field(min_length=1, max_length=128)
    role: Role


class TokenPublic(BaseModel):
    id: int
    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None


class TokenCreated(TokenPublic):
    token: str


def _public(t: ApiToken) -> TokenPublic:
    return TokenPublic(
        id=t.id or 0,
        name=t.name,
        role=t.role,
        created_at=aware(t.created_at),
        revoked_at=aware(t.revoked_at) if t.revoked_at else None,
    )


@router.post("", status_code=201, response_model=TokenCreated)
def create_token(body: TokenCreate, session: SessionDep, principal: Admin) -> TokenCreated:
    record(session, principal.name, "token.create", body.name, role=body.role)
    token, row = issue_api_token(session, body.name, body.role)
    return TokenCreated(**_public(row).model_dump(), token=token)


@router.get("", response_model=list[TokenPublic])
def list_tokens(session: SessionDep, _: Admin) -> list[TokenPublic]:
    return [_public(t) for t in session.exec(select(ApiToken).order_by(col(ApiToken.id))).all()]


@router.delete("/{token_id}", response_model=TokenPublic)
def revoke_token(token_id: int, session: SessionDep, principal: Admin) -> TokenPublic:
    row = session.get(ApiToken, token_id)
    if row is None:
        raise NotFoundError(f"no API token {token_id}")
    if row.revoked_at is not None:
        raise ConflictError(f"API token {token_id} is already revoked")
    row.revoked_at = datetime.now(UTC)
    session.add(row)
    record(session, principal.name, "token.revoke", row.name, token_id=token_id)
    session.commit()
    session.refresh(row)
    return _public(row)
