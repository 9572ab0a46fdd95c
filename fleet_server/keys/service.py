"""Online keys, keyring installs, and the signer.

Online private keys live in ``<data_dir>/keys/online/<keyid>.pem`` (mode 0600); the root
private key never reaches the server (except the development bootstrap, which says so).

A keyring install is refused unless: the root signature verifies against the pinned root
(the first install pins it), the version is higher than the installed one, it has not
expired, and at least one key in it is one this server holds, unrevoked and unexpired —
otherwise the fleet could no longer be updated.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)
from sqlalchemy import func as sa_func
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from edge_agent.contracts.durable import write_atomic
from edge_agent.contracts.errors import BundleError
from edge_agent.trust import (
    KeyEntry,
    Keyring,
    PinnedRoot,
    Signature,
    SignedKeyring,
    SignedRoot,
    key_id,
    verify_keyring,
    walk_roots,
)
from edge_agent.trust.signing import public_key_from_b64, public_key_to_b64
from fleet_server.audit.service import record as audit
from fleet_server.database import aware
from fleet_server.errors import ConflictError, InvalidInputError
from fleet_server.keys.tables import KeyringRecord, OnlineKeyPublic, RootVersion

log = logging.getLogger(__name__)


def sign_bytes(key: Ed25519PrivateKey, message: bytes) -> Signature:
    import base64

    return Signature(
        keyid=key_id(key.public_key()), sig=base64.b64encode(key.sign(message)).decode()
    )


def sign_keyring(root: Ed25519PrivateKey, ring: Keyring) -> SignedKeyring:
    return SignedKeyring(signed=ring, signatures=[sign_bytes(root, ring.canonical())])


class OnlineKeyStore:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def create(self, ttl: timedelta) -> OnlineKeyPublic:
        key = Ed25519PrivateKey.generate()
        kid = key_id(key.public_key())
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        path = self.dir / f"{kid}.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return OnlineKeyPublic(
            keyid=kid,
            public=public_key_to_b64(key.public_key()),
            expires_at=(datetime.now(UTC) + ttl).replace(microsecond=0),
        )

    def load(self, kid: str) -> Ed25519PrivateKey | None:
        path = self.dir / f"{kid}.pem"
        if not path.is_file():
            return None
        key = load_pem_private_key(path.read_bytes(), password=None)
        assert isinstance(key, Ed25519PrivateKey)
        return key


@dataclass(frozen=True)
class FleetSigner:
    """Signs with the newest usable online key of the keyring in force."""

    keyring: SignedKeyring
    key: Ed25519PrivateKey
    keyid: str
    root_public: str
    #: Every root document after the first (empty until a rotation): documents carry them so
    #: that a device walks from the root it pinned to the one in force.
    roots: list[SignedRoot] = field(default_factory=list)

    def sign(self, message: bytes) -> Signature:
        return sign_bytes(self.key, message)

    def usable(self, kid: str | None, now: datetime | None = None) -> bool:
        """Whether something signed by ``kid`` still verifies under this keyring."""
        entry = self.keyring.signed.keys.get(kid or "")
        return (
            entry is not None
            and not entry.revoked
            and (now or datetime.now(UTC)) < entry.expires_at
        )


_NEWEST_VERSION = sa_select(sa_func.max(KeyringRecord.version))


def current_record(session: Session) -> KeyringRecord | None:
    return session.exec(select(KeyringRecord).order_by(col(KeyringRecord.version).desc())).first()


def choose_signing_key(ring: Keyring, keys: OnlineKeyStore) -> tuple[str, Ed25519PrivateKey] | None:
    now = datetime.now(UTC)
    usable = [
        (entry.expires_at, kid)
        for kid, entry in ring.keys.items()
        if not entry.revoked and now < entry.expires_at
    ]
    for _, kid in sorted(usable, reverse=True):  # the longest-lived (newest) key first
        key = keys.load(kid)
        if key is not None:
            return kid, key
    return None


def roots(session: Session) -> list[RootVersion]:
    """Every root version after the first, oldest first."""
    return list(session.exec(select(RootVersion).order_by(col(RootVersion.version))).all())


def _next_root(
    session: Session, current: KeyringRecord | None, document: dict[str, object]
) -> SignedRoot:
    """``document`` as the next root version: signed by the root in force and by itself."""
    if current is None:
        raise ConflictError("no root yet: the first keyring pins it (edgefleet keys init)")
    try:
        signed = SignedRoot.from_dict(document)
    except ValueError as e:
        raise InvalidInputError(f"root document refused: {e}", field="root") from e
    held = roots(session)
    version = held[-1].version if held else 1
    if signed.signed.version != version + 1:
        raise ConflictError(
            f"root version {signed.signed.version} does not follow the root in force "
            f"(version {version})",
            field="root",
        )
    try:
        walk_roots(PinnedRoot(public_key_from_b64(current.root_public), version), [signed])
    except BundleError as e:
        raise InvalidInputError(f"root document refused: {e.message}", field="root") from e
    return signed


def install_keyring(
    session: Session,
    keys: OnlineKeyStore,
    root_public_b64: str,
    document: dict[str, object],
    actor: str,
    root_document: dict[str, object] | None = None,
) -> KeyringRecord:
    """Install the next keyring version, signed by the root in force; with ``root_document``
    (a root rotation), the next root version and a keyring signed by it, together."""
    current = current_record(session)
    new_root = _next_root(session, current, root_document) if root_document else None
    if new_root is not None and new_root.signed.public != root_public_b64:
        raise InvalidInputError(
            "the keyring's root is not the new root the rotation installs",
            field="root_public_key",
        )
    try:
        root = public_key_from_b64(root_public_b64)
        signed = SignedKeyring.from_dict(document)
        ring = verify_keyring(signed, root)
    except BundleError as e:
        raise InvalidInputError(f"keyring refused: {e.message}", field="keyring") from e
    except ValueError as e:
        raise InvalidInputError(f"keyring refused: {e}", field="keyring") from e
    if current is not None:
        if new_root is None and current.root_public != root_public_b64:
            raise ConflictError(
                "this keyring is signed by another root than the one in force; a new root is "
                "installed only by a rotation its predecessor signed (edgefleet keys "
                "rotate-root)",
                field="root_public_key",
            )
        if ring.version <= current.version:
            raise ConflictError(
                f"keyring version {ring.version} is not newer than the installed {current.version}"
            )
    if choose_signing_key(ring, keys) is None:
        raise InvalidInputError(
            "no key in this keyring is an unrevoked, unexpired key held by this server; "
            "create one first (edgefleet keys rotate)",
            field="keyring",
        )
    record = KeyringRecord(
        version=ring.version,
        root_public=root_public_b64,
        document=signed.to_dict(),
        installed_at=datetime.now(UTC),
        installed_by=actor,
    )
    session.add(record)
    if new_root is not None:
        session.add(
            RootVersion(
                version=new_root.signed.version,
                public=new_root.signed.public,
                document=new_root.to_dict(),
                installed_at=datetime.now(UTC),
                installed_by=actor,
            )
        )
        audit(session, actor, "root.rotate", f"v{new_root.signed.version}",
              public=new_root.signed.public, keyring_version=ring.version)  # fmt: skip
    audit(session, actor, "keyring.install", f"v{ring.version}", keys=describe(record))
    return record


class ServerKeys:
    """The signer in force, reloaded when another keyring version is installed."""

    def __init__(self, keys_dir: Path) -> None:
        self.store = OnlineKeyStore(keys_dir / "online")
        self.dir = keys_dir
        self._cached: FleetSigner | None = None
        self._version = 0
        self._lock = threading.Lock()

    def signer(self, session: Session) -> FleetSigner:
        # The newest version alone is read each time (every enrollment and signing asks);
        # the keyring document only when it changed.
        version = session.connection().execute(_NEWEST_VERSION).scalar()
        if version is None:
            raise ConflictError(
                "the fleet has no signing keys yet: run `edgefleet keys init` (production) or "
                "start the server with EDGEFLEET_ENV=development",
                reason="no_keys",
            )
        with self._lock:
            if self._cached is None or self._version != version:
                record = session.get(KeyringRecord, version)
                assert record is not None  # keyrings are never deleted
                signed = SignedKeyring.from_dict(record.document)
                chosen = choose_signing_key(signed.signed, self.store)
                if chosen is None:
                    raise ConflictError(
                        "no usable signing key: every key of the keyring is revoked, expired or "
                        "not held by this server; run `edgefleet keys rotate`",
                        reason="no_keys",
                    )
                chain = [SignedRoot.from_dict(r.document) for r in roots(session)]
                self._cached = FleetSigner(signed, chosen[1], chosen[0], record.root_public,
                                           chain)  # fmt: skip
                self._version = record.version
            return self._cached

    def bootstrap_development(self, engine: Engine) -> Path | None:
        """Development only: create a root key in the data dir and install keyring v1.

        A production fleet keeps its root key offline (``edgefleet keys init``).
        """
        with Session(engine) as session:
            if current_record(session) is not None:
                return None
            root_path = self.dir / "dev-root.pem"
            root = Ed25519PrivateKey.generate()
            write_atomic(
                root_path,
                root.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
                mode=0o600,
            )
            online = self.store.create(timedelta(days=365))
            now = datetime.now(UTC).replace(microsecond=0)
            ring = Keyring(
                version=1,
                issued_at=now,
                expires_at=now + timedelta(days=365),
                keys={online.keyid: KeyEntry(public=online.public, expires_at=online.expires_at)},
            )
            install_keyring(
                session,
                self.store,
                public_key_to_b64(root.public_key()),
                sign_keyring(root, ring).to_dict(),
                "bootstrap-development",
            )
            session.commit()
            return root_path


def describe(record: KeyringRecord) -> list[dict[str, object]]:
    ring = SignedKeyring.from_dict(record.document).signed
    now = datetime.now(UTC)
    return [
        {
            "keyid": kid,
            "expires_at": aware(e.expires_at).isoformat(),
            "state": "revoked" if e.revoked else ("expired" if now >= e.expires_at else "valid"),
        }
        for kid, e in ring.keys.items()
    ]
