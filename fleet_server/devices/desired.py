"""Composing, signing, storing and refreshing each device's desired-state document.

Invariant: a device's ``seq`` only grows. Every change (a new slot assignment, a refresh of
an expiring document, a new keyring) is a new document with ``seq + 1``, signed by the
server's online key, stored before it is published.

A rollout writes thousands of documents in one step, so the document is composed as the
plain JSON the agent verifies (the slots as stored, the timestamps as pydantic writes them),
signed once over its canonical form, and stored with one bulk statement per chunk of
devices: no pydantic model is built per device on this path.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import bindparam, insert, text, update
from sqlalchemy import select as sa_select
from sqlmodel import Session, select

from edge_agent.contracts.canonical import canonical_json
from edge_agent.protocol.desired import SignedDesiredState, SlotAssignment
from fleet_server.database import aware
from fleet_server.devices.tables import BundleGrant, DesiredStateRecord
from fleet_server.keys.service import FleetSigner

__all__ = [
    "DesiredDocument",
    "change_many",
    "refresh",
    "reissue",
    "stored_slots",
]

#: Devices read and locked per statement when a rollout writes many documents.
_CHUNK = 500
_RECORDS = DesiredStateRecord.__table__  # type: ignore[attr-defined]
_GRANTS = BundleGrant.__table__  # type: ignore[attr-defined]
_TIME = TypeAdapter(datetime)
_PG_UPDATE = text(
    "UPDATE desired_states AS d SET seq = u.seq, document = u.document, "
    "updated_at = u.updated_at, expires_at = u.expires_at, "
    "keyring_version = u.keyring_version, slots = u.slots "
    "FROM json_to_recordset(CAST(:rows AS json)) AS u(device_id varchar, seq integer, "
    "document json, updated_at timestamptz, expires_at timestamptz, keyring_version integer, "
    "slots json) WHERE d.device_id = u.device_id"
)


@dataclass(frozen=True, slots=True)
class DesiredDocument:
    """A stored, signed document, ready to publish: its ``seq`` and its bytes on the wire."""

    device_id: str
    seq: int
    payload: bytes

    @classmethod
    def of(cls, envelope: SignedDesiredState) -> DesiredDocument:
        return cls(envelope.signed.device_id, envelope.signed.seq, envelope.to_bytes())

    def envelope(self) -> SignedDesiredState:
        return SignedDesiredState.from_bytes(self.payload)


def change_many(
    session: Session,
    changes: Mapping[str, Mapping[str, SlotAssignment | None]],
    *,
    ttl_s: int,
    signer: FleetSigner,
) -> dict[str, DesiredDocument]:
    """Stage (not commit) one new document per device with its slots changed as given (None:
    the slot is taken away). The devices' records are read and locked a chunk at a time (a
    rollout writes thousands), in device order so two writers cannot deadlock."""
    issuer = _Issuer(signer, ttl_s)
    as_json: dict[int, dict[str, Any]] = {}  # each distinct assignment dumped once

    def dumped(a: SlotAssignment) -> dict[str, Any]:
        found = as_json.get(id(a))
        if found is None:
            found = as_json[id(a)] = a.to_dict()
        return found

    ids = sorted(changes)
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        stored = {
            device_id: (seq, slots)
            for device_id, seq, slots in _slots_of(session, chunk, lock=True)
        }
        for device_id in chunk:
            seq, slots = stored.get(device_id, (0, None))
            exists = slots is not None
            # Only the slots: the keyring beside them is the signer's, attached anew.
            slots = dict(slots or {})
            for slot, assignment in changes[device_id].items():
                if assignment is None:
                    slots.pop(slot, None)
                else:
                    slots[slot] = dumped(assignment)
            issuer.issue(device_id, seq + 1, slots, exists=exists)
        issuer.write(session)
    return issuer.issued


def stored_slots(session: Session, device_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Each device's stored slots as JSON (``SlotAssignment`` dumped), read in bulk and not
    validated again (the server wrote them); devices with no document are left out."""
    out: dict[str, dict[str, Any]] = {}
    for start in range(0, len(device_ids), _CHUNK):
        chunk = device_ids[start : start + _CHUNK]
        for device_id, _seq, slots in _slots_of(session, chunk, lock=False):
            out[device_id] = slots
    return out


