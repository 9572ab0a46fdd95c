"""The reported state an agent publishes (retained) on its ``status`` topic.

``desired_seq`` is the ``seq`` of the last desired-state document the agent accepted; the
server compares it with its own record to notice a device that missed an update.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from msgspec import Meta, field

from edge_agent.contracts.canonical import parse_json
from edge_agent.contracts.structs import Strict
from edge_agent.protocol.lifecycle import SlotEvent, SlotState

#: A status lists a few slots with their figures: a few KiB.
MAX_STATUS_BYTES = 256 << 10


class VersionRef(Strict, frozen=True, kw_only=True):
    """One built version of a model, as a slot serves it (journal, status, serving table)."""

    model: str
    version: str
    bundle_sha256: str
    runtime: str
    precision: str


class SlotError(Strict, frozen=True, kw_only=True):
    """Why a slot's last deployment failed. ``retryable``: the failure may pass (network, disk
    space), so a document naming the same bundle tries again; otherwise only a document naming
    another bundle does."""

    reason: str
    message: str
    retryable: bool = False
    detail: dict[str, str] = field(default_factory=dict)


def with_todays_slot_errors(data: Any) -> Any:
    """``data`` (a journal or a status, parsed JSON) with its slots' errors in today's form.
    Before 0.2 a slot's error was a flat dict with retry "yes"/"no" beside its fields, in the
    journal and so in the status an agent reported from it. Changes ``data`` in place."""
    slots = data.get("slots") if isinstance(data, dict) else None
    if isinstance(slots, dict):
        for record in slots.values():
            error = record.get("error") if isinstance(record, dict) else None
            if isinstance(error, dict) and "retry" in error:
                flat = {k: str(v) for k, v in error.items()}
                record["error"] = {
                    "reason": flat.pop("reason", "error"),
                    "message": flat.pop("message", ""),
                    "retryable": flat.pop("retry") == "yes",
                    "detail": flat,
                }
    return data


class Refusal(Strict, frozen=True, kw_only=True):
    """Why the last desired-state document was refused (nothing changed on the device)."""

    reason: str
    message: str
    seq: int | None = None


class Transition(Strict, frozen=True, kw_only=True):
    slot: str
    from_state: SlotState
    to_state: SlotState
    event: SlotEvent
    at: datetime
    bundle_sha256: str | None = None
    reason: str | None = None
    message: str | None = None


class SlotStatus(Strict, frozen=True, kw_only=True):
    state: SlotState
    active: VersionRef | None = None
    #: The bundle the slot is moving to, while a deployment is under way or after it failed.
    target_sha256: str | None = None
    error: SlotError | None = None
    #: Shadow slots: what they run beside, and how they compare with it.
    shadow: dict[str, Any] | None = None


class CertificateStatus(Strict, frozen=True, kw_only=True):
    """The MQTT client certificate the agent connects with (mTLS fleets)."""

    serial: Annotated[str, Meta(max_length=40)]  # lowercase hex
    not_after: datetime


class ReportedStatus(Strict, frozen=True, kw_only=True):
    device_id: str
    profile: str
    agent_version: str
    desired_seq: int = 0
    runtimes: dict[str, str] = field(default_factory=dict)
    slots: dict[str, SlotStatus] = field(default_factory=dict)
    last_transition: Transition | None = None
    #: Why the last desired-state document was refused, if it was.
    refusal: Refusal | None = None
    #: The client certificate in use (after a renewal the broker refused, still the old one).
    certificate: CertificateStatus | None = None
    reported_at: datetime

    def to_bytes(self) -> bytes:
        return self.to_json()

    @classmethod
    def from_bytes(cls, payload: bytes) -> ReportedStatus:
        """Raises ValueError (msgspec's ValidationError is one) for anything but a status."""
        if len(payload) > MAX_STATUS_BYTES:
            raise ValueError(f"status of {len(payload)} bytes (limit {MAX_STATUS_BYTES})")
        try:
            return cls.from_dict(with_todays_slot_errors(parse_json(payload)))
        except (UnicodeDecodeError, RecursionError) as e:
            raise ValueError(f"unreadable status: {e}") from e
