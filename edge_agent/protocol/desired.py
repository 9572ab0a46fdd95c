"""The desired-state document: what the server wants a device to run, slot by slot.

Invariants the agent enforces: ``seq`` only grows (a document with a lower ``seq`` than the
last accepted one is a replay and is refused), and an expired document is never applied.
A rollback is a *new* document with a higher ``seq`` naming the older version.

On the wire the document travels in an envelope ``{"signed": {...}, "signatures": [...],
"keyring": {...}}`` in the style of TUF: signatures cover the canonical JSON of ``signed``
exactly, by an online key of the root-signed keyring that travels alongside.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator, model_validator

from edge_agent.contracts.canonical import canonical_json, parse_json
from edge_agent.contracts.errors import DesiredStateError
from edge_agent.protocol.lifecycle import SlotMode
from edge_agent.protocol.topics import DEVICE_ID_PATTERN
from edge_agent.trust.keyring import SignedKeyring, SignedRoot
from edge_agent.trust.signing import Signature

#: A document for a device with a few slots is a few KiB; the keyring that travels with it
#: adds a few hundred bytes a key.
MAX_DOCUMENT_BYTES = 256 << 10
SHA256_PATTERN = r"^[0-9a-f]{64}$"
SLOT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SlotAssignment(_Message):
    model: str = Field(min_length=1, max_length=128)
    version: str = Field(min_length=1, max_length=64)
    bundle_sha256: str = Field(pattern=SHA256_PATTERN)
    bundle_url: str
    size: int = Field(gt=0)
    #: Shadow mode: the active slot whose live requests this candidate also runs on, and the
    #: share of them it sees. Its outputs are never returned. ``mode`` follows from it.
    shadow_of: str | None = Field(default=None, pattern=SLOT_PATTERN)
    sample_rate: float = Field(default=0.1, ge=0, le=1)
    rollout_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _mode_agrees(cls, value: Any) -> Any:
        """``mode`` travels on the wire (readable documents), but ``shadow_of`` alone says it:
        a document whose ``mode`` disagrees is refused."""
        if isinstance(value, dict) and "mode" in value:
            value = dict(value)
            mode = SlotMode(value.pop("mode"))
            if (mode == SlotMode.SHADOW) != (value.get("shadow_of") is not None):
                raise ValueError("mode 'shadow' needs shadow_of, and only shadow slots have one")
        return value

    @computed_field  # type: ignore[prop-decorator]
    @property
    def mode(self) -> SlotMode:
        return SlotMode.SHADOW if self.shadow_of is not None else SlotMode.ACTIVE


class DesiredState(_Message):
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    seq: int = Field(ge=1)
    issued_at: datetime
    expires_at: datetime
    slots: dict[str, SlotAssignment]

    @field_validator("slots")
    @classmethod
    def _slot_names(cls, slots: dict[str, SlotAssignment]) -> dict[str, SlotAssignment]:
        for name in slots:
            if not re.match(SLOT_PATTERN, name):
                raise ValueError(f"invalid slot name {name!r}")
        return slots

    def is_expired(self, now: datetime | None = None) -> bool:
        return (now or datetime.now(UTC)) >= self.expires_at


class SignedDesiredState(_Message):
    signed: DesiredState
    signatures: list[Signature] = Field(default_factory=list)
    #: The root-signed keyring the signatures are checked against; the agent keeps the
    #: newest valid one it has seen (so rotations and revocations travel with documents).
    keyring: SignedKeyring | None = None
    #: The root documents after the first (only after a root rotation): the agent walks from
    #: the root it pinned to the one that signed ``keyring``, one version at a time.
    roots: list[SignedRoot] = Field(default_factory=list)

    def signed_bytes(self) -> bytes:
        """What the signatures cover: the canonical JSON of ``signed``."""
        return canonical_json(self.signed.model_dump(mode="json"))

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, payload: bytes) -> SignedDesiredState:
        if len(payload) > MAX_DOCUMENT_BYTES:
            raise DesiredStateError(
                f"desired-state document of {len(payload)} bytes (limit {MAX_DOCUMENT_BYTES})",
                reason="desired_state_malformed",
            )
        try:
            return cls.model_validate(parse_json(payload))
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise DesiredStateError(
                f"malformed desired-state document: {e}", reason="desired_state_malformed"
            ) from e