def _slots_of(
    session: Session, device_ids: list[str], *, lock: bool
) -> list[tuple[str, int, dict[str, Any]]]:
    """(device, seq, slots) of the stored documents; rows from before the ``slots`` column
    are read from their document."""
    query = (
        sa_select(_RECORDS.c.device_id, _RECORDS.c.seq, _RECORDS.c.slots)
        .where(_RECORDS.c.device_id.in_(device_ids))
        .order_by(_RECORDS.c.device_id)
    )
    if lock:
        query = query.with_for_update()
    rows = [(d, seq, slots) for d, seq, slots in session.execute(query).all()]
    older = [d for d, _, slots in rows if slots is None]
    if older:
        documents = dict(
            session.execute(
                sa_select(_RECORDS.c.device_id, _RECORDS.c.document).where(
                    _RECORDS.c.device_id.in_(older)
                )
            ).all()
        )
        rows = [
            (d, seq, slots if slots is not None else documents[d]["signed"]["slots"])
            for d, seq, slots in rows
        ]
    return rows


def refresh(
    session: Session, device_id: str, *, ttl_s: int, min_remaining_s: int, signer: FleetSigner
) -> DesiredDocument | None:
    """Re-issue the document with a new ``seq`` if it expires within ``min_remaining_s`` or
    was signed under another keyring. Returns the new document (committed), or None."""
    record = _locked(session, device_id)
    if record is None:
        session.rollback()
        return None
    envelope = SignedDesiredState.from_dict(record.document)
    doc = envelope.signed
    fresh = aware(doc.expires_at) - datetime.now(UTC) > timedelta(seconds=min_remaining_s)
    if fresh and envelope.keyring == signer.keyring:
        session.rollback()
        return None
    issued = _reissue(session, record, dict(record.document["signed"]["slots"]), ttl_s, signer)
    session.commit()
    return issued


def reissue(
    session: Session,
    device_id: str,
    slots: dict[str, SlotAssignment],
    *,
    ttl_s: int,
    signer: FleetSigner,
) -> DesiredDocument | None:
    """Stage a new document with ``slots`` (after a keyring change)."""
    record = _locked(session, device_id)
    if record is None:
        return None
    as_json = {name: a.to_dict() for name, a in slots.items()}
    return _reissue(session, record, as_json, ttl_s, signer)


