"""API tokens. Only a sha256 of each token is stored: tokens are 256-bit random strings, so a
fast hash is enough, and a database leak reveals no usable token."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel


class ApiToken(SQLModel, table=True):
    __tablename__ = "api_tokens"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, max_length=128)
    token_hash: str = Field(unique=True, max_length=64)
    role: str = Field(max_length=16)
    created_at: datetime
    revoked_at: datetime | None = None
