"""Device lookup and selection, and recording what devices report. (Enrollment, which
issues a device its credentials, is :mod:`fleet_server.auth.enrollment`.)"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func
from sqlmodel import Session, col, select

from fleet_server.audit import service as audit
from fleet_server.database import aware
from fleet_server.devices.selectors import LABEL_KEY_PATTERN, LABEL_VALUE_PATTERN, Selector
from fleet_server.devices.tables import (
    DesiredStateRecord,
    Device,
    DeviceCertificate,
    DevicePublic,
    DeviceTransition,
)
from fleet_server.errors import InvalidInputError, NotFoundError


def to_public(session: Session, device: Device) -> DevicePublic:
    desired = session.get(DesiredStateRecord, device.id)
    return DevicePublic.model_validate(
        device,
        update={
            "desired_seq": desired.seq if desired else 0,
            "certificate_expires_at": _certificate_expiry(session, device),
        },
    )


def _certificate_expiry(session: Session, device: Device) -> datetime | None:
    """The certificate the device says it uses (one the broker refused after a renewal is
    on file, and not in use); before it reports one, the newest valid one on file."""
    if device.decommissioned_at is not None:
        return None  # every certificate it had is revoked
    in_use = (device.reported or {}).get("certificate")
    if isinstance(in_use, dict) and isinstance(in_use.get("not_after"), str):
        try:
            return datetime.fromisoformat(in_use["not_after"])
        except ValueError:
            pass
    expires: datetime | None = session.exec(
        select(func.max(DeviceCertificate.not_after)).where(
            DeviceCertificate.device_id == device.id,
            col(DeviceCertificate.revoked_at).is_(None),
        )
    ).one()
    return expires


def get_device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"device {device_id!r} is not enrolled", device_id=device_id)
    return device


def list_devices(
    session: Session, selector: Selector | dict[str, str] | None = None
) -> list[Device]:
    devices = session.exec(select(Device).order_by(col(Device.id))).all()
    if selector:
        chosen = selector if isinstance(selector, Selector) else Selector.from_labels(selector)
        devices = [d for d in devices if chosen.matches(d.labels, d.profile)]
    return list(devices)


def change_labels(
    session: Session, device_id: str, set_labels: dict[str, str], remove: list[str], actor: str
) -> Device:
    """Set and remove labels (a key in both is refused), audited; commits."""
    both = sorted(set(set_labels) & set(remove))
    if both:
        raise InvalidInputError(f"labels both set and removed: {both}", field="remove")
    for key, value in set_labels.items():
        if not re.match(LABEL_KEY_PATTERN, key) or key == "profile":
            raise InvalidInputError(
                f"label key {key!r} must match {LABEL_KEY_PATTERN} and not be 'profile'",
                field="set",
            )
        if not re.match(LABEL_VALUE_PATTERN, value):
            raise InvalidInputError(
                f"label {key}={value!r}: the value must match {LABEL_VALUE_PATTERN}", field="set"
            )
    device = get_device(session, device_id)
    labels = {k: v for k, v in device.labels.items() if k not in remove}
    labels.update(set_labels)
    device.labels = labels
    session.add(device)
    audit.record(session, actor, "device.labels", device_id, set=set_labels, remove=remove)
    session.commit()
    return device


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


def transitions(session: Session, device_id: str, limit: int = 50) -> list[DeviceTransition]:
    """The device's latest lifecycle steps, newest first."""
    return list(
        session.exec(
            select(DeviceTransition)
            .where(DeviceTransition.device_id == device_id)
            .order_by(col(DeviceTransition.at).desc(), col(DeviceTransition.id).desc())
            .limit(limit)
        ).all()
    )


#: Rows read per statement when many devices are read at once.
_CHUNK = 500


@dataclass(frozen=True)
class DesiredSummary:
    """A device's stored document without the document: what deciding to re-send needs."""

    seq: int
    expires_at: datetime
    keyring_version: int | None


def desired_summaries(session: Session, device_ids: list[str]) -> dict[str, DesiredSummary]:
    out: dict[str, DesiredSummary] = {}
    t = DesiredStateRecord
    for start in range(0, len(device_ids), _CHUNK):
        chunk = device_ids[start : start + _CHUNK]
        rows = session.exec(
            select(t.device_id, t.seq, t.expires_at, t.keyring_version).where(
                col(t.device_id).in_(chunk)
            )
        ).all()
        for device_id, seq, expires_at, ring in rows:
            if expires_at is None:  # a row from before these columns: read the document
                record = session.get(DesiredStateRecord, device_id)
                assert record is not None
                signed = record.document["signed"]
                expires_at = datetime.fromisoformat(signed["expires_at"])
                ring = ((record.document.get("keyring") or {}).get("signed") or {}).get("version")
            out[device_id] = DesiredSummary(seq, aware(expires_at), ring)
    return out
