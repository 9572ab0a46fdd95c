"""Builders of real artifacts for tests: a test fleet (root and online keys) that signs like
the server, bundles built by the real converter, and tampered copies written with tarfile."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from converters import build_bundle, inspect_onnx
from edge_agent.bundle import (
    FileEntry,
    Manifest,
    ModelRef,
    RuntimeRequirement,
    SelfTestSpec,
    TensorSpec,
    sha256_file,
)
from edge_agent.protocol.desired import DesiredState, SignedDesiredState, SlotAssignment
from edge_agent.protocol.status import VersionRef
from edge_agent.runtimes import LoadOptions
from edge_agent.runtimes.onnxruntime import OnnxRuntime
from edge_agent.serving import ServingModel
from edge_agent.trust import KeyEntry, Keyring, Signature, SignedKeyring, TrustStore, key_id
from edge_agent.trust.signing import public_key_to_b64
from firmware_profiles import default_catalog
from fleet_server.keys.service import sign_bytes, sign_keyring


class TestFleet:
    """A root key and an online key, as a fleet has them; signs like the server does."""

    __test__ = False  # not a pytest class

    def __init__(self) -> None:
        self.root = Ed25519PrivateKey.generate()
        self.online = Ed25519PrivateKey.generate()
        self.keyring = self.make_keyring({self.online: {}}, version=1)

    @property
    def root_public(self) -> str:
        return public_key_to_b64(self.root.public_key())

    def make_keyring(
        self,
        keys: dict[Ed25519PrivateKey, dict[str, object]],
        *,
        version: int,
        root: Ed25519PrivateKey | None = None,
        expires_in: timedelta = timedelta(days=30),
    ) -> SignedKeyring:
        now = datetime.now(UTC).replace(microsecond=0)
        entries = {}
        for key, extra in keys.items():
            fields: dict[str, object] = {
                "public": public_key_to_b64(key.public_key()),
                "expires_at": now + timedelta(days=30),
                **extra,
            }
            entries[key_id(key.public_key())] = KeyEntry.from_dict(fields)
        ring = Keyring(version=version, issued_at=now, expires_at=now + expires_in, keys=entries)
        return sign_keyring(root or self.root, ring)

    def sign(self, message: bytes, key: Ed25519PrivateKey | None = None) -> Signature:
        return sign_bytes(key or self.online, message)

    def trust_store(self, path: Path) -> TrustStore:
        store = TrustStore(self.root.public_key(), path)
        store.update(self.keyring)
        return store

    def desired(
        self,
        device_id: str,
        seq: int,
        slots: dict[str, SlotAssignment],
        *,
        expires_in: timedelta = timedelta(hours=1),
        key: Ed25519PrivateKey | None = None,
        keyring: SignedKeyring | None = None,
        signed: bool = True,
    ) -> SignedDesiredState:
        now = datetime.now(UTC)
        env = SignedDesiredState(
            signed=DesiredState(
                device_id=device_id,
                seq=seq,
                issued_at=now,
                expires_at=now + expires_in,
                slots=slots,
            ),
            keyring=keyring or self.keyring,
        )
        if not signed:
            return env
        return env.replace(signatures=[self.sign(env.signed_bytes(), key)])


def sha256(path: Path) -> str:
    return sha256_file(path)


def make_bundle(
    model: Path,
    out: Path,
    *,
    profile: str = "x86-64-avx2",
    name: str = "classifier",
    version: str = "1.0.0",
    fleet: TestFleet | None = None,
    key: Ed25519PrivateKey | None = None,
) -> Manifest:
    """A real bundle; its manifest signed by ``fleet``'s online key (or ``key``)."""
    info = inspect_onnx(model)
    signer = None
    signing_key_id = None
    if fleet is not None:
        signing_key = key or fleet.online
        signing_key_id = key_id(signing_key.public_key())

        def signer(message: bytes) -> Signature:
            return fleet.sign(message, signing_key)

    result = build_bundle(
        source=model,
        source_sha256=sha256(model),
        name=name,
        version=version,
        inputs=info.inputs,
        outputs=info.outputs,
        profile=default_catalog().get(profile),
        out_path=out,
        signer=signer,
        signing_key_id=signing_key_id,
    )
    return result.manifest


Members = list[tuple[tarfile.TarInfo, bytes]]


def read_members(bundle: Path) -> Members:
    with tarfile.open(bundle) as tar:
        return [
            (m, tar.extractfile(m).read() if m.isfile() else b"")  # type: ignore[union-attr]
            for m in tar.getmembers()
        ]


def write_members(out: Path, members: Members) -> Path:
    with tarfile.open(out, "w") as tar:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return out