def _locked(session: Session, device_id: str) -> DesiredStateRecord | None:
    # FOR UPDATE serialises concurrent changes to one device on PostgreSQL (SQLite serialises
    # all writers anyway), so two writers cannot both write seq N+1.
    return session.exec(
        select(DesiredStateRecord)
        .where(DesiredStateRecord.device_id == device_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).first()


def _reissue(
    session: Session,
    record: DesiredStateRecord,
    slots: dict[str, Any],
    ttl_s: int,
    signer: FleetSigner,
) -> DesiredDocument:
    issuer = _Issuer(signer, ttl_s)
    issued = issuer.issue(record.device_id, record.seq + 1, slots, exists=True)
    session.expire(record)  # written below, by statement
    issuer.write(session)
    return issued


class _Issuer:
    """Signs documents and stages their rows: records updated or inserted, and the bundle
    grants they imply, one bulk statement each per :meth:`write`."""

    def __init__(self, signer: FleetSigner, ttl_s: int) -> None:
        self._signer = signer
        self.now = datetime.now(UTC).replace(microsecond=0)
        self.expires_at = self.now + timedelta(seconds=ttl_s)
        self._issued_at_json = _TIME.dump_python(self.now, mode="json")
        self._expires_at_json = _TIME.dump_python(self.expires_at, mode="json")
        ring = signer.keyring
        self._keyring = ring.to_dict() if ring is not None else None
        # The root chain only once there is one (agents from before rotations know no field
        # ``roots`` and would refuse every document).
        self._roots = [r.to_dict() for r in signer.roots]
        self._ring_version = ring.signed.version if ring is not None else None
        self.issued: dict[str, DesiredDocument] = {}
        self._updates: list[dict[str, Any]] = []
        self._inserts: list[dict[str, Any]] = []
        self._grants: list[tuple[str, str]] = []

    def issue(
        self, device_id: str, seq: int, slots: dict[str, Any], *, exists: bool
    ) -> DesiredDocument:
        signed = {
            "device_id": device_id,
            "seq": seq,
            "issued_at": self._issued_at_json,
            "expires_at": self._expires_at_json,
            "slots": slots,
        }
        signature = self._signer.sign(canonical_json(signed))
        document = {
            "signed": signed,
            "signatures": [{"keyid": signature.keyid, "sig": signature.sig}],
            "keyring": self._keyring,
        }
        if self._roots:
            document["roots"] = self._roots
        row = {
            "b_device_id": device_id,
            "seq": seq,
            "document": document,
            "updated_at": self.now,
            "expires_at": self.expires_at,
            "keyring_version": self._ring_version,
            "slots": slots,
        }
        (self._updates if exists else self._inserts).append(row)
        self._grants.extend((device_id, a["bundle_sha256"]) for a in slots.values())
        issued = DesiredDocument(device_id, seq, json.dumps(document).encode())
        self.issued[device_id] = issued
        return issued

    def write(self, session: Session) -> None:
        session.flush()  # rows the session holds (a device enrolled in this transaction)
        if self._updates and session.get_bind().dialect.name == "postgresql":
            # One statement, its rows one JSON parameter: psycopg's executemany of 10,000
            # one-row UPDATEs (and its text arrays, escaped character by character) took
            # longer than composing and signing the documents.
            rows = [
                {
                    "device_id": r["b_device_id"],
                    "seq": r["seq"],
                    "document": r["document"],
                    "updated_at": r["updated_at"].isoformat(),
                    "expires_at": r["expires_at"].isoformat(),
                    "keyring_version": r["keyring_version"],
                    "slots": r["slots"],
                }
                for r in self._updates
            ]
            session.execute(_PG_UPDATE, {"rows": json.dumps(rows)})
        elif self._updates:
            session.execute(
                update(_RECORDS)
                .where(_RECORDS.c.device_id == bindparam("b_device_id"))
                .values(
                    seq=bindparam("seq"),
                    document=bindparam("document"),
                    updated_at=bindparam("updated_at"),
                    expires_at=bindparam("expires_at"),
                    keyring_version=bindparam("keyring_version"),
                    slots=bindparam("slots"),
                ),
                self._updates,
            )
        if self._inserts:
            rows = [{**r, "device_id": r.pop("b_device_id")} for r in self._inserts]
            session.execute(insert(_RECORDS), rows)
        wanted = sorted(set(self._grants))
        if wanted:
            have: set[tuple[str, str]] = set()
            devices = sorted({d for d, _ in wanted})
            for start in range(0, len(devices), _CHUNK):
                chunk = devices[start : start + _CHUNK]
                query = sa_select(_GRANTS.c.device_id, _GRANTS.c.bundle_sha256).where(
                    _GRANTS.c.device_id.in_(chunk)
                )
                have.update((d, s) for d, s in session.execute(query).all())
            new = [
                {"device_id": d, "bundle_sha256": s, "granted_at": self.now}
                for d, s in wanted
                if (d, s) not in have
            ]
            if new:
                session.execute(insert(_GRANTS), new)
        self._updates, self._inserts, self._grants = [], [], []
