"""The keyring and the agent's trust store.

Refusal reasons (``BundleError.reason``), stable for reporting:
``unsigned``, ``unknown_key``, ``revoked_key``, ``expired_key``, ``bad_signature``,
``keyring_invalid``, ``keyring_expired``, ``keyring_rollback``, ``root_mismatch``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_agent.contracts.canonical import canonical_json, parse_json
from edge_agent.contracts.durable import write_atomic
from edge_agent.contracts.errors import BundleError
from edge_agent.trust.signing import Signature, key_id, public_key_from_b64, verify_signature


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KeyEntry(_Strict):
    public: str  # base64 raw Ed25519 public key
    expires_at: datetime
    revoked: bool = False


class Keyring(_Strict):
    type: str = "edgefleet-keyring"
    version: int = Field(ge=1)
    issued_at: datetime
    expires_at: datetime
    #: key id → key. The key id must be :func:`key_id` of the key (checked on verification).
    keys: dict[str, KeyEntry]

    def canonical(self) -> bytes:
        return canonical_json(self.model_dump(mode="json"))


class SignedKeyring(_Strict):
    signed: Keyring
    signatures: list[Signature]

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedKeyring:
        try:
            return cls.model_validate(parse_json(data))
        except (ValueError, ValidationError, UnicodeDecodeError) as e:
            raise BundleError(f"malformed keyring: {e}", reason="keyring_invalid") from e


def verify_keyring(
    signed: SignedKeyring, root: Ed25519PublicKey, now: datetime | None = None
) -> Keyring:
    """Check the root's signature, the key ids, and the expiry."""
    root_id = key_id(root)
    message = signed.signed.canonical()
    if not any(
        s.keyid == root_id and verify_signature(root, message, s) for s in signed.signatures
    ):
        raise BundleError("keyring is not signed by the pinned root key", reason="keyring_invalid")
    ring = signed.signed
    for kid, entry in ring.keys.items():
        if key_id(public_key_from_b64(entry.public)) != kid:
            raise BundleError(
                f"keyring lists key {kid} under the wrong id", reason="keyring_invalid"
            )
    if (now or datetime.now(UTC)) >= ring.expires_at:
        raise BundleError(
            f"keyring version {ring.version} expired at {ring.expires_at.isoformat()}",
            reason="keyring_expired",
        )
    return ring


def check_signed(
    ring: Keyring,
    message: bytes,
    signatures: list[Signature],
    what: str,
    now: datetime | None = None,
) -> str:
    """Return the id of a valid, unrevoked, unexpired key in ``ring`` that signed ``message``.

    The most specific reason is reported when no signature is acceptable.
    """
    if not signatures:
        raise BundleError(f"{what} is not signed", reason="unsigned")
    now = now or datetime.now(UTC)
    reasons = []
    for sig in signatures:
        entry = ring.keys.get(sig.keyid)
        if entry is None:
            reasons.append(
                ("unknown_key", f"{what} is signed by key {sig.keyid}, not in the keyring")
            )
        elif entry.revoked:
            reasons.append(("revoked_key", f"{what} is signed by revoked key {sig.keyid}"))
        elif now >= entry.expires_at:
            reasons.append(("expired_key", f"{what} is signed by key {sig.keyid}, expired"))
        elif not verify_signature(public_key_from_b64(entry.public), message, sig):
            reasons.append(("bad_signature", f"{what}: signature by {sig.keyid} does not verify"))
        else:
            return sig.keyid
    # A bad signature by a known key says more than an unknown key beside it.
    order = ["bad_signature", "revoked_key", "expired_key", "unknown_key"]
    reason, message_text = min(reasons, key=lambda r: order.index(r[0]))
    raise BundleError(message_text, reason=reason)


class TrustStore:
    """The agent's pinned root key and the newest keyring it has accepted (on disk)."""

    def __init__(self, root: Ed25519PublicKey, keyring_path: Path) -> None:
        self.root = root
        self.path = keyring_path
        self.signed: SignedKeyring | None = None
        if keyring_path.is_file():
            self.signed = SignedKeyring.from_bytes(keyring_path.read_bytes())

    @classmethod
    def from_files(cls, root_key_file: Path, keyring_path: Path) -> TrustStore:
        try:
            root = public_key_from_b64(root_key_file.read_text().strip())
        except OSError as e:
            raise BundleError(f"{root_key_file}: cannot read the root key: {e.strerror}") from e
        return cls(root, keyring_path)

    @property
    def keyring(self) -> Keyring:
        if self.signed is None:
            raise BundleError("no keyring yet: nothing can be verified", reason="keyring_invalid")
        return self.signed.signed

    def candidate(self, signed: SignedKeyring, now: datetime | None = None) -> Keyring:
        """``signed``'s keyring if it could replace the held one (signed by the root, not
        expired, not older); changes nothing."""
        ring = verify_keyring(signed, self.root, now)
        if self.signed is not None:
            held = self.signed.signed
            if ring.version < held.version:
                raise BundleError(
                    f"keyring version {ring.version} is older than the held version {held.version}",
                    reason="keyring_rollback",
                )
            if ring.version == held.version and ring != held:
                raise BundleError(
                    f"keyring version {ring.version} differs from the one already held",
                    reason="keyring_rollback",
                )
        return ring

    def update(self, candidate: SignedKeyring, now: datetime | None = None) -> bool:
        """Accept ``candidate`` if it is valid and not older; return True if it is new."""
        ring = self.candidate(candidate, now)
        if self.signed is not None and ring.version == self.signed.signed.version:
            return False
        write_atomic(self.path, candidate.model_dump_json().encode())
        self.signed = candidate
        return True

    def check(
        self,
        message: bytes,
        signatures: list[Signature],
        what: str,
        now: datetime | None = None,
        keyring: Keyring | None = None,
    ) -> str:
        """The id of the key that validly signed ``message``; the held keyring (or
        ``keyring``, one :meth:`candidate` returned) must itself still be valid (an expired
        keyring means updates stop: freeze-attack protection)."""
        if keyring is None:
            if self.signed is None:
                raise BundleError(
                    "no keyring yet: nothing can be verified", reason="keyring_invalid"
                )
            keyring = verify_keyring(self.signed, self.root, now)
        return check_signed(keyring, message, signatures, what, now)
