"""Bundle v1: what the converter writes verifies, and every kind of damage is refused with its
own reason and leaves nothing behind."""

import json
import tarfile
from pathlib import Path

import pytest

from edge_agent.bundle import canonical_json, open_bundle, verify_bundle
from edge_agent.bundle.manifest import MANIFEST_NAME
from edge_agent.errors import BundleError
from tests.factories import make_bundle, read_members, rewrite_manifest, sha256, write_members

ORT = {"onnxruntime": "1.20.0"}


@pytest.fixture(scope="module")
def bundle(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "b.efb"
    make_bundle(model_path, out)
    return out


def test_manifest_is_canonical_json_and_first(bundle: Path) -> None:
    members = read_members(bundle)
    assert members[0][0].name == MANIFEST_NAME
    raw = members[0][1]
    assert raw == canonical_json(json.loads(raw))
    manifest = json.loads(raw)
    assert manifest["format_version"] == 1
    assert manifest["runtime"]["name"] == "onnxruntime"
    assert manifest["profile"] == "x86-64-avx2"
    assert {f["path"] for f in manifest["files"]} == {"model/model.onnx", "selftest.npz"}
    assert manifest["inputs"][0]["name"] == "x" and manifest["outputs"][0]["name"] == "probs"
    assert set(manifest["toolchain"]) >= {"onnx", "onnxruntime", "edgefleet"}


def test_builds_are_reproducible(model_path: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.efb", tmp_path / "b.efb"
    make_bundle(model_path, a)
    make_bundle(model_path, b)
    # created_at has one-second resolution; equal content apart from it means equal files
    ma, mb = (json.loads(read_members(p)[0][1]) for p in (a, b))
    if ma["created_at"] == mb["created_at"]:
        assert sha256(a) == sha256(b)
    assert ma["files"] == mb["files"]


def test_a_good_bundle_verifies_and_extracts(bundle: Path, tmp_path: Path) -> None:
    verified = verify_bundle(
        bundle,
        tmp_path / "stage",
        profile="x86-64-avx2",
        runtimes=ORT,
        expected_sha256=sha256(bundle),
    )
    assert verified.artifact_path.is_file()
    assert (tmp_path / "stage" / "selftest.npz").is_file()


def _flip_model_byte(bundle: Path, out: Path) -> Path:
    members = read_members(bundle)
    for i, (info, data) in enumerate(members):
        if info.name.startswith("model/"):
            members[i] = (info, data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    return write_members(out, members)


def _append_to_model(bundle: Path, out: Path) -> Path:
    members = read_members(bundle)
    members = [(i, d + b"\0" if i.name.startswith("model/") else d) for i, d in members]
    return write_members(out, members)


def _extra_member(name: str, kind: bytes = tarfile.REGTYPE):
    def tamper(bundle: Path, out: Path) -> Path:
        members = read_members(bundle)
        info = tarfile.TarInfo(name)
        info.type = kind
        if kind == tarfile.SYMTYPE:
            info.linkname = "/etc/passwd"
        members.append((info, b"evil" if kind == tarfile.REGTYPE else b""))
        return write_members(out, members)

    return tamper


def _drop_member(prefix: str):
    def tamper(bundle: Path, out: Path) -> Path:
        return write_members(
            out, [(i, d) for i, d in read_members(bundle) if not i.name.startswith(prefix)]
        )

    return tamper


def _manifest_last(bundle: Path, out: Path) -> Path:
    members = read_members(bundle)
    return write_members(out, [*members[1:], members[0]])


def _not_a_tar(bundle: Path, out: Path) -> Path:
    out.write_bytes(b"this is not a tar archive" * 100)
    return out


def _garbled_manifest(bundle: Path, out: Path) -> Path:
    members = read_members(bundle)
    members[0] = (members[0][0], b'{"format_version": 1')
    return write_members(out, members)


TAMPERING = [
    ("flipped byte in the model", _flip_model_byte, "digest_mismatch"),
    ("model longer than the manifest says", _append_to_model, "size_mismatch"),
    ("member outside the manifest", _extra_member("model/extra.bin"), "unlisted_member"),
    ("path traversal", _extra_member("../evil.txt"), "unsafe_path"),
    ("absolute path", _extra_member("/tmp/evil.txt"), "unsafe_path"),
    ("symlink member", _extra_member("model/link", tarfile.SYMTYPE), "unsafe_member"),
    ("device member", _extra_member("model/dev", tarfile.CHRTYPE), "unsafe_member"),
    ("listed file missing", _drop_member("selftest"), "missing_member"),
    ("manifest not first", _manifest_last, "no_manifest"),
    ("not a tar", _not_a_tar, "not_a_bundle"),
    ("garbled manifest", _garbled_manifest, "manifest_invalid"),
    (
        "wrong profile",
        lambda b, o: rewrite_manifest(b, o, profile="raspberry-pi-4"),
        "wrong_profile",
    ),
    (
        "runtime the device lacks",
        lambda b, o: rewrite_manifest(b, o, runtime={"name": "tensorrt", "versions": ">=8.6"}),
        "wrong_runtime",
    ),
    (
        "runtime version out of range",
        lambda b, o: rewrite_manifest(b, o, runtime={"name": "onnxruntime", "versions": ">=9.0"}),
        "wrong_runtime",
    ),
    (
        "expired bundle",
        lambda b, o: rewrite_manifest(b, o, expires_at="2020-01-01T00:00:00Z"),
        "bundle_expired",
    ),
]


@pytest.mark.parametrize(("case", "tamper", "reason"), TAMPERING, ids=[t[0] for t in TAMPERING])
def test_damaged_bundles_are_refused_and_leave_nothing(
    bundle: Path,
    tmp_path: Path,
    case: str,
    tamper,
    reason: str,  # type: ignore[no-untyped-def]
) -> None:
    bad = tamper(bundle, tmp_path / "bad.efb")
    stage = tmp_path / "stage"
    with pytest.raises(BundleError) as e:
        verify_bundle(bad, stage, profile="x86-64-avx2", runtimes=ORT)
    assert e.value.reason == reason, e.value.message
    assert not stage.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.efb"]


def test_expected_digest_is_checked_before_unpacking(bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError) as e:
        verify_bundle(
            bundle, tmp_path / "s", profile="x86-64-avx2", runtimes=ORT, expected_sha256="0" * 64
        )
    assert e.value.reason == "digest_mismatch"
    assert not (tmp_path / "s").exists()


def test_open_bundle_reads_only_the_manifest(bundle: Path) -> None:
    with open_bundle(bundle) as reader:
        assert reader.manifest.model.name == "classifier"
        assert reader.manifest.selftest.file == "selftest.npz"
