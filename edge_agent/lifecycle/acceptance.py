"""Accepting a desired-state document: the rules a document must pass before the agent acts.

Checked in this order: the keyring that comes with it must be signed by the pinned root and
not older than the one held; the document must be signed by a valid key of that keyring; it
must name this device and not have expired; its ``seq`` must be greater than the last
accepted one — or equal with identical content, which resumes an interrupted deployment.

:meth:`DesiredStateGate.accept` records an accepted document in the journal, and installs the
newer keyring it carries only then: a refused document changes nothing.
:meth:`DesiredStateGate.supersedes` asks the same questions without changing anything: it runs
on the MQTT thread while a deployment is under way, to tell whether a document that just
arrived should end it.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

from edge_agent.contracts.canonical import canonical_json
from edge_agent.contracts.errors import DesiredStateError, EdgefleetError
from edge_agent.lifecycle.journal import Journal
from edge_agent.protocol.desired import DesiredState, SignedDesiredState
from edge_agent.protocol.lifecycle import Reason
from edge_agent.trust import PinnedRoot, TrustStore

__all__ = ["DesiredStateGate", "desired_digest"]


def desired_digest(doc: DesiredState) -> str:
    return hashlib.sha256(canonical_json(doc.to_dict())).hexdigest()


class DesiredStateGate:
    def __init__(self, device_id: str, journal: Journal, trust: TrustStore) -> None:
        self.device_id = device_id
        self.journal = journal
        self.trust = trust

    def accept(self, envelope: SignedDesiredState, now: datetime | None = None) -> None:
        """Record ``envelope`` as the accepted document (and install the newer keyring it
        carries), or raise :class:`DesiredStateError` (or another ``BundleError`` from the
        trust checks) having changed nothing."""
        root = self._check(envelope, now)
        if envelope.keyring is not None:
            self.trust.update(envelope.keyring, now, root)
        doc, data = envelope.signed, self.journal.data
        if doc.seq > data.desired_seq:
            data.desired_seq, data.desired_digest = doc.seq, desired_digest(doc)
            self.journal.save()

    def supersedes(self, envelope: SignedDesiredState, now: datetime | None = None) -> bool:
        """Would ``envelope`` be accepted as a newer document than the accepted one? Changes
        nothing."""
        try:
            self._check(envelope, now)
        except EdgefleetError:
            return False
        return envelope.signed.seq > self.journal.data.desired_seq

    def _check(self, envelope: SignedDesiredState, now: datetime | None) -> PinnedRoot | None:
        doc = envelope.signed
        data = self.journal.data
        # The root chain and keyring a document brings are checked, and installed only once
        # the whole document has passed: a refused document changes nothing.
        root = (
            self.trust.candidate_root(envelope.roots)
            if envelope.roots and envelope.keyring is not None
            else None
        )
        keyring = (
            self.trust.candidate(envelope.keyring, now, root)
            if envelope.keyring is not None
            else None
        )
        self.trust.check(
            envelope.signed_bytes(), envelope.signatures, "desired state", now, keyring
        )
        if doc.device_id != self.device_id:
            raise DesiredStateError(
                f"desired state is for device {doc.device_id!r}", reason=Reason.WRONG_DEVICE
            )
        if doc.is_expired(now):
            raise DesiredStateError(
                f"desired state seq {doc.seq} expired at {doc.expires_at.isoformat()}",
                reason=Reason.DESIRED_STATE_EXPIRED,
            )
        if doc.seq < data.desired_seq:
            raise DesiredStateError(
                f"desired state seq {doc.seq} is older than the accepted seq {data.desired_seq}",
                reason=Reason.STALE_SEQ,
            )
        if doc.seq == data.desired_seq and desired_digest(doc) != data.desired_digest:
            raise DesiredStateError(
                f"desired state seq {doc.seq} was already accepted with different content",
                reason=Reason.REPLAYED_SEQ,
            )
        return root
