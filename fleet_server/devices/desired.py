"""Composing, signing, storing and refreshing each device's desired-state document.

Invariant: a device's ``seq`` only grows. Every change (a new slot assignment, a refresh of
an expiring document, a new keyring) is a new document with ``seq + 1``, signed by the
server's online key, stored before it is published.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlmodel import Session, col, select

from edge_agent.contracts.canonical import canonical_json
from edge_agent.protocol.desired import DesiredState, SignedDesiredState, SlotAssignment
from fleet_server.database import aware
from fleet_server.devices.tables import BundleGrant, DesiredStateRecord
from fleet_server.keys.service import FleetSigner

#: Devices read and locked per statement when a rollout writes many documents.
_CHUNK = 500


def _locked(session: Session, device_id: str) -> DesiredStateRecord | None:
    # FOR UPDATE serialises concurrent changes to one device on PostgreSQL (SQLite serialises
    # all writers anyway), so two rollouts cannot both write seq N+1.
    return session.exec(
        select(DesiredStateRecord)
        .where(DesiredStateRecord.device_id == device_id)
        .with_for_update()
    ).first()


def assign_slot(
    session: Session,
    device_id: str,
    slot: str,
    assignment: SlotAssignment,
    *,
    ttl_s: int,
    signer: FleetSigner,
) -> SignedDesiredState:
    """Stage (not commit) a new document giving ``slot`` to ``assignment``."""
    record = _locked(session, device_id)
    slots: dict[str, SlotAssignment] = {}
    seq = 1
    if record is not None:
        previous = SignedDesiredState.model_validate(record.document).signed
        slots = dict(previous.slots)
        seq = record.seq + 1
    slots[slot] = assignment
    return _store(session, record, device_id, seq, slots, ttl_s, signer)


def assign_many(
    session: Session,
    slot: str,
    assignments: dict[str, SlotAssignment | None],
    *,
    ttl_s: int,
    signer: FleetSigner,
) -> dict[str, SignedDesiredState]:
    """Stage (not commit) one new document per device giving ``slot`` to its assignment, or
    taking the slot away where it is None."""
    changes = {device_id: {slot: a} for device_id, a in assignments.items()}
    return change_many(session, changes, ttl_s=ttl_s, signer=signer)


def change_many(
    session: Session,
    changes: dict[str, dict[str, SlotAssignment | None]],
    *,
    ttl_s: int,
    signer: FleetSigner,
) -> dict[str, SignedDesiredState]:
    """Stage (not commit) one new document per device with its slots changed as given (None:
    the slot is taken away). The devices' records are read and locked a chunk at a time (a
    rollout writes thousands), in device order so two writers cannot deadlock."""
    out: dict[str, SignedDesiredState] = {}
    ids = sorted(changes)
    granted = _granted(session, ids)
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        records = {
            r.device_id: r
            for r in session.exec(
                select(DesiredStateRecord)
                .where(col(DesiredStateRecord.device_id).in_(chunk))
                .order_by(col(DesiredStateRecord.device_id))
                .with_for_update()
            ).all()
        }
        for device_id in chunk:
            record = records.get(device_id)
            slots: dict[str, SlotAssignment] = {}
            seq = 1
            if record is not None:
                # Only the slots: the keyring beside them is the signer's, attached anew.
                slots = {
                    name: SlotAssignment.model_validate(a)
                    for name, a in record.document["signed"]["slots"].items()
                }
                seq = record.seq + 1
            for slot, assignment in changes[device_id].items():
                if assignment is None:
                    slots.pop(slot, None)
                else:
                    slots[slot] = assignment
            out[device_id] = _store(
                session, record, device_id, seq, slots, ttl_s, signer, granted=granted
            )
    return out


def current_slot(session: Session, device_ids: list[str], slot: str) -> dict[str, SlotAssignment]:
    """What each device's stored document gives ``slot`` (devices with none are left out)."""
    out: dict[str, SlotAssignment] = {}
    for start in range(0, len(device_ids), _CHUNK):
        chunk = device_ids[start : start + _CHUNK]
        for record in session.exec(
            select(DesiredStateRecord).where(col(DesiredStateRecord.device_id).in_(chunk))
        ).all():
            slots = record.document.get("signed", {}).get("slots", {})
            if slot in slots:
                out[record.device_id] = SlotAssignment.model_validate(slots[slot])
    return out


