"""The offline root key, on the operator's machine (never on the server).

Stored as a PKCS#8 PEM encrypted with a passphrase (``BestAvailableEncryption``, AES-256 with
scrypt in current ``cryptography``). Building the next keyring version happens here too, so
the server only ever receives a keyring that is already signed.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from edge_agent.contracts.errors import ConfigError
from edge_agent.trust import KeyEntry, Keyring
from fleet_server.keys.tables import OnlineKeyPublic


def create_root_key(path: Path, passphrase: str) -> Ed25519PrivateKey:
    if path.exists():
        raise ConfigError(f"{path} exists; refusing to overwrite a root key")
    if len(passphrase) < 12:
        raise ConfigError("the root key passphrase must be at least 12 characters")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(passphrase.encode())
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key


def load_root_key(path: Path, passphrase: str | None) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the root key: {e.strerror}") from e
    encrypted = b"ENCRYPTED" in data.split(b"\n", 1)[0]
    try:
        key = load_pem_private_key(
            data, password=passphrase.encode() if encrypted and passphrase else None
        )
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path}: cannot open the root key (wrong passphrase?)") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 key")
    return key


def unencrypted_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


def next_keyring(
    current: Keyring | None,
    *,
    add: OnlineKeyPublic | None = None,
    revoke: str | None = None,
    ttl_days: int = 365,
) -> Keyring:
    """The next version: current keys kept (expired ones dropped), ``add`` added, ``revoke``
    marked revoked (kept, so agents know to refuse it)."""
    now = datetime.now(UTC).replace(microsecond=0)
    keys = {
        kid: e
        for kid, e in (current.keys.items() if current else [])
        if e.expires_at > now or e.revoked
    }
    if revoke is not None:
        if revoke not in keys:
            raise ConfigError(f"key {revoke} is not in the keyring")
        keys[revoke] = keys[revoke].replace(revoked=True)
    if add is not None:
        keys[add.keyid] = KeyEntry(public=add.public, expires_at=add.expires_at)
    return Keyring(
        version=(current.version + 1) if current else 1,
        issued_at=now,
        expires_at=now + timedelta(days=ttl_days),
        keys=keys,
    )
