"""Checking a downloaded bundle before anything from it is used.

:func:`verify_bundle` is all-or-nothing: it extracts into a fresh staging directory and, on
any failure, removes that directory, so a bad bundle leaves no trace on the device.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from edge_agent.bundle.archive import open_bundle, sha256_file
from edge_agent.bundle.manifest import Manifest
from edge_agent.contracts.errors import BundleError
from edge_agent.trust.keyring import TrustStore


@dataclass(frozen=True)
class VerifiedBundle:
    manifest: Manifest
    directory: Path

    @property
    def artifact_path(self) -> Path:
        return self.directory / self.manifest.artifact


def check_compatible(
    manifest: Manifest,
    *,
    profile: str,
    runtimes: dict[str, str],
    now: datetime | None = None,
) -> None:
    """Refuse a bundle built for another profile, a missing runtime, or an expired bundle.

    ``runtimes`` maps runtime name → installed version on this device.
    """
    if manifest.profile != profile:
        raise BundleError(
            f"bundle is for profile {manifest.profile!r}, this device is {profile!r}",
            reason="wrong_profile",
        )
    installed = runtimes.get(manifest.runtime.name)
    if installed is None:
        raise BundleError(
            f"bundle needs runtime {manifest.runtime.name!r}, which this device does not have",
            reason="wrong_runtime",
        )
    try:
        ok = Version(installed) in SpecifierSet(manifest.runtime.versions)
    except (InvalidVersion, InvalidSpecifier) as e:
        raise BundleError(f"cannot compare runtime versions: {e}", reason="wrong_runtime") from e
    if not ok:
        raise BundleError(
            f"bundle needs {manifest.runtime.name} {manifest.runtime.versions}, "
            f"this device has {installed}",
            reason="wrong_runtime",
        )
    check_not_expired(manifest, now)


def check_not_expired(manifest: Manifest, now: datetime | None = None) -> None:
    if manifest.expires_at is not None and (now or datetime.now(UTC)) >= manifest.expires_at:
        raise BundleError(
            f"bundle expired at {manifest.expires_at.isoformat()}", reason="bundle_expired"
        )


def verify_bundle(
    path: Path,
    staging_dir: Path,
    *,
    profile: str | None,
    runtimes: dict[str, str] | None = None,
    expected_sha256: str | None = None,
    trust: TrustStore | None,
    now: datetime | None = None,
) -> VerifiedBundle:
    """Verify ``path`` completely and extract it into ``staging_dir`` (which must not exist).

    Order: whole-file digest, manifest signature (``trust``), fit for this device, then every
    member while it is extracted. ``trust=None`` skips the signature (offline inspection
    without the fleet's keys: the caller must say so); ``profile=None`` skips the fit.
    """
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise BundleError(
            "bundle sha256 does not match the desired state",
            reason="digest_mismatch",
            bundle_sha256=expected_sha256,
        )
    staging_dir.mkdir(parents=True, exist_ok=False)
    try:
        with open_bundle(path) as reader:
            if trust is not None:
                trust.check(reader.manifest_bytes, reader.signatures, "bundle manifest", now)
            if profile is None:
                check_not_expired(reader.manifest, now)
            else:
                check_compatible(reader.manifest, profile=profile, runtimes=runtimes or {}, now=now)
            reader.extract_verified(staging_dir)
            return VerifiedBundle(reader.manifest, staging_dir)
    except BaseException:
        shutil.rmtree(staging_dir, ignore_errors=True)
        raise
