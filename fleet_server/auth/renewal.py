"""Renewing a device's MQTT client certificate before it expires.

The device sends a certificate request for a new key, authenticated by its own credential;
the fleet CA signs it for ``device_certificate_validity_s`` (the same validity enrollment
gives). The device switches to it only once the broker accepted it (``edge_agent.link``), so
the old certificate stays valid until it expires: nothing is revoked here. Decommissioning
revokes every certificate a device was given, renewed ones included.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import func, select
from sqlmodel import Session

from edge_agent.protocol.enrollment import CertificateRenewal
from fleet_server.audit.service import record
from fleet_server.auth.ca import FleetCA
from fleet_server.auth.enrollment import record_certificate
from fleet_server.devices.tables import Device, DeviceCertificate
from fleet_server.errors import ConflictError, NotFoundError

_CERTIFICATES = DeviceCertificate.__table__  # type: ignore[attr-defined]

#: Certificates one device may be given in a day: a few failed switches and a retry each,
#: never a device (or a stolen credential) minting them in a loop.
MAX_PER_DAY = 10


def renew_certificate(
    session: Session, ca: FleetCA, device_id: str, csr: str, *, validity_s: int
) -> CertificateRenewal:
    """A new client certificate for ``device_id`` from its CSR (whose CN must be the device's
    id). Refused, changing nothing, for a CSR naming another device, an unknown or
    decommissioned device, or a device past :data:`MAX_PER_DAY` certificates today."""
    device = session.get(Device, device_id)
    if device is None or device.decommissioned_at is not None:
        raise NotFoundError(f"device {device_id!r} is not enrolled", device_id=device_id)
    now = datetime.now(UTC)
    today = (
        session.connection()
        .execute(
            select(func.count())
            .select_from(_CERTIFICATES)
            .where(
                _CERTIFICATES.c.device_id == device_id,
                _CERTIFICATES.c.issued_at > now - timedelta(days=1),
            )
        )
        .scalar_one()
    )
    if today >= MAX_PER_DAY:
        raise ConflictError(
            f"device {device_id!r} was given {today} certificates in the last day (at most "
            f"{MAX_PER_DAY}); try again tomorrow, or enroll it again",
            reason="too_many_certificates",
        )
    cert = ca.issue_device_certificate(csr, device_id, days=validity_s / 86400)
    serial = record_certificate(session, device_id, cert, now)
    record(
        session,
        f"device:{device_id}",
        "device.certificate.renew",
        device_id,
        serial=serial,
        not_after=cert.not_valid_after_utc.isoformat(),
    )
    session.commit()
    return CertificateRenewal(
        device_id=device_id,
        client_cert=cert.public_bytes(Encoding.PEM).decode(),
        ca_cert=ca.cert_pem,
        serial=serial,
        not_after=cert.not_valid_after_utc,
    )
