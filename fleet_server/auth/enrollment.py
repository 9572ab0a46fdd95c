"""Enrollment: a device trades a one-time token for its identity.

The identity is a device credential for REST (only its sha256 is kept), an MQTT password
(Mosquitto's hash format) and, when the device sent a certificate request, an MQTT client
certificate from the fleet CA. A refused request consumes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from edge_agent.protocol.enrollment import EnrollRequest, EnrollResponse
from firmware_profiles import ProfileCatalog, ProfileError
from fleet_server.audit.service import record
from fleet_server.auth.ca import FleetCA
from fleet_server.auth.mqtt_passwords import mosquitto_hash
from fleet_server.auth.service import (
    DEVICE_SECRET_PREFIX,
    ENROLLMENT_TOKEN_PREFIX,
    hash_secret,
    new_secret,
)
from fleet_server.auth.tables import (
    EnrollmentToken,
    EnrollmentTokenBatch,
    EnrollmentTokenBatchCreate,
    EnrollmentTokenCreate,
    EnrollmentTokenPublic,
)
from fleet_server.database import aware
from fleet_server.devices.tables import Device, DeviceCertificate
from fleet_server.errors import AuthenticationError, ConflictError, InvalidInputError

_TOKENS = EnrollmentToken.__table__  # type: ignore[attr-defined]
_DEVICES = Device.__table__  # type: ignore[attr-defined]
_CERTIFICATES = DeviceCertificate.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Enrolled:
    reply: EnrollResponse
    #: The id belonged to a decommissioned device, enrolled again (the broker's files change).
    again: bool


def record_certificate(
    session: Session, device_id: str, cert: x509.Certificate, now: datetime
) -> str:
    """Keep a certificate just issued to a device (its serial is what a revocation list
    names); returns the serial, lowercase hex."""
    serial = format(cert.serial_number, "x")
    session.connection().execute(
        insert(_CERTIFICATES).values(
            serial=serial, device_id=device_id, issued_at=now, not_after=cert.not_valid_after_utc
        )
    )
    return serial


def _check_profile(catalog: ProfileCatalog, name: str) -> None:
    try:
        catalog.get(name)
    except ProfileError as e:
        raise InvalidInputError(e.message, field="profile") from e


def create_enrollment_token(
    session: Session,
    catalog: ProfileCatalog,
    body: EnrollmentTokenCreate,
    *,
    default_ttl_s: int,
    actor: str,
) -> EnrollmentTokenPublic:
    """One one-time token: a batch of one."""
    batch = create_enrollment_tokens(
        session,
        catalog,
        EnrollmentTokenBatchCreate(**body.model_dump(), count=1),
        default_ttl_s=default_ttl_s,
        actor=actor,
    )
    return EnrollmentTokenPublic(
        token=batch.tokens[0], expires_at=batch.expires_at, profile=batch.profile,
        labels=batch.labels,
    )  # fmt: skip


def create_enrollment_tokens(
    session: Session,
    catalog: ProfileCatalog,
    body: EnrollmentTokenBatchCreate,
    *,
    default_ttl_s: int,
    actor: str,
) -> EnrollmentTokenBatch:
    """``body.count`` one-time tokens alike (profile, labels, expiry), in one transaction: all
    of them or none."""
    if body.profile is not None:
        _check_profile(catalog, body.profile)
    now = datetime.now(UTC)
    expires_at = now + timedelta(seconds=body.ttl_s or default_ttl_s)
    tokens = [new_secret(ENROLLMENT_TOKEN_PREFIX) for _ in range(body.count)]
    session.execute(
        insert(_TOKENS),
        [
            {
                "token_hash": hash_secret(token),
                "profile": body.profile,
                "labels": body.labels,
                "created_at": now,
                "created_by": actor,
                "expires_at": expires_at,
            }
            for token in tokens
        ],
    )
    record(
        session,
        actor,
        "enrollment_token.create",
        body.profile or "*",
        labels=body.labels,
        expires_at=expires_at.isoformat(),
        **({"count": body.count} if body.count > 1 else {}),
    )
    session.commit()
    return EnrollmentTokenBatch(
        tokens=tokens, expires_at=expires_at, profile=body.profile, labels=body.labels
    )


def enroll(
    session: Session,
    catalog: ProfileCatalog,
    req: EnrollRequest,
    *,
    server_url: str,
    mqtt_url: str,
    root_public_key: str,
    ca: FleetCA,
    certificate_validity_s: int = 365 * 86400,
) -> Enrolled:
    """Trade a one-time token for a device identity. A refused request consumes nothing.

    Plain statements, no ORM objects (a pallet of devices enrolls at once): the token is
    read, then claimed by an UPDATE that only an unused token matches, so that two devices
    racing with one token cannot both enroll; the device row and the audit entry are written
    in the same transaction."""
    conn = session.connection()  # plain statements: the ORM's machinery is most of their cost
    token = conn.execute(
        select(_TOKENS.c.id, _TOKENS.c.profile, _TOKENS.c.labels, _TOKENS.c.expires_at,
               _TOKENS.c.used_at).where(_TOKENS.c.token_hash == hash_secret(req.token))
    ).first()  # fmt: skip
    if token is None:
        raise AuthenticationError("unknown enrollment token")
    if token.used_at is not None:
        raise AuthenticationError("enrollment token was already used")
    now = datetime.now(UTC)
    if aware(token.expires_at) <= now:
        raise AuthenticationError("enrollment token has expired")
    _check_profile(catalog, req.profile)
    if req.expected_root_public_key not in (None, root_public_key):
        raise ConflictError(
            "this server's root key is not the one the device expects (wrong server?)",
            reason="root_mismatch",
        )
    if token.profile is not None and token.profile != req.profile:
        raise InvalidInputError(
            f"this token enrolls {token.profile!r} devices, not {req.profile!r}", field="profile"
        )
    cert = (
        ca.issue_device_certificate(req.csr, req.device_id, days=certificate_validity_s / 86400)
        if req.csr
        else None
    )
    secret = new_secret(DEVICE_SECRET_PREFIX)
    mqtt_password = new_secret("")
    identity = {
        "profile": req.profile,
        "labels": {**(token.labels or {}), **req.labels},
        "secret_hash": hash_secret(secret),
        "mqtt_password_hash": mosquitto_hash(mqtt_password),
        "enrolled_at": now,
        "runtimes": req.runtimes,
        "online": False,
        "reported_seq": 0,
    }

    def claim() -> None:
        claimed = session.connection().execute(
            update(_TOKENS)
            .where(_TOKENS.c.id == token.id, _TOKENS.c.used_at.is_(None))
            .values(used_at=now, used_by=req.device_id)
        )
        if claimed.rowcount != 1:
            session.rollback()
            raise AuthenticationError("enrollment token was already used")

    claim()
    again = False
    try:
        conn.execute(insert(_DEVICES).values(id=req.device_id, **identity))
    except IntegrityError as e:
        # The id is taken. A decommissioned device's id is enrolled again (a new token, a new
        # identity; its history stays); any other is refused, the token left unused.
        session.rollback()
        claim()
        recommissioned = session.connection().execute(
            update(_DEVICES)
            .where(_DEVICES.c.id == req.device_id, _DEVICES.c.decommissioned_at.is_not(None))
            .values(
                **identity,
                decommissioned_at=None,
                last_seen_at=None,
                agent_version=None,
                reported=None,
            )
        )
        if recommissioned.rowcount != 1:
            session.rollback()
            raise ConflictError(
                f"device {req.device_id!r} is already enrolled", device_id=req.device_id
            ) from e
        again = True
    if cert is not None:
        record_certificate(session, req.device_id, cert, now)
    record(session, f"device:{req.device_id}", "device.enroll", req.device_id,
           profile=req.profile, **({"again": True} if again else {}))  # fmt: skip
    session.commit()
    client_cert = cert.public_bytes(Encoding.PEM).decode() if cert is not None else None
    reply = EnrollResponse(
        device_id=req.device_id,
        profile=req.profile,
        device_secret=secret,
        server_url=server_url,
        mqtt_url=mqtt_url,
        root_public_key=root_public_key,
        client_cert=client_cert,
        ca_cert=ca.cert_pem if client_cert else None,
        mqtt_password=mqtt_password,
    )
    return Enrolled(reply, again)
