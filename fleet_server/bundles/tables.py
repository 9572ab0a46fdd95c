"""One row per built bundle. (model version, profile) is unique: a build is deterministic for
its inputs, so a second deployment of the same version to the same profile reuses it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import JSON, Column, UniqueConstraint
from sqlmodel import Field, SQLModel


class Bundle(SQLModel, table=True):
    __tablename__ = "bundles"
    __table_args__ = (UniqueConstraint("model_version_id", "profile"),)

    sha256: str = Field(primary_key=True, max_length=64)
    model_version_id: int = Field(foreign_key="model_versions.id", index=True)
    profile: str = Field(max_length=63)
    runtime: str = Field(max_length=32)
    precision: str = Field(max_length=8)
    size: int
    manifest: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    passed_over: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: datetime


class BundlePublic(BaseModel):
    sha256: str
    model: str
    version: str
    profile: str
    runtime: str
    precision: str
    size: int
    passed_over: list[str]
    created_at: datetime
