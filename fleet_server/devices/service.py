"""Enrollment, device lookup and selection, and recording what devices report."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from edge_agent.protocol.status import ReportedStatus
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
from fleet_server.database import aware
from fleet_server.devices.tables import (
    DesiredStateRecord,
    Device,
    DevicePublic,
    EnrollmentToken,
    EnrollmentTokenCreate,
    EnrollmentTokenPublic,
    EnrollRequest,
    EnrollResponse,
)
from fleet_server.errors import AuthenticationError, ConflictError, InvalidInputError, NotFoundError


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
    if body.profile is not None:
        _check_profile(catalog, body.profile)
    token = new_secret(ENROLLMENT_TOKEN_PREFIX)
    now = datetime.now(UTC)
    row = EnrollmentToken(
        token_hash=hash_secret(token),
        profile=body.profile,
        labels=body.labels,
        created_at=now,
        created_by=actor,
        expires_at=now + timedelta(seconds=body.ttl_s or default_ttl_s),
    )
    session.add(row)
    record(
        session,
        actor,
        "enrollment_token.create",
        body.profile or "*",
        labels=body.labels,
        expires_at=row.expires_at.isoformat(),
    )
    session.commit()
    return EnrollmentTokenPublic(
        token=token, expires_at=row.expires_at, profile=body.profile, labels=body.labels
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
) -> EnrollResponse:
    """Trade a one-time token for a device identity. A refused request consumes nothing."""
    token = session.exec(
        select(EnrollmentToken).where(EnrollmentToken.token_hash == hash_secret(req.token))
    ).first()
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
    if session.get(Device, req.device_id) is not None:
        raise ConflictError(
            f"device {req.device_id!r} is already enrolled", device_id=req.device_id
        )
    client_cert = ca.sign_device_csr(req.csr, req.device_id) if req.csr else None
    secret = new_secret(DEVICE_SECRET_PREFIX)
    mqtt_password = new_secret("")
    device = Device(
        id=req.device_id,
        profile=req.profile,
        labels={**token.labels, **req.labels},
        secret_hash=hash_secret(secret),
        mqtt_password_hash=mosquitto_hash(mqtt_password),
        enrolled_at=now,
        runtimes=req.runtimes,
    )
    token.used_at, token.used_by = now, req.device_id
    session.add(device)
    session.add(token)
    record(session, f"device:{device.id}", "device.enroll", device.id, profile=device.profile)
    try:
        session.commit()
    except IntegrityError as e:
        session.rollback()
        raise ConflictError(f"device {req.device_id!r} is already enrolled") from e
    return EnrollResponse(
        device_id=device.id,
        profile=device.profile,
        device_secret=secret,
        server_url=server_url,
        mqtt_url=mqtt_url,
        root_public_key=root_public_key,
        client_cert=client_cert,
        ca_cert=ca.cert_pem if client_cert else None,
        mqtt_password=mqtt_password,
    )


def to_public(session: Session, device: Device) -> DevicePublic:
    desired = session.get(DesiredStateRecord, device.id)
    return DevicePublic(
        id=device.id,
        profile=device.profile,
        labels=device.labels,
        enrolled_at=aware(device.enrolled_at),
        last_seen_at=aware(device.last_seen_at) if device.last_seen_at else None,
        online=device.online,
        agent_version=device.agent_version,
        runtimes=device.runtimes,
        desired_seq=desired.seq if desired else 0,
        reported_seq=device.reported_seq,
        reported=device.reported,
    )


def get_device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"device {device_id!r} is not enrolled", device_id=device_id)
    return device


def list_devices(session: Session, selector: dict[str, str] | None = None) -> list[Device]:
    devices = session.exec(select(Device).order_by(col(Device.id))).all()
    if selector:
        devices = [d for d in devices if all(d.labels.get(k) == v for k, v in selector.items())]
    return list(devices)


def resolve_targets(
    session: Session, device_ids: list[str] | None, selector: dict[str, str] | None
) -> list[Device]:
    """The devices a deployment names: an explicit list (all must be enrolled) or a selector."""
    if bool(device_ids) == bool(selector):
        raise InvalidInputError("name the target devices either by 'devices' or by 'selector'")
    if device_ids:
        unique = list(dict.fromkeys(device_ids))
        found = {
            d.id: d for d in session.exec(select(Device).where(col(Device.id).in_(unique))).all()
        }
        missing = [d for d in unique if d not in found]
        if missing:
            raise NotFoundError(
                f"not enrolled: {', '.join(missing)}", device_ids=missing, field="devices"
            )
        return [found[d] for d in unique]
    devices = list_devices(session, selector)
    if not devices:
        raise InvalidInputError(
            f"no enrolled device matches the selector {selector}", field="selector"
        )
    return devices


def record_presence(session: Session, device_id: str, online: bool) -> Device | None:
    device = session.get(Device, device_id)
    if device is None:
        return None
    device.online = online
    device.last_seen_at = datetime.now(UTC)
    session.add(device)
    session.commit()
    return device


def record_status(session: Session, status: ReportedStatus) -> Device | None:
    device = session.get(Device, status.device_id)
    if device is None:
        return None
    device.reported = status.model_dump(mode="json")
    device.reported_seq = status.desired_seq
    device.agent_version = status.agent_version
    if status.runtimes:
        device.runtimes = dict(status.runtimes)
    device.last_seen_at = datetime.now(UTC)
    session.add(device)
    session.commit()
    return device