def _granted(session: Session, device_ids: list[str]) -> set[tuple[str, str]]:
    granted: set[tuple[str, str]] = set()
    for start in range(0, len(device_ids), _CHUNK):
        chunk = device_ids[start : start + _CHUNK]
        granted.update(
            (g.device_id, g.bundle_sha256)
            for g in session.exec(
                select(BundleGrant).where(col(BundleGrant.device_id).in_(chunk))
            ).all()
        )
    return granted


def refresh(
    session: Session, device_id: str, *, ttl_s: int, min_remaining_s: int, signer: FleetSigner
) -> SignedDesiredState | None:
    """Re-issue the document with a new ``seq`` if it expires within ``min_remaining_s`` or
    was signed under another keyring. Returns the new document (committed), or None."""
    record = _locked(session, device_id)
    if record is None:
        session.rollback()
        return None
    envelope = SignedDesiredState.model_validate(record.document)
    doc = envelope.signed
    fresh = aware(doc.expires_at) - datetime.now(UTC) > timedelta(seconds=min_remaining_s)
    if fresh and envelope.keyring == signer.keyring:
        session.rollback()
        return None
    new = _store(session, record, device_id, record.seq + 1, dict(doc.slots), ttl_s, signer)
    session.commit()
    return new


def reissue(
    session: Session,
    device_id: str,
    slots: dict[str, SlotAssignment],
    *,
    ttl_s: int,
    signer: FleetSigner,
) -> SignedDesiredState | None:
    """Stage a new document with ``slots`` (after a keyring change)."""
    record = _locked(session, device_id)
    if record is None:
        return None
    return _store(session, record, device_id, record.seq + 1, slots, ttl_s, signer)


_keyrings: dict[int, tuple[object, dict[str, object] | None]] = {}


def _keyring_json(signer: FleetSigner) -> dict[str, object] | None:
    ring = signer.keyring
    cached = _keyrings.get(id(ring))
    if cached is None or cached[0] is not ring:
        if len(_keyrings) > 64:
            _keyrings.clear()
        cached = (ring, ring.model_dump(mode="json") if ring is not None else None)
        _keyrings[id(ring)] = cached
    return cached[1]


def _store(
    session: Session,
    record: DesiredStateRecord | None,
    device_id: str,
    seq: int,
    slots: dict[str, SlotAssignment],
    ttl_s: int,
    signer: FleetSigner,
    *,
    granted: set[tuple[str, str]] | None = None,
) -> SignedDesiredState:
    """``granted``: the (device, bundle) grants known to exist (a bulk caller read them at
    once); a grant this adds is added to it."""
    now = datetime.now(UTC).replace(microsecond=0)
    unsigned = SignedDesiredState(
        signed=DesiredState(
            device_id=device_id,
            seq=seq,
            issued_at=now,
            expires_at=now + timedelta(seconds=ttl_s),
            slots=slots,
        ),
        keyring=signer.keyring,
    )
    signed = unsigned.signed.model_dump(mode="json")
    signature = signer.sign(canonical_json(signed))  # what ``signed_bytes()`` is
    envelope = unsigned.model_copy(update={"signatures": [signature]})
    # As ``envelope.model_dump(mode="json")``, without dumping the same keyring each time.
    document = {
        "signed": signed,
        "signatures": [signature.model_dump(mode="json")],
        "keyring": _keyring_json(signer),
    }
    for sha256 in {a.bundle_sha256 for a in slots.values()}:
        if granted is not None:
            if (device_id, sha256) in granted:
                continue
            granted.add((device_id, sha256))
        elif session.get(BundleGrant, (device_id, sha256)) is not None:
            continue
        session.add(BundleGrant(device_id=device_id, bundle_sha256=sha256, granted_at=now))
    expires_at = now + timedelta(seconds=ttl_s)
    ring_version = signer.keyring.signed.version if signer.keyring is not None else None
    if record is None:
        record = DesiredStateRecord(device_id=device_id, seq=seq, document=document, updated_at=now)
    else:
        record.seq, record.document, record.updated_at = seq, document, now
    record.expires_at, record.keyring_version = expires_at, ring_version
    session.add(record)
    return envelope
