"""The keyring and the agent's trust store.

Refusal reasons (``BundleError.reason``), stable for reporting:
``unsigned``, ``unknown_key``, ``revoked_key``, ``expired_key``, ``bad_signature``,
``keyring_invalid``, ``keyring_expired``, ``keyring_rollback``, ``root_mismatch``,
``root_invalid``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

from msgspec import Meta

from edge_agent.contracts.canonical import canonical_json, parse_json
from edge_agent.contracts.durable import write_atomic
from edge_agent.contracts.errors import BundleError
from edge_agent.contracts.structs import Strict
from edge_agent.trust.signing import (
    AnyPublicKey,
    Signature,
    key_id,
    public_key_from_b64,
    verify_signature,
)


class KeyEntry(Strict, frozen=True, kw_only=True):
    public: str  # base64 raw Ed25519 public key
    expires_at: datetime
    revoked: bool = False


class Keyring(Strict, frozen=True, kw_only=True):
    type: str = "edgefleet-keyring"
    version: Annotated[int, Meta(ge=1)]
    issued_at: datetime
    expires_at: datetime
    #: key id → key. The key id must be :func:`key_id` of the key (checked on verification).
    keys: dict[str, KeyEntry]

    def canonical(self) -> bytes:
        return canonical_json(self.to_dict())


class SignedKeyring(Strict, frozen=True, kw_only=True):
    signed: Keyring
    signatures: list[Signature]

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedKeyring:
        try:
            return cls.from_dict(parse_json(data))
        except (ValueError, UnicodeDecodeError) as e:
            raise BundleError(f"malformed keyring: {e}", reason="keyring_invalid") from e


def verify_keyring(
    signed: SignedKeyring, root: AnyPublicKey, now: datetime | None = None
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


class RootDocument(Strict, frozen=True, kw_only=True):
    """Root version ``version`` (2 and up: version 1 is the key pinned at enrollment, which
    no document describes). Valid when signed by the previous version's key and by its own
    (TUF's root rotation): the old root vouches for the new, and the new proves its key."""

    type: str = "edgefleet-root"
    version: Annotated[int, Meta(ge=2)]
    public: str  # base64 raw Ed25519 public key
    issued_at: datetime

    def canonical(self) -> bytes:
        return canonical_json(self.to_dict())


class SignedRoot(Strict, frozen=True, kw_only=True):
    signed: RootDocument
    signatures: list[Signature]


#: The most root versions an agent walks through at once (a device offline through more
#: rotations than this is enrolled again).
MAX_ROOT_STEPS = 32


@dataclass(frozen=True)
class PinnedRoot:
    key: AnyPublicKey
    version: int
    #: The document that made it the root (None: the key pinned at enrollment).
    document: SignedRoot | None = None


def walk_roots(current: PinnedRoot, roots: list[SignedRoot]) -> PinnedRoot:
    """The newest root ``roots`` lead to from ``current``, one version at a time: each must be
    signed by the key before it and by its own (``root_invalid`` otherwise; nothing changes).
    Versions at or below ``current`` are skipped; a gap stops the walk where it is."""
    by_version = {r.signed.version: r for r in roots}
    pinned = current
    for _ in range(MAX_ROOT_STEPS):
        nxt = by_version.get(pinned.version + 1)
        if nxt is None:
            return pinned
        new_key = public_key_from_b64(nxt.signed.public)
        message = nxt.signed.canonical()
        for who, key in (("the previous root", pinned.key), ("its own key", new_key)):
            kid = key_id(key)
            if not any(
                s.keyid == kid and verify_signature(key, message, s) for s in nxt.signatures
            ):
                raise BundleError(
                    f"root version {nxt.signed.version} is not signed by {who}",
                    reason="root_invalid",
                )
        pinned = PinnedRoot(new_key, nxt.signed.version, nxt)
    if pinned.version + 1 in by_version:
        raise BundleError(
            f"more than {MAX_ROOT_STEPS} root rotations at once: enroll this device again",
            reason="root_invalid",
        )
    return pinned


class TrustStore:
    """The agent's pinned root key and the newest keyring it has accepted (on disk); the
    root moves on, one version at a time, when a document brings a rotation
    (``root.json`` beside the keyring holds the newest root document accepted)."""

    def __init__(self, root: AnyPublicKey, keyring_path: Path) -> None:
        self.path = keyring_path
        self.root_path = keyring_path.with_name("root.json")
        self.pinned = PinnedRoot(root, 1)
        if self.root_path.is_file():
            try:
                held = SignedRoot.from_dict(parse_json(self.root_path.read_bytes()))
            except (ValueError, UnicodeDecodeError) as e:
                raise BundleError(
                    f"{self.root_path}: malformed root document: {e}", reason="root_invalid"
                ) from e
            self.pinned = PinnedRoot(public_key_from_b64(held.signed.public),
                                     held.signed.version, held)  # fmt: skip
        self.signed: SignedKeyring | None = None
        if keyring_path.is_file():
            self.signed = SignedKeyring.from_bytes(keyring_path.read_bytes())

    @property
    def root(self) -> AnyPublicKey:
        return self.pinned.key

    def candidate_root(self, roots: list[SignedRoot]) -> PinnedRoot:
        """Where ``roots`` would move the pinned root (the key pinned at enrollment may
        itself be a later version: it is found in the chain by its key); changes nothing."""
        current = self.pinned
        if current.document is None:
            pinned_id = key_id(current.key)
            for r in roots:
                if key_id(public_key_from_b64(r.signed.public)) == pinned_id:
                    current = PinnedRoot(current.key, r.signed.version, None)
        return walk_roots(current, roots)

    def update_root(self, root: PinnedRoot) -> bool:
        """Pin ``root`` (one :meth:`candidate_root` returned) if it is newer."""
        if root.version <= self.pinned.version or root.document is None:
            return False
        write_atomic(self.root_path, root.document.to_json())
        self.pinned = root
        return True

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

    def candidate(
        self, signed: SignedKeyring, now: datetime | None = None, root: PinnedRoot | None = None
    ) -> Keyring:
        """``signed``'s keyring if it could replace the held one (signed by the root, or by
        ``root``, one :meth:`candidate_root` returned; not expired, not older); changes
        nothing."""
        ring = verify_keyring(signed, (root or self.pinned).key, now)
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

    def update(
        self, candidate: SignedKeyring, now: datetime | None = None, root: PinnedRoot | None = None
    ) -> bool:
        """Accept ``candidate`` if it is valid and not older (and pin ``root``, under which it
        was checked); return True if it is new."""
        ring = self.candidate(candidate, now, root)
        if root is not None:
            self.update_root(root)
        if self.signed is not None and ring.version == self.signed.signed.version:
            return False
        write_atomic(self.path, candidate.to_json())
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
