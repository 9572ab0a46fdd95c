"""The model store on the device's disk.

    <state_dir>/downloads/<sha256>.part   a download in progress
    <state_dir>/bundles/<sha256>.efb      a complete download whose sha256 matched
    <state_dir>/staging/…                 a bundle being verified and extracted
    <state_dir>/models/<sha256>/          a verified, extracted bundle, ready to load

A directory under ``models/`` only ever appears by an atomic rename of a fully verified
staging directory, so its existence means it passed verification. Garbage collection keeps
whatever the journal names (the committed and previous version of every slot).
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from edge_agent.bundle import Manifest, VerifiedBundle, verify_bundle
from edge_agent.bundle.manifest import MANIFEST_NAME
from edge_agent.trust import TrustStore


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.downloads = root / "downloads"
        self.bundles = root / "bundles"
        self.staging = root / "staging"
        self.models = root / "models"
        for d in (self.downloads, self.bundles, self.staging, self.models):
            d.mkdir(parents=True, exist_ok=True)
        # Leftovers of an interrupted verification are never trusted.
        for leftover in self.staging.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)

    def bundle_path(self, sha256: str) -> Path:
        return self.bundles / f"{sha256}.efb"

    def partial_path(self, sha256: str) -> Path:
        return self.downloads / f"{sha256}.part"

    def model_dir(self, sha256: str) -> Path:
        return self.models / sha256

    def has_model(self, sha256: str) -> bool:
        return (self.model_dir(sha256) / MANIFEST_NAME).is_file()

    def manifest(self, sha256: str) -> Manifest:
        raw = (self.model_dir(sha256) / MANIFEST_NAME).read_bytes()
        return Manifest.from_json(raw)

    def open_model(self, sha256: str) -> VerifiedBundle:
        return VerifiedBundle(self.manifest(sha256), self.model_dir(sha256))

    def install(
        self, sha256: str, *, profile: str, runtimes: dict[str, str], trust: TrustStore
    ) -> VerifiedBundle:
        """Verify the downloaded bundle and move it into ``models/`` (all or nothing)."""
        if self.has_model(sha256):
            return self.open_model(sha256)
        staging = self.staging / f"{sha256}-{uuid.uuid4().hex[:8]}"
        verified = verify_bundle(
            self.bundle_path(sha256),
            staging,
            profile=profile,
            runtimes=runtimes,
            expected_sha256=sha256,
            trust=trust,
        )
        final = self.model_dir(sha256)
        staging.replace(final)
        return VerifiedBundle(verified.manifest, final)

    def discard_bundle(self, sha256: str) -> None:
        self.bundle_path(sha256).unlink(missing_ok=True)
        self.partial_path(sha256).unlink(missing_ok=True)

    def collect_garbage(self, keep: set[str]) -> list[str]:
        """Delete every bundle and model not in ``keep``; return the digests removed."""
        removed = []
        for d in self.models.iterdir():
            if d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
        for f in self.bundles.glob("*.efb"):
            if f.stem not in keep:
                f.unlink(missing_ok=True)
        for f in self.downloads.glob("*.part"):
            if f.stem not in keep:
                f.unlink(missing_ok=True)
        return removed
