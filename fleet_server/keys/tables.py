"""Keyring versions as installed. The newest row is the keyring in force; the root public key
is pinned by the first install and may not change afterwards."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel
from pydantic import Field as PydanticField
from sqlalchemy import JSON, Column
from sqlmodel import Field, SQLModel

from fleet_server.api.schemas import RequestBody


class KeyringRecord(SQLModel, table=True):
    __tablename__ = "keyrings"

    version: int = Field(primary_key=True)
    root_public: str = Field(max_length=64)
    document: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    installed_at: datetime
    installed_by: str = Field(max_length=128)


class RootVersion(SQLModel, table=True):
    """Every root after the first, as installed (``edgefleet keys rotate-root``): its signed
    document (by the root before and by itself), which devices walk to reach the newest."""

    __tablename__ = "root_versions"

    version: int = Field(primary_key=True)
    public: str = Field(max_length=64)
    document: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    installed_at: datetime
    installed_by: str = Field(max_length=128)


class OnlineKeyPublic(BaseModel):
    keyid: str
    public: str
    expires_at: datetime


class OnlineKeyCreate(RequestBody):
    #: An online key lives at most ten years (a key that outlives its hardware is a risk).
    ttl_days: int = PydanticField(default=365, ge=1, le=3650)


class KeyringInstall(RequestBody):
    root_public_key: str
    keyring: dict[str, Any]
    #: A root rotation: the next root version's signed document (by the current root and by
    #: itself); the keyring must then be signed by the new root. Installed together or not at
    #: all.
    root: dict[str, Any] | None = None


class TrustPublic(BaseModel):
    """What a verifier needs: the root key and the keyring it signed."""

    root_public_key: str
    keyring: dict[str, Any]
    #: The root's version (1 until a rotation) and every root document after the first.
    root_version: int = 1
    roots: list[dict[str, Any]] = PydanticField(default_factory=list)
