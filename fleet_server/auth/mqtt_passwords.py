"""MQTT passwords for brokers without client certificates (the fallback to mTLS).

Each device gets its own random password at enrollment; the server keeps only the hash, in
Mosquitto's own format (``$7$``: PBKDF2-SHA512, 101 iterations, 12-byte salt — checked
against ``mosquitto_passwd`` 2.0.11), and rewrites the broker's password file from the
database. Mosquitto rereads it on SIGHUP.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from sqlmodel import Session, col, select

from fleet_server.devices.tables import Device

ITERATIONS = 101


def mosquitto_hash(password: str, salt: bytes | None = None) -> str:
    salt = salt or os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, ITERATIONS, 64)
    return f"$7${ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def static_entries_path(password_file: Path) -> Path:
    """Entries the server does not manage (its own identity), kept beside the file."""
    return password_file.with_name(password_file.name + ".static")


def password_file_text(session: Session, password_file: Path) -> str:
    """The broker's password file: the static entries plus every device with a password
    (a decommissioned device has none)."""
    static = static_entries_path(password_file)
    lines = static.read_text().splitlines() if static.is_file() else []
    rows = session.exec(
        select(Device.id, Device.mqtt_password_hash)
        .where(col(Device.mqtt_password_hash).is_not(None))
        .order_by(col(Device.id))
    ).all()
    lines += [f"{device_id}:{hashed}" for device_id, hashed in rows]
    return "\n".join(lines) + "\n"
