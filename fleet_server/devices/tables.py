"""Devices, and each device's desired-state document.

The desired state lives here, not only in the broker: a broker can lose retained messages
on a crash, and the server re-sends from this table when a device reports a stale ``seq``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column
from sqlmodel import Field, SQLModel

from fleet_server.database import UtcPublic


class DeviceBase(SQLModel):
    id: str = Field(primary_key=True, max_length=63)
    profile: str = Field(max_length=63, index=True)
    labels: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    enrolled_at: datetime
    last_seen_at: datetime | None = None
    online: bool = False
    agent_version: str | None = None
    reported_seq: int = 0
    reported: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    #: Runtime name → version the device has (from enrollment and status reports); None: unknown.
    runtimes: dict[str, str] | None = Field(default=None, sa_column=Column(JSON))
    #: Set by ``edgefleet devices decommission``: its credential and certificates are revoked,
    #: it belongs to no cohort, and its history stays. Enrolling the id again clears it.
    decommissioned_at: datetime | None = Field(default=None, index=True)


class Device(DeviceBase, table=True):
    __tablename__ = "devices"

    secret_hash: str = Field(unique=True, max_length=64)
    #: Mosquitto-format hash of the device's MQTT password (password-auth brokers).
    mqtt_password_hash: str | None = Field(default=None, max_length=160)


class DesiredStateRecord(SQLModel, table=True):
    __tablename__ = "desired_states"

    device_id: str = Field(primary_key=True, foreign_key="devices.id", max_length=63)
    seq: int
    #: The envelope exactly as published (``SignedDesiredState`` as JSON).
    document: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    updated_at: datetime
    #: The document's expiry and the version of the keyring it travels with, beside it so
    #: that checking thousands of devices reads no document (null in rows from before them:
    #: read from the document).
    expires_at: datetime | None = None
    keyring_version: int | None = None
    #: The document's slots alone (what a rollout reads for thousands of devices, without
    #: the keyring that travels in each document); null in rows from before it.
    slots: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))


class BundleGrant(SQLModel, table=True):
    """A bundle a device was assigned, now or earlier: it may download it (a rollback fetches
    the previous version again). Written with every desired-state document."""

    __tablename__ = "bundle_grants"

    device_id: str = Field(primary_key=True, foreign_key="devices.id", max_length=63)
    bundle_sha256: str = Field(primary_key=True, max_length=64)
    granted_at: datetime


class DeviceTransition(SQLModel, table=True):
    """One step of a slot's lifecycle, as the device reported it (each status report carries
    its last transition): the device's history on the dashboard."""

    __tablename__ = "device_transitions"

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(foreign_key="devices.id", index=True, max_length=63)
    slot: str = Field(max_length=128)
    from_state: str = Field(max_length=16)
    to_state: str = Field(max_length=16)
    event: str = Field(max_length=32)
    at: datetime
    bundle_sha256: str | None = Field(default=None, max_length=64)
    reason: str | None = Field(default=None, max_length=64)
    message: str | None = Field(default=None, max_length=500)


class DeviceCertificate(SQLModel, table=True):
    """A client certificate the fleet CA issued to a device (at enrollment or renewal): its
    serial is what a revocation list names."""

    __tablename__ = "device_certificates"

    #: The serial number, lowercase hex.
    serial: str = Field(primary_key=True, max_length=40)
    device_id: str = Field(foreign_key="devices.id", index=True, max_length=63)
    issued_at: datetime
    not_after: datetime
    revoked_at: datetime | None = Field(default=None, index=True)


# --- API schemas -------------------------------------------------------------------------------


class DevicePublic(DeviceBase, UtcPublic):
    desired_seq: int
    #: When the MQTT client certificate it connects with expires, as its status reports it;
    #: before its first report, the newest unrevoked one on file (None: none, e.g. a
    #: password-auth fleet). The agent renews it with a third left.
    certificate_expires_at: datetime | None = None
