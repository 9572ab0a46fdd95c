"""One row per built bundle. A second deployment with the same build inputs (``cache_key``)
reuses it, until its signing key is revoked or expires, when it is built and signed again."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column
from sqlmodel import Field, SQLModel

from fleet_server.database import UtcPublic


class BundleBase(SQLModel):
    sha256: str = Field(primary_key=True, max_length=64)
    profile: str = Field(max_length=63)
    runtime: str = Field(max_length=32)
    precision: str = Field(max_length=8)
    signing_key_id: str = Field(max_length=32)
    size: int
    passed_over: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: datetime
    #: The signed manifest: files, toolchain versions, parity report.
    manifest: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))


class Bundle(BundleBase, table=True):
    __tablename__ = "bundles"

    model_version_id: int = Field(foreign_key="model_versions.id", index=True)
    #: The build inputs' key (see fleet_server.builds): equal keys, equivalent bundles.
    cache_key: str = Field(max_length=64, index=True)


class BundlePublic(BundleBase, UtcPublic):
    model: str
    version: str
