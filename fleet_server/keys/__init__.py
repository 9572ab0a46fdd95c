"""The fleet's signing keys: online Ed25519 keys held by the server, the keyring the offline
root key signs over them, and the signer every document and manifest goes through."""
