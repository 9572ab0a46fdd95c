"""Bundle v1: what the converter writes (and signs) verifies; every kind of damage is refused
with its own reason and leaves nothing behind."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.bundle import canonical_json, open_bundle, verify_bundle
from edge_agent.bundle.manifest import MANIFEST_NAME, SIGNATURE_NAME
from edge_agent.contracts.errors import BundleError
from edge_agent.trust import TrustStore
from tests.factories import (
    Members,
    TestFleet,
    read_members,
    resign,
    rewrite_manifest,
    sha256,
    write_members,
)

ORT = {"onnxruntime": "1.20.0"}


def test_manifest_is_canonical_json_first_and_signed(bundle: Path, fleet: TestFleet) -> None:
    members = read_members(bundle)
    assert [m.name for m, _ in members[:2]] == [MANIFEST_NAME, SIGNATURE_NAME]
    raw = members[0][1]
    assert raw == canonical_json(json.loads(raw))
    manifest = json.loads(raw)
    assert manifest["format_version"] == 1
    assert manifest["runtime"]["name"] == "onnxruntime"
    assert manifest["profile"] == "x86-64-avx2"
    assert {f["path"] for f in manifest["files"]} == {
        "model/model.onnx",
        "selftest.npz",
        "baseline.json",
    }
    assert manifest["inputs"][0]["name"] == "x" and manifest["outputs"][0]["name"] == "probs"
    assert set(manifest["toolchain"]) >= {"onnx", "onnxruntime", "edgefleet"}
    sig = json.loads(members[1][1])["signatures"][0]
    assert manifest["signing_key_id"] == sig["keyid"]


def test_a_good_bundle_verifies_and_extracts(
    bundle: Path, tmp_path: Path, trust: TrustStore
) -> None:
    verified = verify_bundle(
        bundle,
        tmp_path / "stage",
        profile="x86-64-avx2",
        runtimes=ORT,
        expected_sha256=sha256(bundle),
        trust=trust,
    )
    assert verified.artifact_path.is_file()
    assert (tmp_path / "stage" / "selftest.npz").is_file()
    assert (tmp_path / "stage" / SIGNATURE_NAME).is_file()


Tamper = Callable[[Path, Path, TestFleet], Path]


def _members(fn: Callable[[Members, TestFleet], Members]) -> Tamper:
    def tamper(bundle: Path, out: Path, fleet: TestFleet) -> Path:
        return write_members(out, fn(read_members(bundle), fleet))

    return tamper


def _change_model(members: Members, change: Callable[[bytes], bytes]) -> Members:
    return [(i, change(d) if i.name.startswith("model/") else d) for i, d in members]


def _extra(name: str, kind: bytes = tarfile.REGTYPE) -> Tamper:
    def add(members: Members, fleet: TestFleet) -> Members:
        info = tarfile.TarInfo(name)
        info.type = kind
        if kind == tarfile.SYMTYPE:
            info.linkname = "/etc/passwd"
        return [*members, (info, b"evil" if kind == tarfile.REGTYPE else b"")]

    return _members(add)


def _listed_extra(name: str, kind: bytes = tarfile.REGTYPE) -> Tamper:
    """The extra member is also listed in a validly re-signed manifest: only the member check
    itself can catch it."""

    def add(members: Members, fleet: TestFleet) -> Members:
        manifest = json.loads(members[0][1])
        manifest["files"].append({"path": name, "sha256": "0" * 64, "size": 0})
        members = [(members[0][0], canonical_json(manifest)), *members[1:]]
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = "/etc/passwd"
        return resign([*members, (info, b"")], fleet.online)

    return _members(add)


def _signed_by_stranger(bundle: Path, out: Path, fleet: TestFleet) -> Path:
    return write_members(out, resign(read_members(bundle), Ed25519PrivateKey.generate()))


TAMPERING: list[tuple[str, Tamper, str]] = [
    ("flipped byte in the model", _members(lambda m, f: _change_model(m, lambda d: d[:100] + bytes([d[100] ^ 0xFF]) + d[101:])), "digest_mismatch"),
    ("model longer than the manifest says", _members(lambda m, f: _change_model(m, lambda d: d + b"\0")), "size_mismatch"),
    ("flipped byte in the manifest", _members(lambda m, f: [(m[0][0], m[0][1].replace(b'"1.0.0"', b'"6.6.6"')), *m[1:]]), "bad_signature"),
    ("unsigned bundle", _members(lambda m, f: [x for x in m if x[0].name != SIGNATURE_NAME]), "unsigned"),
    ("signed by an unknown key", _signed_by_stranger, "unknown_key"),
    ("member outside the manifest", _extra("model/extra.bin"), "unlisted_member"),
    ("manifest appears twice", _extra("manifest.json"), "duplicate_member"),
    ("model file appears twice", _extra("model/model.onnx"), "duplicate_member"),
    ("path traversal", _extra("../evil.txt"), "unsafe_path"),
    ("absolute path", _extra("/tmp/evil.txt"), "unsafe_path"),
    ("symlink member, listed and signed", _listed_extra("model/link", tarfile.SYMTYPE), "unsafe_member"),
    ("device member", _extra("model/dev", tarfile.CHRTYPE), "unsafe_member"),
    ("listed file missing", _members(lambda m, f: [x for x in m if not x[0].name.startswith("selftest")]), "missing_member"),
    ("manifest not first", _members(lambda m, f: [*m[1:], m[0]]), "no_manifest"),
    ("not a tar", lambda b, o, f: (o.write_bytes(b"not a tar archive" * 100), o)[1], "not_a_bundle"),
    ("garbled manifest", _members(lambda m, f: [(m[0][0], b'{"format_version": 1'), *m[1:]]), "manifest_invalid"),
    ("wrong profile", lambda b, o, f: rewrite_manifest(b, o, f, profile="raspberry-pi-4"), "wrong_profile"),
    ("runtime the device lacks", lambda b, o, f: rewrite_manifest(b, o, f, runtime={"name": "tensorrt", "versions": ">=8.6"}), "wrong_runtime"),
    ("runtime version out of range", lambda b, o, f: rewrite_manifest(b, o, f, runtime={"name": "onnxruntime", "versions": ">=9.0"}), "wrong_runtime"),
    ("expired bundle", lambda b, o, f: rewrite_manifest(b, o, f, expires_at="2020-01-01T00:00:00Z"), "bundle_expired"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "tamper", "reason"), TAMPERING, ids=[t[0] for t in TAMPERING])
def test_damaged_bundles_are_refused_and_leave_nothing(
    bundle: Path,
    tmp_path: Path,
    fleet: TestFleet,
    trust: TrustStore,
    case: str,
    tamper: Tamper,
    reason: str,
) -> None:
    bad = tamper(bundle, tmp_path / "bad.efb", fleet)
    stage = tmp_path / "stage"
    with pytest.raises(BundleError) as e:
        verify_bundle(bad, stage, profile="x86-64-avx2", runtimes=ORT, trust=trust)
    assert e.value.reason == reason, e.value.message
    assert not stage.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.efb", "keys"]


@pytest.mark.parametrize(
    ("entry", "reason"),
    [({"revoked": True}, "revoked_key"), ({"expires_at": "2020-01-01T00:00:00Z"}, "expired_key")],
)
def test_bundles_signed_by_a_revoked_or_expired_key_are_refused(
    bundle: Path, tmp_path: Path, fleet: TestFleet, entry: dict[str, object], reason: str
) -> None:
    store = fleet.trust_store(tmp_path / "keyring.json")
    newer = Ed25519PrivateKey.generate()
    store.update(fleet.make_keyring({fleet.online: entry, newer: {}}, version=2))
    with pytest.raises(BundleError) as e:
        verify_bundle(bundle, tmp_path / "s", profile="x86-64-avx2", runtimes=ORT, trust=store)
    assert e.value.reason == reason


def test_keyring_rules(tmp_path: Path, fleet: TestFleet) -> None:
    store = fleet.trust_store(tmp_path / "keyring.json")
    v2 = fleet.make_keyring({fleet.online: {}}, version=2)
    assert store.update(v2) and not store.update(v2)
    with pytest.raises(BundleError) as e:
        store.update(fleet.keyring)  # v1 again: a rollback
    assert e.value.reason == "keyring_rollback"
    with pytest.raises(BundleError) as e:
        store.update(fleet.make_keyring({}, version=2))  # same version, other content
    assert e.value.reason == "keyring_rollback"
    with pytest.raises(BundleError) as e:
        store.update(
            fleet.make_keyring({fleet.online: {}}, version=3, root=Ed25519PrivateKey.generate())
        )
    assert e.value.reason == "keyring_invalid"
    with pytest.raises(BundleError) as e:
        store.update(
            fleet.make_keyring({fleet.online: {}}, version=4, expires_in=timedelta(seconds=-1))
        )
    assert e.value.reason == "keyring_expired"
    # The held keyring survives a restart, and its expiry stops all verification (no freeze).
    again = TrustStore(fleet.root.public_key(), tmp_path / "keyring.json")
    assert again.keyring.version == 2
    later = datetime.now(UTC) + timedelta(days=60)
    with pytest.raises(BundleError) as e:
        again.check(b"x", [fleet.sign(b"x")], "test", now=later)
    assert e.value.reason == "keyring_expired"


def test_expected_digest_is_checked_before_unpacking(
    bundle: Path, tmp_path: Path, trust: TrustStore
) -> None:
    with pytest.raises(BundleError) as e:
        verify_bundle(
            bundle,
            tmp_path / "s",
            profile="x86-64-avx2",
            runtimes=ORT,
            expected_sha256="0" * 64,
            trust=trust,
        )
    assert e.value.reason == "digest_mismatch"
    assert not (tmp_path / "s").exists()


def test_open_bundle_reads_only_the_head(bundle: Path) -> None:
    with open_bundle(bundle) as reader:
        assert reader.manifest.model.name == "classifier"
        assert reader.manifest.selftest.file == "selftest.npz"
        assert len(reader.signatures) == 1
