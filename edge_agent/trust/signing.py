"""Ed25519 signatures over canonical JSON, and key ids.

A key id is the first 32 hex digits of the sha256 of the raw 32-byte public key, so anyone
holding the public key can recompute it and a keyring cannot mislabel a key.

The agent verifies with PyNaCl (libsodium): about 1 MiB resident, where cryptography's
bindings cost the device process 8 (issue 24). The server and the operator's CLI sign with
cryptography; a signature is the same 64 bytes whichever library made or checks it, and
every helper here also takes their ``Ed25519PublicKey`` objects.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Protocol, TypeAlias

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from edge_agent.contracts.errors import BundleError
from edge_agent.contracts.structs import Strict


class _RawPublic(Protocol):
    """A public key that gives its raw 32 bytes (cryptography's ``Ed25519PublicKey``)."""

    def public_bytes_raw(self) -> bytes: ...


#: What the helpers take: the agent's key, or the server's and the CLI's.
AnyPublicKey: TypeAlias = "VerifyKey | _RawPublic"


class Signature(Strict, frozen=True, kw_only=True):
    keyid: str
    sig: str  # base64 of the 64-byte Ed25519 signature


def raw_public(key: AnyPublicKey) -> bytes:
    return bytes(key) if isinstance(key, VerifyKey) else key.public_bytes_raw()


def key_id(key: AnyPublicKey) -> str:
    return hashlib.sha256(raw_public(key)).hexdigest()[:32]


def public_key_to_b64(key: AnyPublicKey) -> str:
    return base64.b64encode(raw_public(key)).decode()


def public_key_from_b64(text: str) -> VerifyKey:
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as e:
        raise BundleError(f"not an Ed25519 public key: {e}", reason="bad_key") from e
    if len(raw) != 32:
        raise BundleError(f"not an Ed25519 public key: {len(raw)} bytes, not 32", reason="bad_key")
    return VerifyKey(raw)


def verify_signature(key: AnyPublicKey, message: bytes, signature: Signature) -> bool:
    if not isinstance(key, VerifyKey):
        key = VerifyKey(raw_public(key))
    try:
        sig = base64.b64decode(signature.sig, validate=True)
    except (ValueError, TypeError):
        return False
    if len(sig) != 64:
        return False
    try:
        key.verify(message, sig)
    except BadSignatureError:
        return False
    return True
