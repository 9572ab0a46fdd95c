"""Telemetry tables.

- ``telemetry_batches``: one key per stored batch, (device, stream, seq): the de-duplication
  that makes ingest exactly-once (a batch sent twice is stored once, and acknowledged again).
- ``telemetry_streams``: per device outbox stream, the highest contiguous sequence stored
  (what the device is told), the drops it reported, and its latest process figures.
- ``telemetry_rollups``: per bundle (model version x profile) x rollout x role x time bucket,
  summed counts, the merged latency sketch and summed drift histograms. Every query reads
  these, never raw batches.
- ``telemetry_device_buckets``: which devices reported for a bundle in a bucket (distinct
  device counts).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, UniqueConstraint
from sqlmodel import Field, SQLModel

from fleet_server.database import UtcPublic


class TelemetryBatchKey(SQLModel, table=True):
    __tablename__ = "telemetry_batches"

    device_id: str = Field(primary_key=True, max_length=63)
    stream: str = Field(primary_key=True, max_length=32)
    seq: int = Field(primary_key=True, sa_type=BigInteger)
    interval_end: datetime
    received_at: datetime
    #: Why its figures were refused (they did not fit the bundle): the key is kept so the
    #: device's watermark moves on and a resend is not counted again; the figures are not.
    refused: str | None = Field(default=None, max_length=32)


class TelemetryStreamBase(SQLModel):
    device_id: str = Field(primary_key=True, max_length=63)
    stream: str = Field(primary_key=True, max_length=32)
    acked_seq: int = Field(default=0, sa_type=BigInteger)
    #: The highest sequence stored: above ``acked_seq`` only after a gap.
    max_seq: int = Field(default=0, sa_type=BigInteger)
    batches: int = Field(default=0, sa_type=BigInteger)
    dropped_batches_total: int = Field(default=0, sa_type=BigInteger)
    last_batch_at: datetime | None = None
    cpu_percent: float | None = None
    rss_bytes: int | None = Field(default=None, sa_type=BigInteger)
    temperature_c: float | None = None


class TelemetryStream(TelemetryStreamBase, table=True):
    __tablename__ = "telemetry_streams"


class TelemetryStreamPublic(TelemetryStreamBase, UtcPublic):
    pass


class TelemetryRollup(SQLModel, table=True):
    __tablename__ = "telemetry_rollups"
    __table_args__ = (
        UniqueConstraint("bucket_start", "bundle_sha256", "rollout_id", "role"),
        Index("ix_telemetry_rollups_model_bucket", "model", "bucket_start"),
    )

    id: int | None = Field(default=None, primary_key=True)
    bucket_start: datetime
    #: The bucket's width once retention merged it into a coarser tier (seconds); None: the
    #: ingest bucket (``EDGEFLEET_TELEMETRY_BUCKET_S``).
    resolution_s: int | None = None
    bundle_sha256: str = Field(max_length=64)
    model: str = Field(max_length=128)
    version: str = Field(max_length=64)
    profile: str = Field(max_length=63)
    #: "" when the version did not come with a rollout (a database NULL is never equal).
    rollout_id: str = Field(default="", max_length=64)
    role: str = Field(max_length=8)
    requests: int = Field(default=0, sa_type=BigInteger)
    errors: int = Field(default=0, sa_type=BigInteger)
    nonfinite: int = Field(default=0, sa_type=BigInteger)
    sampled: int = Field(default=0, sa_type=BigInteger)
    #: Labels from the field: labelled predictions, the right ones, labels that came too late.
    labelled: int = Field(default=0, sa_type=BigInteger)
    correct: int = Field(default=0, sa_type=BigInteger)
    late: int = Field(default=0, sa_type=BigInteger)
    #: The merged ``LatencySketch`` (wire form); None before the first latency.
    latency_sketch: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    #: tensor → {"kind", "counts"} summed.
    inputs: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    outputs: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class TelemetryDeviceBucket(SQLModel, table=True):
    __tablename__ = "telemetry_device_buckets"

    bucket_start: datetime = Field(primary_key=True)
    bundle_sha256: str = Field(primary_key=True, max_length=64)
    device_id: str = Field(primary_key=True, max_length=63)


class AlertPolicyBase(SQLModel):
    """Thresholds for one model's health (every version, every profile). None disables."""

    max_error_rate: float | None = Field(default=0.01, ge=0, le=1)
    #: p95 may be at most this multiple of the previous version's p95 on the same profile.
    max_latency_ratio: float | None = Field(default=1.5, gt=1)
    max_psi: float | None = Field(default=0.25, gt=0)
    #: Fewer requests than this in the window: too few to judge.
    min_requests: int = Field(default=100, ge=1)


class AlertPolicy(AlertPolicyBase, table=True):
    __tablename__ = "alert_policies"

    model: str = Field(primary_key=True, max_length=128)


class AlertBase(SQLModel):
    model: str = Field(max_length=128, index=True)
    version: str = Field(max_length=64)
    profile: str = Field(max_length=63)
    #: error_rate / latency_regression / drift
    kind: str = Field(max_length=32)
    #: For drift: "input:x" / "output:probs"; "" otherwise.
    subject: str = Field(default="", max_length=160)
    state: str = Field(default="open", max_length=16, index=True)
    message: str = Field(max_length=500)
    value: float
    threshold: float
    figures: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    raised_at: datetime
    updated_at: datetime
    resolved_at: datetime | None = None


class Alert(AlertBase, table=True):
    __tablename__ = "alerts"

    id: int | None = Field(default=None, primary_key=True)


class AlertPublic(AlertBase, UtcPublic):
    id: int
