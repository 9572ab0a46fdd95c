"""The agent verifies with PyNaCl what the server and the operator's CLI sign with
cryptography: the same Ed25519, byte for byte, and the same refusals."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.contracts.errors import BundleError
from edge_agent.trust.signing import (
    Signature,
    key_id,
    public_key_from_b64,
    public_key_to_b64,
    verify_signature,
)


def _sign(key: Ed25519PrivateKey, message: bytes) -> Signature:
    return Signature(
        keyid=key_id(key.public_key()), sig=base64.b64encode(key.sign(message)).decode()
    )


def test_a_signature_made_with_cryptography_verifies_on_the_agent() -> None:
    server = Ed25519PrivateKey.generate()
    pinned = public_key_from_b64(public_key_to_b64(server.public_key()))  # as the agent holds it
    assert key_id(pinned) == key_id(server.public_key())
    assert public_key_to_b64(pinned) == public_key_to_b64(server.public_key())
    signature = _sign(server, b'{"a":1}')
    assert verify_signature(pinned, b'{"a":1}', signature)
    assert verify_signature(server.public_key(), b'{"a":1}', signature)  # the server's own check


def test_what_does_not_verify_is_refused() -> None:
    server, stranger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    pinned = public_key_from_b64(public_key_to_b64(server.public_key()))
    good = _sign(server, b"message")
    raw = base64.b64decode(good.sig)
    flipped = bytes([raw[0] ^ 1]) + raw[1:]
    for message, sig in [
        (b"messagE", good.sig),  # another message
        (b"message", _sign(stranger, b"message").sig),  # another key
        (b"message", base64.b64encode(flipped).decode()),  # one bit off
        (b"message", base64.b64encode(raw[:63]).decode()),  # short
        (b"message", base64.b64encode(raw + b"\0").decode()),  # long
        (b"message", "not base64!"),
        (b"message", ""),
    ]:
        assert not verify_signature(pinned, message, Signature(keyid=good.keyid, sig=sig)), sig


@pytest.mark.parametrize("text", ["", "AAAA", base64.b64encode(b"\1" * 31).decode(),
                                  base64.b64encode(b"\1" * 33).decode(), "%%%"])  # fmt: skip
def test_a_public_key_that_is_not_32_bytes_of_base64_is_a_bad_key(text: str) -> None:
    with pytest.raises(BundleError) as e:
        public_key_from_b64(text)
    assert e.value.reason == "bad_key" and "not an Ed25519 public key" in e.value.message
