"""Bundles an attacker builds, including ones a compromised signing key vouches for: each is
refused with a BundleError naming the problem — never another exception type, never a file
outside the bundle loaded — and leaves nothing behind."""

from __future__ import annotations

import io
import json
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from edge_agent.bundle import verify_bundle
from edge_agent.bundle.archive import MAX_TAR_METADATA_BYTES
from edge_agent.contracts.errors import BundleError
from edge_agent.trust import TrustStore
from tests.factories import Members, TestFleet, read_members, sign_bytes

ORT = {"onnxruntime": "1.20.0"}


def _signed(members: Members, raw: bytes, fleet: TestFleet) -> Members:
    """``raw`` as the manifest, validly signed: what a stolen signing key could produce."""
    sig = json.dumps({"signatures": [sign_bytes(fleet.online, raw).to_dict()]}).encode()
    rest = [(i, d) for i, d in members[1:] if i.name != "manifest.sig"]
    return [(members[0][0], raw), (tarfile.TarInfo("manifest.sig"), sig), *rest]


def _write(out: Path, members: Members, fmt: int = tarfile.GNU_FORMAT) -> Path:
    with tarfile.open(out, "w", format=fmt) as tar:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return out


def _canonical(doc: object) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _refused(path: Path, stage: Path, trust: TrustStore) -> BundleError:
    with pytest.raises(BundleError) as e:
        verify_bundle(path, stage, profile="x86-64-avx2", runtimes=ORT, trust=trust)
    assert not stage.exists()
    return e.value


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("artifact", "/etc/passwd"),
        ("artifact", "model/../../outside.onnx"),
        ("artifact", "model/unlisted.onnx"),
        ("selftest", {"file": "/tmp/vectors.npz", "atol": 0.1, "rtol": 0.1}),
    ],
)
def test_a_signed_manifest_cannot_name_a_file_outside_the_bundle(
    bundle: Path, tmp_path: Path, fleet: TestFleet, trust: TrustStore, field: str, value: object
) -> None:
    members = read_members(bundle)
    manifest = json.loads(members[0][1])
    manifest[field] = value
    bad = _write(tmp_path / "bad.efb", _signed(members, _canonical(manifest), fleet))
    error = _refused(bad, tmp_path / "stage", trust)
    assert error.reason == "manifest_invalid" and "listed files" in error.message


def test_a_listed_file_with_an_unsafe_path_is_refused(
    bundle: Path, tmp_path: Path, fleet: TestFleet, trust: TrustStore
) -> None:
    members = read_members(bundle)
    manifest = json.loads(members[0][1])
    manifest["files"][0]["path"] = "/abs/model.onnx"
    manifest["artifact"] = "/abs/model.onnx"
    bad = _write(tmp_path / "bad.efb", _signed(members, _canonical(manifest), fleet))
    assert "unsafe path" in _refused(bad, tmp_path / "stage", trust).message


@pytest.mark.parametrize(
    ("case", "mutate", "needle"),
    [
        ("duplicate key", lambda raw: raw.replace(b'{"artifact":', b'{"artifact":"x","artifact":', 1), "duplicate key"),
        ("whitespace", lambda raw: raw.replace(b'","', b'", "', 1), "canonical form"),
        ("unsorted keys", lambda raw: b'{"zzz":1,' + raw[1:], "canonical form"),
        ("NaN", lambda raw: raw.replace(b'"format_version":1', b'"format_version":NaN', 1), "not JSON"),
        ("deep nesting", lambda raw: b"[" * 100_000 + b"]" * 100_000, "nested deeper"),
    ],
)  # fmt: skip
def test_the_manifest_has_one_meaning_or_none(
    bundle: Path,
    tmp_path: Path,
    fleet: TestFleet,
    trust: TrustStore,
    case: str,
    mutate: object,
    needle: str,
) -> None:
    members = read_members(bundle)
    raw = mutate(members[0][1])  # type: ignore[operator]
    bad = _write(tmp_path / "bad.efb", _signed(members, raw, fleet))
    error = _refused(bad, tmp_path / "stage", trust)
    assert error.reason == "manifest_invalid" and needle in error.message, error.message


def test_a_corrupt_tar_header_is_a_refusal(bundle: Path, tmp_path: Path, trust: TrustStore) -> None:
    with tarfile.open(bundle) as tar:
        third = tar.getmembers()[2].offset  # a member after the manifest and its signature
    data = bytearray(bundle.read_bytes())
    data[third + 124 : third + 136] = b"zzzzzzzzzzz\0"  # its size field
    bad = tmp_path / "bad.efb"
    bad.write_bytes(bytes(data))
    assert _refused(bad, tmp_path / "stage", trust).reason == "not_a_bundle"


@pytest.mark.parametrize(
    ("names", "reason"),
    [
        (["model/model.onnx", "model/model.onnx/inner"], "unsafe_path"),
        (["model/a\x00b"], "unsafe_path"),
    ],
)
def test_member_names_that_break_extraction_are_refusals(
    bundle: Path,
    tmp_path: Path,
    fleet: TestFleet,
    trust: TrustStore,
    names: list[str],
    reason: str,
) -> None:
    members = read_members(bundle)
    manifest = json.loads(members[0][1])
    extra = [(tarfile.TarInfo(n), b"x") for n in names if n not in {m.name for m, _ in members}]
    for name in names:
        if name not in {f["path"] for f in manifest["files"]}:
            manifest["files"].append({"path": name, "sha256": "2d71" + "0" * 60, "size": 1})
    manifest["files"].sort(key=lambda f: f["path"])
    try:
        raw = _canonical(manifest)
    except ValueError:
        raw = members[0][1]
    bad = _write(tmp_path / "bad.efb", _signed(members, raw, fleet) + extra)
    assert _refused(bad, tmp_path / "stage", trust).reason in (reason, "manifest_invalid")


def test_oversized_tar_metadata_is_refused_before_it_is_read(
    bundle: Path, tmp_path: Path, trust: TrustStore
) -> None:
    members = read_members(bundle)
    head, data = members[0]
    head.pax_headers = {"comment": "x" * (20 << 20)}  # 20 MiB of pax metadata on manifest.json
    bad = _write(tmp_path / "bad.efb", [(head, data), *members[1:]], fmt=tarfile.PAX_FORMAT)
    tracemalloc.start()
    try:
        error = _refused(bad, tmp_path / "stage", trust)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert error.reason == "tar_metadata_too_large"
    assert peak < 2 * MAX_TAR_METADATA_BYTES + (1 << 20), peak


def test_small_pax_metadata_is_still_read(bundle: Path, tmp_path: Path, trust: TrustStore) -> None:
    members = read_members(bundle)
    head, data = members[0]
    head.pax_headers = {"comment": "built by hand"}
    ok = _write(tmp_path / "ok.efb", [(head, data), *members[1:]], fmt=tarfile.PAX_FORMAT)
    verify_bundle(ok, tmp_path / "stage", profile="x86-64-avx2", runtimes=ORT, trust=trust)
