"""Issuing and checking credentials."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlmodel import Session, col, select

from edge_agent.contracts.durable import write_atomic
from fleet_server.api.principal import Principal, Role
from fleet_server.audit.service import record
from fleet_server.auth.tables import ApiToken, UiSession
from fleet_server.database import aware
from fleet_server.devices.tables import Device
from fleet_server.errors import AuthenticationError, ConflictError, NotFoundError

API_TOKEN_PREFIX = "efa_"
DEVICE_SECRET_PREFIX = "efd_"
ENROLLMENT_TOKEN_PREFIX = "efe_"
UI_SESSION_PREFIX = "efs_"


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def issue_api_token(session: Session, name: str, role: Role) -> tuple[str, ApiToken]:
    """Create a token (committing the session); the plaintext is returned once, never stored."""
    token = new_secret(API_TOKEN_PREFIX)
    row = ApiToken(
        name=name, token_hash=hash_secret(token), role=role, created_at=datetime.now(UTC)
    )
    session.add(row)
    session.commit()
    session.refresh(row)
    return token, row


def list_api_tokens(session: Session) -> list[ApiToken]:
    return list(session.exec(select(ApiToken).order_by(col(ApiToken.id))).all())


def revoke_api_token(session: Session, token_id: int, actor: str) -> ApiToken:
    row = session.get(ApiToken, token_id)
    if row is None:
        raise NotFoundError(f"no API token {token_id}")
    if row.revoked_at is not None:
        raise ConflictError(f"API token {token_id} is already revoked")
    if row.role == "admin" and _active_admins(session) == 1:
        raise ConflictError(
            f"API token {token_id} is the last admin token; create another admin token first "
            "(revoking it would lock every admin out)",
            reason="last_admin",
        )
    row.revoked_at = datetime.now(UTC)
    session.add(row)
    record(session, actor, "token.revoke", row.name, token_id=token_id)
    session.commit()
    session.refresh(row)
    return row


def _active_admins(session: Session) -> int:
    query = select(ApiToken).where(ApiToken.role == "admin", col(ApiToken.revoked_at).is_(None))
    return len(session.exec(query).all())


def authenticate(session: Session, authorization: str | None) -> Principal:
    if not authorization:
        raise AuthenticationError("missing bearer token (Authorization: Bearer …)")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("the Authorization header must be 'Bearer <token>'")
    token_hash = hash_secret(token.strip())
    if token.startswith(DEVICE_SECRET_PREFIX):
        device = session.exec(select(Device).where(Device.secret_hash == token_hash)).first()
        if device is None:
            raise AuthenticationError("unknown device credential")
        return Principal(name=f"device:{device.id}", role="device", device_id=device.id)
    api = _live_api_token(session, token_hash)
    return Principal(name=api.name, role=api.role)


def _live_api_token(session: Session, token_hash: str) -> ApiToken:
    api = session.exec(select(ApiToken).where(ApiToken.token_hash == token_hash)).first()
    if api is None or api.revoked_at is not None:
        raise AuthenticationError("unknown or revoked API token")
    return api


def bootstrap_admin(session: Session, configured: str | None, token_file: Path) -> Path | None:
    """Make sure an admin can log in.

    A configured token (``EDGEFLEET_ADMIN_TOKEN``) is installed as ``bootstrap-admin``. With
    none configured and no token in the database, a new admin token is written to
    ``token_file`` (mode 0600) and that path is returned.
    """
    if configured:
        token_hash = hash_secret(configured)
        if session.exec(select(ApiToken).where(ApiToken.token_hash == token_hash)).first() is None:
            session.add(
                ApiToken(
                    name="bootstrap-admin",
                    token_hash=token_hash,
                    role="admin",
                    created_at=datetime.now(UTC),
                )
            )
            session.commit()
        return None
    if session.exec(select(ApiToken).where(ApiToken.revoked_at == None)).first() is not None:  # noqa: E711
        return None
    token, _ = issue_api_token(session, "bootstrap-admin", "admin")
    write_atomic(token_file, (token + "\n").encode(), mode=0o600)
    return token_file


def open_ui_session(session: Session, token: str, ttl_s: float) -> tuple[str, Principal]:
    """Sign in to the dashboard with an API token: returns the session's secret (the cookie's
    value) and who it acts as. Audited; commits."""
    if token.strip().startswith(DEVICE_SECRET_PREFIX):
        raise AuthenticationError("a device credential cannot sign in to the dashboard")
    row = _live_api_token(session, hash_secret(token.strip()))
    secret = new_secret(UI_SESSION_PREFIX)
    now = datetime.now(UTC)
    ui = UiSession(
        secret_hash=hash_secret(secret),
        token_id=row.id or 0,
        csrf=secrets.token_urlsafe(24),
        created_at=now,
        expires_at=now + timedelta(seconds=ttl_s),
    )
    session.add(ui)
    record(session, row.name, "ui.sign_in", row.name)
    # Expired sign-ins go when a new one comes: the table holds only live ones, and a few.
    for old in session.exec(select(UiSession).where(col(UiSession.expires_at) < now)).all():
        session.delete(old)
    session.commit()
    return secret, Principal(name=row.name, role=row.role, csrf=ui.csrf)


def authenticate_ui_session(session: Session, secret: str | None) -> Principal:
    """Who a dashboard session cookie acts as, with its CSRF token."""
    if not secret:
        raise AuthenticationError("not signed in")
    ui = session.get(UiSession, hash_secret(secret))
    if ui is None or aware(ui.expires_at) <= datetime.now(UTC):
        raise AuthenticationError("the session has ended; sign in again")
    api = session.get(ApiToken, ui.token_id)
    if api is None or api.revoked_at is not None:
        raise AuthenticationError("the session's API token was revoked")
    return Principal(name=api.name, role=api.role, csrf=ui.csrf)


def close_ui_session(session: Session, secret: str | None) -> None:
    ui = session.get(UiSession, hash_secret(secret)) if secret else None
    if ui is not None:
        session.delete(ui)
        session.commit()
