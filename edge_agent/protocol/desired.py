"""The desired-state document: what the server wants a device to run, slot by slot.

Invariants the agent enforces: ``seq`` only grows (a document with a lower ``seq`` than the
last accepted one is a replay and is refused), and an expired document is never applied.
A rollback is a *new* document with a higher ``seq`` naming the older version.

On the wire the document travels in an envelope ``{"signed": {...}, "signatures": [...],
"keyring": {...}}`` in the style of TUF: signatures cover the canonical JSON of ``signed``
exactly, by an online key of the root-signed keyring that travels alongside.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Self

from msgspec import Meta, field
from msgspec.structs import force_setattr

from edge_agent.contracts.canonical import canonical_json, parse_json
from edge_agent.contracts.errors import DesiredStateError
from edge_agent.contracts.structs import Matching, Strict
from edge_agent.protocol.lifecycle import SlotMode
from edge_agent.protocol.topics import DEVICE_ID_PATTERN
from edge_agent.trust.keyring import SignedKeyring, SignedRoot
from edge_agent.trust.signing import Signature

#: A document for a device with a few slots is a few KiB; the keyring that travels with it
#: adds a few hundred bytes a key.
MAX_DOCUMENT_BYTES = 256 << 10
SHA256_PATTERN = r"^[0-9a-f]{64}$"
SLOT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class SlotAssignment(Strict, frozen=True, kw_only=True):
    model: Annotated[str, Meta(min_length=1, max_length=128)]
    version: Annotated[str, Meta(min_length=1, max_length=64)]
    bundle_sha256: Annotated[str, Matching(SHA256_PATTERN)]
    bundle_url: str
    size: Annotated[int, Meta(gt=0)]
    #: Shadow mode: the active slot whose live requests this candidate also runs on, and the
    #: share of them it sees. Its outputs are never returned. ``mode`` follows from it.
    shadow_of: Annotated[str, Matching(SLOT_PATTERN)] | None = None
    sample_rate: Annotated[float, Meta(ge=0, le=1)] = 0.1
    rollout_id: str | None = None
    #: Travels on the wire (readable documents), but ``shadow_of`` alone says it: left out,
    #: it follows from ``shadow_of``; a document whose ``mode`` disagrees is refused.
    mode: SlotMode | None = field(default=None)

    def __post_init__(self) -> None:
        implied = SlotMode.SHADOW if self.shadow_of is not None else SlotMode.ACTIVE
        if self.mode is None:
            force_setattr(self, "mode", implied)
        elif self.mode != implied:
            raise ValueError("mode 'shadow' needs shadow_of, and only shadow slots have one")

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes``; a new ``shadow_of`` brings its own ``mode``."""
        if "shadow_of" in changes:
            changes.setdefault("mode", None)
        return super().replace(**changes)


class DesiredState(Strict, frozen=True, kw_only=True):
    device_id: Annotated[str, Matching(DEVICE_ID_PATTERN)]
    seq: Annotated[int, Meta(ge=1)]
    issued_at: datetime
    expires_at: datetime
    #: Slot names are checked as keys, by the same pattern as ``shadow_of``.
    slots: dict[Annotated[str, Matching(SLOT_PATTERN)], SlotAssignment]

    def is_expired(self, now: datetime | None = None) -> bool:
        return (now or datetime.now(UTC)) >= self.expires_at


class SignedDesiredState(Strict, frozen=True, kw_only=True):
    signed: DesiredState
    signatures: list[Signature] = field(default_factory=list)
    #: The root-signed keyring the signatures are checked against; the agent keeps the
    #: newest valid one it has seen (so rotations and revocations travel with documents).
    keyring: SignedKeyring | None = None
    #: The root documents after the first (only after a root rotation): the agent walks from
    #: the root it pinned to the one that signed ``keyring``, one version at a time.
    roots: list[SignedRoot] = field(default_factory=list)

    def signed_bytes(self) -> bytes:
        """What the signatures cover: the canonical JSON of ``signed``."""
        return canonical_json(self.signed.to_dict())

    def to_bytes(self) -> bytes:
        return self.to_json()

    @classmethod
    def from_bytes(cls, payload: bytes) -> SignedDesiredState:
        if len(payload) > MAX_DOCUMENT_BYTES:
            raise DesiredStateError(
                f"desired-state document of {len(payload)} bytes (limit {MAX_DOCUMENT_BYTES})",
                reason="desired_state_malformed",
            )
        try:
            return cls.from_dict(parse_json(payload))
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise DesiredStateError(
                f"malformed desired-state document: {e}", reason="desired_state_malformed"
            ) from e
