"""Ed25519 signatures over canonical JSON, and key ids.

A key id is the first 32 hex digits of the sha256 of the raw 32-byte public key, so anyone
holding the public key can recompute it and a keyring cannot mislabel a key.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import BaseModel, ConfigDict

from edge_agent.contracts.errors import BundleError


class Signature(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    keyid: str
    sig: str  # base64 of the 64-byte Ed25519 signature


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    return hashlib.sha256(raw_public(key)).hexdigest()[:32]


def public_key_to_b64(key: Ed25519PublicKey) -> str:
    return base64.b64encode(raw_public(key)).decode()


def public_key_from_b64(text: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, TypeError) as e:
        raise BundleError(f"not an Ed25519 public key: {e}", reason="bad_key") from e


def verify_signature(key: Ed25519PublicKey, message: bytes, signature: Signature) -> bool:
    try:
        key.verify(base64.b64decode(signature.sig, validate=True), message)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True
