"""Models and model versions. A version is immutable once stored: its ONNX file is in the
artifact store under ``source_sha256``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


class MLModel(SQLModel, table=True):
    __tablename__ = "models"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, max_length=128)
    created_at: datetime


class ModelVersionBase(SQLModel):
    version: str = Field(max_length=64)
    description: str = ""
    source_sha256: str = Field(max_length=64)
    size: int
    filename: str = Field(max_length=255)
    opset: int
    ir_version: int
    producer: str = ""
    inputs: list[dict[str, Any]] = Field(sa_column=Column(JSON, nullable=False))
    outputs: list[dict[str, Any]] = Field(sa_column=Column(JSON, nullable=False))
    #: sha256 of the calibration / validation ``.npz`` sets in the artifact store, if uploaded.
    calibration_sha256: str | None = Field(default=None, max_length=64)
    calibration_samples: int | None = None
    validation_sha256: str | None = Field(default=None, max_length=64)
    validation_samples: int | None = None
    #: The model card (Markdown), as pushed.
    card: str = Field(default="", sa_column=Column(Text, nullable=False, server_default=""))
    #: key → value: training data reference, commit, owner, offline metrics…
    meta: dict[str, str] = Field(
        default_factory=dict, sa_column=Column(JSON, nullable=False, server_default="{}")
    )
    #: Versions of the same model this one was derived from (lineage).
    parents: list[str] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False, server_default="[]")
    )
    created_at: datetime
    created_by: str = Field(max_length=128)


class ModelVersion(ModelVersionBase, table=True):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    model_id: int = Field(foreign_key="models.id", index=True)


class ModelVersionPublic(ModelVersionBase):
    model: str


class ModelPublic(SQLModel):
    name: str
    created_at: datetime
    versions: list[ModelVersionPublic]
