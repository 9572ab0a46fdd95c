"""Decommissioning a device (lost, sold, retired): it can no longer reach the fleet, and its
history stays.

In one transaction: its REST credential is replaced by one nobody holds, its MQTT password
removed, every client certificate the fleet CA issued it revoked, its desired state dropped
(nothing is resent to it) and the decommission recorded; the devices table keeps its row, so
its reports, transitions, telemetry and rollout events stay readable. The broker's files are
written from that transaction before it commits (a CRL naming the certificates, an ACL that
denies the device everything, the password file without it); if they cannot be written,
nothing is committed and the files are put back. Cohorts leave it out from then on (the rollout
engine releases it from any rollout on its next step). After the commit the caller makes the
broker reread its files and clears the device's retained messages.

Enrolling the same id again takes a new token (the old one was used), and gives it a new
identity (:mod:`fleet_server.auth.enrollment`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import delete, update
from sqlmodel import Session

from fleet_server.audit.service import record
from fleet_server.auth.broker_files import BrokerFiles
from fleet_server.auth.ca import FleetCA
from fleet_server.auth.service import DEVICE_SECRET_PREFIX, hash_secret, new_secret
from fleet_server.devices.tables import DesiredStateRecord, Device, DeviceCertificate
from fleet_server.errors import ConflictError, NotFoundError, UnavailableError

_DEVICES = Device.__table__  # type: ignore[attr-defined]
_CERTIFICATES = DeviceCertificate.__table__  # type: ignore[attr-defined]
_DESIRED = DesiredStateRecord.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Decommissioned:
    device_id: str
    at: datetime
    #: Client certificates revoked now (a device enrolled before certificates were recorded
    #: has none on file: the ACL still denies it everything).
    certificates_revoked: int
    #: The broker's files that changed.
    files: list[Path]


def decommission(
    session: Session,
    device_id: str,
    *,
    actor: str,
    reason: str,
    ca: FleetCA,
    files: BrokerFiles,
) -> Decommissioned:
    device = session.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"no device {device_id!r} is enrolled (edgefleet devices list)")
    if device.decommissioned_at is not None:
        raise ConflictError(
            f"device {device_id!r} was decommissioned at "
            f"{device.decommissioned_at:%Y-%m-%d %H:%M:%S} UTC",
            reason="decommissioned",
        )
    now = datetime.now(UTC)
    conn = session.connection()
    conn.execute(
        update(_DEVICES)
        .where(_DEVICES.c.id == device_id)
        .values(
            decommissioned_at=now,
            secret_hash=hash_secret(new_secret(DEVICE_SECRET_PREFIX)),  # held by nobody
            mqtt_password_hash=None,
            online=False,
        )
    )
    revoked = conn.execute(
        update(_CERTIFICATES)
        .where(_CERTIFICATES.c.device_id == device_id, _CERTIFICATES.c.revoked_at.is_(None))
        .values(revoked_at=now)
    ).rowcount
    conn.execute(delete(_DESIRED).where(_DESIRED.c.device_id == device_id))
    record(session, actor, "device.decommission", device_id, reason=reason,
           certificates_revoked=revoked)  # fmt: skip
    try:
        written = files.write(files.contents(session, ca))
    except OSError as e:
        session.rollback()
        _restore(session, ca, files)
        raise UnavailableError(
            f"could not write the broker's files ({e}); nothing was changed: fix the path or "
            "its permissions (EDGEFLEET_BROKER_CRL_FILE, _ACL_FILE, _PASSWORD_FILE)"
        ) from e
    session.commit()
    return Decommissioned(device_id, now, revoked, written)


def _restore(session: Session, ca: FleetCA, files: BrokerFiles) -> None:
    """Put the files back as the committed database has them (a file written before another
    failed would otherwise name a device that is still in service)."""
    # The same fault again is left for the next start, which writes them from the database.
    with contextlib.suppress(OSError):
        files.write(files.contents(session, ca))
    session.rollback()
