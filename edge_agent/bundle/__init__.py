"""The bundle (``.efb``): one compiled model for one device profile, with everything the agent
needs to check it before it serves a request from it.

A bundle is an uncompressed tar whose first member is ``manifest.json`` (canonical JSON),
followed by the files the manifest lists (``model/…``, ``selftest.npz``, …). This package
writes and reads bundles and checks them; it holds no private keys.
"""

from edge_agent.bundle.archive import BundleWriter, open_bundle, sha256_file
from edge_agent.bundle.manifest import (
    FORMAT_VERSION,
    PREPROCESS_METADATA_KEY,
    FileEntry,
    ImagePreprocess,
    Manifest,
    ModelRef,
    RuntimeRequirement,
    SelfTestSpec,
    TensorSpec,
)
from edge_agent.bundle.verify import VerifiedBundle, check_compatible, verify_bundle
from edge_agent.contracts.canonical import canonical_json

__all__ = [
    "FORMAT_VERSION",
    "PREPROCESS_METADATA_KEY",
    "BundleWriter",
    "FileEntry",
    "ImagePreprocess",
    "Manifest",
    "ModelRef",
    "RuntimeRequirement",
    "SelfTestSpec",
    "TensorSpec",
    "VerifiedBundle",
    "canonical_json",
    "check_compatible",
    "open_bundle",
    "sha256_file",
    "verify_bundle",
]
