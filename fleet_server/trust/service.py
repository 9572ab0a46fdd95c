"""Changing what the fleet trusts: a new online key, a new root-signed keyring, and the
fleet-wide re-issue that carries it to every device at once.

A keyring install re-issues every device's desired state under the new keyring, and any slot
whose bundle was signed by a key that is no longer usable gets a re-signed bundle, so a
rotation or revocation reaches the fleet at once.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlmodel import Session, select

from edge_agent.protocol.desired import SignedDesiredState
from fleet_server.audit.service import record
from fleet_server.builds.runner import BuildRunner
from fleet_server.builds.service import ensure_bundle
from fleet_server.bundles.tables import Bundle
from fleet_server.devices import desired
from fleet_server.devices.desired import DesiredDocument
from fleet_server.devices.tables import DesiredStateRecord, Device
from fleet_server.keys import service as keys
from fleet_server.keys.service import FleetSigner, OnlineKeyStore
from fleet_server.keys.tables import KeyringRecord, OnlineKeyPublic
from fleet_server.registry.service import version_by_id
from fleet_server.rollouts.cohort import cohort_of
from fleet_server.rollouts.notifier import slot_assignment


def create_online_key(
    session: Session, store: OnlineKeyStore, ttl_days: int, actor: str
) -> OnlineKeyPublic:
    """A new online signing key (private half stays on the server). It signs nothing until a
    root-signed keyring that lists it is installed."""
    key = store.create(timedelta(days=ttl_days))
    record(session, actor, "key.create", key.keyid, expires_at=key.expires_at.isoformat())
    session.commit()
    return key


def install_keyring(
    session: Session,
    store: OnlineKeyStore,
    root_public_key: str,
    keyring: dict[str, Any],
    actor: str,
    root: dict[str, Any] | None = None,
) -> KeyringRecord:
    installed = keys.install_keyring(session, store, root_public_key, keyring, actor, root)
    session.commit()
    return installed


def reissue_all(
    session: Session,
    *,
    runner: BuildRunner,
    signer: FleetSigner,
    public_url: str,
    desired_ttl_s: int,
    build_wait_s: float,
) -> dict[str, DesiredDocument]:
    """After a keyring change: every device gets a new document under the new keyring, and
    any slot whose bundle was signed by a key that is no longer usable gets a re-signed one.
    Returns the documents to publish (committed)."""
    documents: dict[str, DesiredDocument] = {}
    for stored in session.exec(select(DesiredStateRecord)).all():
        device = session.get(Device, stored.device_id)
        if device is None:
            continue
        slots = dict(SignedDesiredState.from_dict(stored.document).signed.slots)
        for slot, assignment in slots.items():
            bundle = session.get(Bundle, assignment.bundle_sha256)
            if bundle is None or signer.usable(bundle.signing_key_id):
                continue
            model, version = version_by_id(session, bundle.model_version_id)
            fresh = ensure_bundle(
                session,
                runner,
                model,
                version,
                runner.catalog.get(bundle.profile),
                signer,
                runtimes=list(cohort_of(device)[1] or []) or None,
                wait_s=build_wait_s,
            )
            slots[slot] = slot_assignment(public_url, model, version, fresh, assignment.rollout_id)
        envelope = desired.reissue(session, device.id, slots, ttl_s=desired_ttl_s, signer=signer)
        if envelope is not None:
            documents[device.id] = envelope
    session.commit()
    return documents
