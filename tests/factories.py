"""Builders of real artifacts for tests: bundles built by the real converter, and tampered
copies of them written with tarfile directly."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

from converters import build_bundle, inspect_onnx
from edge_agent.bundle import Manifest
from firmware_profiles import default_catalog


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_bundle(
    model: Path,
    out: Path,
    *,
    profile: str = "x86-64-avx2",
    name: str = "classifier",
    version: str = "1.0.0",
) -> Manifest:
    info = inspect_onnx(model)
    result = build_bundle(
        source=model,
        source_sha256=sha256(model),
        name=name,
        version=version,
        inputs=info.inputs,
        outputs=info.outputs,
        profile=default_catalog().get(profile),
        out_path=out,
    )
    return result.manifest


def read_members(bundle: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(bundle) as tar:
        return [
            (m, tar.extractfile(m).read() if m.isfile() else b"")  # type: ignore[union-attr]
            for m in tar.getmembers()
        ]


def write_members(out: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(out, "w") as tar:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return out


def rewrite_manifest(bundle: Path, out: Path, **changes: object) -> Path:
    members = read_members(bundle)
    manifest = json.loads(members[0][1])
    manifest.update(changes)
    members[0] = (members[0][0], Manifest.model_validate(manifest).to_canonical_json())
    return write_members(out, members)
