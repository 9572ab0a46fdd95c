"""/v1/keyring, /v1/keys/online, /v1/trust: the key ceremony's server side.

The root private key never comes here: the CLI asks for a new online key, builds and signs the
next keyring version offline, and installs it. Installing re-issues every device's desired
state under the new keyring, so rotations and revocations reach the fleet at once.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from fleet_server.api.deps import Admin, SessionDep, StateDep, Viewer
from fleet_server.errors import NotFoundError
from fleet_server.keys import service
from fleet_server.keys.tables import KeyringInstall, OnlineKeyCreate, OnlineKeyPublic, TrustPublic
from fleet_server.trust import service as ceremony

router = APIRouter(tags=["keys"])


@router.get("/v1/trust", response_model=TrustPublic)
def trust(session: SessionDep, _: Viewer) -> TrustPublic:
    """The root public key and the keyring in force (for `edgefleet bundle verify --trust`)."""
    record = service.current_record(session)
    if record is None:
        raise NotFoundError("no keyring installed yet (edgefleet keys init)")
    chain = service.roots(session)
    return TrustPublic(
        root_public_key=record.root_public,
        keyring=record.document,
        root_version=chain[-1].version if chain else 1,
        roots=[r.document for r in chain],
    )


@router.get("/v1/keyring")
def keyring(session: SessionDep, _: Viewer) -> dict[str, Any]:
    record = service.current_record(session)
    if record is None:
        raise NotFoundError("no keyring installed yet (edgefleet keys init)")
    return {
        "version": record.version,
        "root_public_key": record.root_public,
        "installed_at": record.installed_at,
        "installed_by": record.installed_by,
        "keys": service.describe(record),
        "document": record.document,
    }


@router.post("/v1/keys/online", status_code=201, response_model=OnlineKeyPublic)
def create_online_key(
    body: OnlineKeyCreate, state: StateDep, session: SessionDep, principal: Admin
) -> OnlineKeyPublic:
    """A new online signing key (private half stays on the server). It signs nothing until a
    root-signed keyring that lists it is installed."""
    return ceremony.create_online_key(session, state.keys.store, body.ttl_days, principal.name)


@router.put("/v1/keyring")
def install_keyring(
    body: KeyringInstall, state: StateDep, session: SessionDep, principal: Admin
) -> dict[str, Any]:
    record = ceremony.install_keyring(
        session, state.keys.store, body.root_public_key, body.keyring, principal.name, body.root
    )
    settings = state.settings
    documents = ceremony.reissue_all(
        session,
        runner=state.builds,
        signer=state.keys.signer(session),
        public_url=settings.resolved_public_url,
        desired_ttl_s=settings.desired_state_ttl_s,
        build_wait_s=settings.rollout_build_wait_s,
    )
    state.control.publish_all(documents)
    return {"version": record.version, "reissued": len(documents), "keys": service.describe(record)}