def resign(members: Members, key: Ed25519PrivateKey) -> Members:
    """Recompute the manifest's digests for the members as they are now, and sign it again
    with ``key``: what a compromised build host holding a signing key could produce."""
    manifest = json.loads(members[0][1])
    data = {i.name: d for i, d in members}
    for f in manifest["files"]:
        if f["path"] in data:
            f.update(sha256=hashlib.sha256(data[f["path"]]).hexdigest(), size=len(data[f["path"]]))
    raw = Manifest.from_dict(manifest).to_canonical_json()
    sig = json.dumps({"signatures": [sign_bytes(key, raw).to_dict()]}).encode()
    rest = [(i, d) for i, d in members[1:] if i.name != "manifest.sig"]
    return [(members[0][0], raw), (tarfile.TarInfo("manifest.sig"), sig), *rest]


def rewrite_manifest(
    bundle: Path, out: Path, fleet: TestFleet | None = None, **changes: object
) -> Path:
    """Change manifest fields, re-signed by ``fleet`` so that only the change is wrong."""
    members = read_members(bundle)
    manifest = json.loads(members[0][1])
    manifest.update(changes)
    members[0] = (members[0][0], Manifest.from_dict(manifest).to_canonical_json())
    if fleet is not None:
        members = resign(members, fleet.online)
    return write_members(out, members)


def make_litert_bundle(
    tflite: Path,
    out: Path,
    *,
    fleet: TestFleet,
    profile: str = "raspberry-pi-4",
    name: str = "classifier",
    version: str = "1.0.0",
    source_sha256: str = "0" * 64,
) -> Manifest:
    """A signed LiteRT bundle around a .tflite file, self-test vectors computed in LiteRT."""
    from converters.selftest import synthetic_inputs
    from edge_agent.bundle import BundleWriter, ModelRef, RuntimeRequirement, SelfTestSpec
    from edge_agent.bundle.selftest import pack
    from edge_agent.runtimes import LoadOptions, get_runtime

    model = get_runtime("litert").load(tflite, LoadOptions(threads=1))
    feeds = synthetic_inputs(model.inputs, batch=2)
    outputs = model.run(feeds)
    writer = BundleWriter()
    writer.add_file("model/model.tflite", tflite)
    writer.add_file("selftest.npz", pack(feeds, outputs))
    manifest = Manifest(
        model=ModelRef(name=name, version=version, source_sha256=source_sha256),
        profile=profile,
        runtime=RuntimeRequirement(name="litert", versions=">=2.0,<3"),
        precision="fp32",
        artifact="model/model.tflite",
        files=writer.entries(),
        inputs=model.inputs,
        outputs=model.outputs,
        selftest=SelfTestSpec(file="selftest.npz", atol=1e-5, rtol=1e-4),
        toolchain={"edgefleet-tests": "1"},
        created_at=datetime.now(UTC).replace(microsecond=0),
        signing_key_id=key_id(fleet.online.public_key()),
    )
    writer.write(out, manifest, [fleet.sign(manifest.to_canonical_json())])
    model.close()
    return manifest


def served_manifest(
    name: str,
    version: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    toolchain: dict[str, str] | None = None,
) -> Manifest:
    """The manifest of a model served in-process by a test or a benchmark: no bundle is
    behind it, so its digests are all zeros and nothing is checked against them. Its self-test file is ``selftest.npz``, which a test that
    stages the model writes beside it."""
    return Manifest(
        model=ModelRef(name=name, version=version, source_sha256="0" * 64),
        profile="x86-64-avx2",
        runtime=RuntimeRequirement(name="onnxruntime", versions=">=1"),
        precision="fp32",
        artifact="model/model.onnx",
        files=[
            FileEntry(path=p, sha256="0" * 64, size=1) for p in ("model/model.onnx", "selftest.npz")
        ],
        inputs=inputs,
        outputs=outputs,
        selftest=SelfTestSpec(file="selftest.npz", atol=0, rtol=0),
        toolchain=toolchain or {},
        created_at=datetime.now(UTC),
    )


def onnx_serving(
    path: Path,
    version: str,
    *,
    name: str = "classifier",
    inputs: list[TensorSpec] | None = None,
    outputs: list[TensorSpec] | None = None,
    options: LoadOptions | None = None,
) -> ServingModel:
    """An ONNX file loaded in the agent's onnxruntime backend, ready for a slot table (the
    sample classifier's x[batch, 16] → probs[batch, 4] unless told otherwise)."""
    model = OnnxRuntime().load(path, options or LoadOptions())
    ref = VersionRef(
        model=name, version=version, bundle_sha256=version[0] * 64, runtime="onnxruntime",
        precision="fp32",
    )  # fmt: skip
    inputs = inputs or [TensorSpec(name="x", dtype="float32", shape=["batch", 16])]
    outputs = outputs or [TensorSpec(name="probs", dtype="float32", shape=["batch", 4])]
    return ServingModel(ref, served_manifest(name, version, inputs, outputs), model)
