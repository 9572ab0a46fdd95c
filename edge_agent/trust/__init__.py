"""Trust: verifying what the fleet's keys vouch for (after TUF).

    root key (offline) ──signs──▶ keyring (versioned list of online keys)
    online key         ──signs──▶ desired-state documents, bundle manifests

The agent pins the root public key at enrollment. A keyring is accepted only if the root
signed it, it has not expired, and its version is not lower than the one already held
(no rollback). The root itself rotates as TUF's does: root N+1 is signed by root N's key and
by its own, and an agent walks the chain from its pinned root one version at a time. A
document is accepted only if a key in the held keyring that is neither
revoked nor expired signed its canonical JSON. This package verifies; it never holds a
private key (signing lives on the server and in the operator's CLI).
"""

from edge_agent.trust.keyring import (
    KeyEntry,
    Keyring,
    PinnedRoot,
    RootDocument,
    SignedKeyring,
    SignedRoot,
    TrustStore,
    verify_keyring,
    walk_roots,
)
from edge_agent.trust.signing import Signature, key_id, public_key_from_b64, verify_signature

__all__ = [
    "KeyEntry",
    "Keyring",
    "PinnedRoot",
    "RootDocument",
    "Signature",
    "SignedKeyring",
    "SignedRoot",
    "TrustStore",
    "key_id",
    "public_key_from_b64",
    "verify_keyring",
    "verify_signature",
    "walk_roots",
]
