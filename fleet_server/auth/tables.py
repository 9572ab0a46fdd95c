"""API tokens and enrollment tokens. Only a sha256 of each token is stored: tokens are
256-bit random strings, so a fast hash is enough, and a database leak reveals no usable
token."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel
from pydantic import Field as PydanticField
from sqlalchemy import JSON, Column
from sqlmodel import Field, SQLModel

from fleet_server.api.schemas import RequestBody
from fleet_server.database import UtcPublic


class ApiTokenBase(SQLModel):
    name: str = Field(index=True, max_length=128)
    role: str = Field(max_length=16)
    created_at: datetime
    revoked_at: datetime | None = None


class ApiToken(ApiTokenBase, table=True):
    __tablename__ = "api_tokens"

    id: int | None = Field(default=None, primary_key=True)
    token_hash: str = Field(unique=True, max_length=64)


class UiSession(SQLModel, table=True):
    """A dashboard sign-in: the browser holds the secret in an HttpOnly cookie, the table its
    sha256. It acts with its API token's name and role for as long as that token is not
    revoked, until it expires or is signed out."""

    __tablename__ = "ui_sessions"

    secret_hash: str = Field(primary_key=True, max_length=64)
    token_id: int = Field(foreign_key="api_tokens.id", index=True)
    #: Sent back with every action (form field or header) and compared with this.
    csrf: str = Field(max_length=64)
    created_at: datetime
    expires_at: datetime


class ApiTokenPublic(ApiTokenBase, UtcPublic):
    id: int


class EnrollmentToken(SQLModel, table=True):
    __tablename__ = "enrollment_tokens"

    id: int | None = Field(default=None, primary_key=True)
    token_hash: str = Field(unique=True, max_length=64)
    profile: str | None = Field(default=None, max_length=63)
    labels: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime
    created_by: str = Field(max_length=128)
    expires_at: datetime
    used_at: datetime | None = None
    used_by: str | None = Field(default=None, max_length=63)


class EnrollmentTokenCreate(RequestBody):
    #: Restrict the token to one profile (the device must enroll with it).
    profile: str | None = None
    labels: dict[str, str] = PydanticField(default_factory=dict)
    ttl_s: int | None = PydanticField(default=None, gt=0, le=30 * 24 * 3600)


#: Tokens one batch request may create (a pallet of devices, not a fleet's worth of secrets
#: in one answer).
MAX_TOKENS_PER_BATCH = 10_000


class EnrollmentTokenBatchCreate(EnrollmentTokenCreate):
    count: int = PydanticField(ge=1, le=MAX_TOKENS_PER_BATCH)


class EnrollmentTokenBatch(BaseModel):
    tokens: list[str]
    expires_at: datetime
    profile: str | None
    labels: dict[str, str]


class EnrollmentTokenPublic(BaseModel):
    token: str
    expires_at: datetime
    profile: str | None
    labels: dict[str, str]
