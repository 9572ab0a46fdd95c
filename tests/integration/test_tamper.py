"""The tamper suite: a real ``edge-agent`` process, enrolled and serving v1 through the real
server, is sent crafted desired-state documents and bundles by an attacker who can publish on
the broker and host files. Every case is refused with its specific reason, the refusal is
reported to the server, and the device keeps serving v1.

The cases run in order against one agent (module-scoped rig): a first, legitimate keyring
update adds extra keys (one valid, one revoked, one expired) that later cases sign with.
"""

from __future__ import annotations

import functools
import json
import tarfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.protocol import Topics
from edge_agent.protocol.desired import DesiredState, SignedDesiredState, SlotAssignment
from edge_agent.trust import KeyEntry, Keyring, SignedKeyring, key_id
from edge_agent.trust.signing import public_key_to_b64
from fleet_server.client import ApiClient
from fleet_server.keys.service import sign_bytes, sign_keyring
from fleet_server.server import EmbeddedStack
from fleet_server.settings import Settings
from hil.rig import LocalAgent, wait_until
from tests.factories import Members, read_members, resign, sha256, write_members

pytestmark = pytest.mark.slow

DEVICE = "tamper-dev"


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Rig:
    api: ApiClient
    agent: LocalAgent
    attacker: mqtt.Client
    files: Path
    files_url: str
    root: Ed25519PrivateKey
    server_key: Ed25519PrivateKey
    keyring_v1: SignedKeyring
    good_bundle: Path
    good: SlotAssignment
    seq: int = 0
    keys: dict[str, Ed25519PrivateKey] = field(default_factory=dict)
    keyring_v2: SignedKeyring | None = None
    last: SignedDesiredState | None = None

    # --- crafting ------------------------------------------------------------------------------
    def reported(self) -> dict[str, Any]:
        return dict(self.api.get(f"/v1/devices/{DEVICE}")["reported"] or {})

    def host(self, name: str, members: Members) -> SlotAssignment:
        path = write_members(self.files / name, members)
        return self.good.replace(
            **{
                "version": "2.0.0",
                "bundle_sha256": sha256(path),
                "bundle_url": f"{self.files_url}/{name}",
                "size": path.stat().st_size,
            }
        )

    def document(
        self,
        *,
        seq: int | None = None,
        slot: SlotAssignment | None = None,
        device: str = DEVICE,
        expires_in: timedelta = timedelta(hours=1),
        key: Ed25519PrivateKey | None = None,
        keyring: SignedKeyring | None = None,
        signed: bool = True,
    ) -> SignedDesiredState:
        if seq is None:
            self.seq += 1
            seq = self.seq
        now = datetime.now(UTC).replace(microsecond=0)
        env = SignedDesiredState(
            signed=DesiredState(
                device_id=device,
                seq=seq,
                issued_at=now,
                expires_at=now + expires_in,
                slots={"classifier": slot or self.good},
            ),
            keyring=keyring or self.keyring_v2 or self.keyring_v1,
        )
        if signed:
            sig = sign_bytes(key or self.server_key, env.signed_bytes())
            env = env.replace(signatures=[sig])
        return env

    def send(self, env: SignedDesiredState | bytes) -> None:
        payload = env if isinstance(env, bytes) else env.to_bytes()
        info = self.attacker.publish(Topics(DEVICE).desired, payload, qos=1, retain=True)
        info.wait_for_publish(5)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("tamper")
    stack = EmbeddedStack(Settings(data_dir=tmp / "server", port=0, broker_port=0)).start()
    agent = None
    www = tmp / "www"
    www.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(www)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    attacker = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="attacker", protocol=mqtt.MQTTv5)
    try:
        api = ApiClient(stack.url, stack.admin_token)
        api.upload_model(model_path, "classifier", "1.0.0")
        token = api.post("/v1/enrollment-tokens", json={"profile": "x86-64-avx2"})["token"]
        agent = LocalAgent(tmp / "devices", DEVICE, "x86-64-avx2")
        agent.enroll(stack.url, token)
        agent.start()
        agent.wait_ready()
        api.post(
            "/v1/rollouts", json={"model": "classifier", "version": "1.0.0", "devices": [DEVICE]}
        )
        agent.wait_serving("classifier", "1.0.0")
        wait_until(lambda: api.get(f"/v1/devices/{DEVICE}")["reported_seq"] == 1, 10, "status")

        keys_dir = stack.settings.keys_dir
        root = load_pem_private_key((keys_dir / "dev-root.pem").read_bytes(), None)
        trust = api.get("/v1/trust")
        keyring_v1 = SignedKeyring.from_dict(trust["keyring"])
        [server_kid] = keyring_v1.signed.keys
        server_key = load_pem_private_key(
            (keys_dir / "online" / f"{server_kid}.pem").read_bytes(), None
        )
        assert isinstance(root, Ed25519PrivateKey) and isinstance(server_key, Ed25519PrivateKey)
        document = SignedDesiredState.from_dict(_stored_document(stack))
        good = document.signed.slots["classifier"]
        good_bundle = (
            stack.settings.artifacts_dir / "sha256" / good.bundle_sha256[:2] / good.bundle_sha256
        )
        attacker.connect(stack.broker.host, stack.broker.port)  # type: ignore[union-attr]
        attacker.loop_start()
        yield Rig(
            api=api,
            agent=agent,
            attacker=attacker,
            files=www,
            files_url=f"http://127.0.0.1:{httpd.server_address[1]}",
            root=root,
            server_key=server_key,
            keyring_v1=keyring_v1,
            good_bundle=good_bundle,
            good=good,
            seq=1,
        )
    finally:
        attacker.loop_stop()
        if agent is not None:
            agent.stop()
        httpd.shutdown()
        stack.stop()


def _stored_document(stack: EmbeddedStack) -> dict[str, Any]:
    from sqlmodel import Session

    from fleet_server.database import make_engine
    from fleet_server.devices.tables import DesiredStateRecord

    engine = make_engine(stack.settings.resolved_database_url)
    with Session(engine) as s:
        record = s.get(DesiredStateRecord, DEVICE)
        assert record is not None
        doc = dict(record.document)
    engine.dispose()
    return doc


def _expect_refusal(rig: Rig, reason: str, seq: int) -> None:
    def refused() -> bool:
        r = rig.reported().get("refusal") or {}
        return r.get("reason") == reason and r.get("seq") == seq

    try:
        wait_until(refused, 15, f"refusal {reason} of seq {seq}")
    except TimeoutError:
        pytest.fail(
            f"expected refusal {reason}, device reports {rig.reported().get('refusal')}\n{rig.agent.log_tail(8)}"
        )


def _expect_failed(rig: Rig, reason: str, seq: int) -> None:
    def failed() -> bool:
        rep = rig.reported()
        slot = (rep.get("slots") or {}).get("classifier") or {}
        return (
            rep.get("desired_seq") == seq
            and slot.get("state") == "FAILED"
            and (slot.get("error") or {}).get("reason") == reason
        )

    try:
        wait_until(failed, 15, f"deployment of seq {seq} to fail with {reason}")
    except TimeoutError:
        slot = (rig.reported().get("slots") or {}).get("classifier")
        pytest.fail(f"expected failure {reason}, device reports {slot}\n{rig.agent.log_tail(8)}")


def _still_serving_v1(rig: Rig) -> None:
    x = np.ones((1, 16), np.float32)
    assert rig.agent.client.predict("classifier", {"x": x})["probs"].shape == (1, 4)
    assert (rig.agent.serving("classifier") or {})["version"] == "1.0.0"


def _flip(data: bytes, at: int = 100) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


# --- the cases ---------------------------------------------------------------------------------
def case_keyring_update_is_accepted(rig: Rig) -> tuple[str, int] | None:
    """Not an attack: a legitimate keyring v2 with extra keys that later cases use."""
    for name in ("valid", "revoked", "expired"):
        rig.keys[name] = Ed25519PrivateKey.generate()
    now = datetime.now(UTC).replace(microsecond=0)
    entries = {
        key_id(k.public_key()): KeyEntry(
            public=public_key_to_b64(k.public_key()),
            expires_at=now + (timedelta(days=-1) if name == "expired" else timedelta(days=30)),
            revoked=name == "revoked",
        )
        for name, k in {**rig.keys, "server": rig.server_key}.items()
    }
    ring = Keyring(version=2, issued_at=now, expires_at=now + timedelta(days=30), keys=entries)
    rig.keyring_v2 = sign_keyring(rig.root, ring)
    env = rig.document()
    rig.send(env)
    wait_until(
        lambda: rig.reported().get("desired_seq") == env.signed.seq, 15, "keyring v2 accepted"
    )
    assert not rig.reported().get("refusal")
    return None


def doc_unsigned(rig: Rig) -> tuple[str, int]:
    env = rig.document(signed=False)
    rig.send(env)
    return "unsigned", env.signed.seq


def doc_unknown_key(rig: Rig) -> tuple[str, int]:
    env = rig.document(key=Ed25519PrivateKey.generate())
    rig.send(env)
    return "unknown_key", env.signed.seq


def doc_revoked_key(rig: Rig) -> tuple[str, int]:
    env = rig.document(key=rig.keys["revoked"])
    rig.send(env)
    return "revoked_key", env.signed.seq


def doc_expired_key(rig: Rig) -> tuple[str, int]:
    env = rig.document(key=rig.keys["expired"])
    rig.send(env)
    return "expired_key", env.signed.seq


def doc_altered_after_signing(rig: Rig) -> tuple[str, int]:
    env = rig.document()
    evil = env.signed.replace(slots={"classifier": rig.good.replace(version="6.6.6")})
    rig.send(env.replace(signed=evil))
    return "bad_signature", env.signed.seq


def doc_lower_seq(rig: Rig) -> tuple[str, int]:
    env = rig.document(seq=1)
    rig.send(env)
    return "stale_seq", 1


def doc_replayed_seq(rig: Rig) -> tuple[str, int]:
    held = rig.reported()["desired_seq"]
    env = rig.document(seq=held, slot=rig.good.replace(rollout_id="replay"))
    rig.send(env)
    return "replayed_seq", held


def doc_expired(rig: Rig) -> tuple[str, int]:
    env = rig.document(expires_in=timedelta(seconds=-5))
    rig.send(env)
    return "desired_state_expired", env.signed.seq


def doc_for_another_device(rig: Rig) -> tuple[str, int]:
    env = rig.document(device="someone-else")
    rig.send(env)
    return "wrong_device", env.signed.seq


def doc_keyring_rollback(rig: Rig) -> tuple[str, int]:
    env = rig.document(keyring=rig.keyring_v1)
    rig.send(env)
    return "keyring_rollback", env.signed.seq


def doc_keyring_from_another_root(rig: Rig) -> tuple[str, int]:
    assert rig.keyring_v2 is not None
    forged = sign_keyring(Ed25519PrivateKey.generate(), rig.keyring_v2.signed.replace(version=9))
    env = rig.document(keyring=forged)
    rig.send(env)
    return "keyring_invalid", env.signed.seq


def bundle_flipped_model_byte(rig: Rig) -> tuple[str, int]:
    members = [
        (i, _flip(d) if i.name.startswith("model/") else d)
        for i, d in read_members(rig.good_bundle)
    ]
    env = rig.document(slot=rig.host("flipped-model.efb", members))
    rig.send(env)
    return "digest_mismatch", env.signed.seq


def bundle_flipped_manifest_byte(rig: Rig) -> tuple[str, int]:
    members = read_members(rig.good_bundle)
    members[0] = (members[0][0], members[0][1].replace(b'"1.0.0"', b'"2.0.0"'))
    env = rig.document(slot=rig.host("flipped-manifest.efb", members))
    rig.send(env)
    return "bad_signature", env.signed.seq


def bundle_signed_by_unknown_key(rig: Rig) -> tuple[str, int]:
    members = resign(read_members(rig.good_bundle), Ed25519PrivateKey.generate())
    env = rig.document(slot=rig.host("unknown-key.efb", members))
    rig.send(env)
    return "unknown_key", env.signed.seq


def bundle_signed_by_revoked_key(rig: Rig) -> tuple[str, int]:
    members = resign(read_members(rig.good_bundle), rig.keys["revoked"])
    env = rig.document(slot=rig.host("revoked-key.efb", members))
    rig.send(env)
    return "revoked_key", env.signed.seq


def _manifest_change(rig: Rig, name: str, **changes: Any) -> SlotAssignment:
    members = read_members(rig.good_bundle)
    manifest = json.loads(members[0][1])
    manifest.update(changes)
    members[0] = (members[0][0], json.dumps(manifest).encode())
    return rig.host(name, resign(members, rig.server_key))


def bundle_expired(rig: Rig) -> tuple[str, int]:
    env = rig.document(slot=_manifest_change(rig, "expired.efb", expires_at="2020-01-01T00:00:00Z"))
    rig.send(env)
    return "bundle_expired", env.signed.seq


def bundle_wrong_profile(rig: Rig) -> tuple[str, int]:
    env = rig.document(slot=_manifest_change(rig, "profile.efb", profile="raspberry-pi-4"))
    rig.send(env)
    return "wrong_profile", env.signed.seq


def bundle_wrong_runtime(rig: Rig) -> tuple[str, int]:
    slot = _manifest_change(rig, "runtime.efb", runtime={"name": "tensorrt", "versions": ">=8.6"})
    env = rig.document(slot=slot)
    rig.send(env)
    return "wrong_runtime", env.signed.seq


def bundle_oversize_download(rig: Rig) -> tuple[str, int]:
    slot = rig.host(
        "oversize.efb", [*read_members(rig.good_bundle), (tarfile.TarInfo("pad"), b"\x00" * 100000)]
    )
    env = rig.document(slot=slot.replace(size=slot.size - 100_000))
    rig.send(env)
    return "oversize", env.signed.seq


def bundle_digest_differs_from_document(rig: Rig) -> tuple[str, int]:
    slot = rig.host("digest.efb", read_members(rig.good_bundle))
    env = rig.document(slot=slot.replace(bundle_sha256="e" * 64))
    rig.send(env)
    return "digest_mismatch", env.signed.seq


def bundle_tar_traversal(rig: Rig) -> tuple[str, int]:
    evil = tarfile.TarInfo("../../../../tmp/edgefleet-pwned")
    members = [*read_members(rig.good_bundle), (evil, b"pwned")]
    env = rig.document(slot=rig.host("traversal.efb", members))
    rig.send(env)
    return "unsafe_path", env.signed.seq


def bundle_symlink_member(rig: Rig) -> tuple[str, int]:
    link = tarfile.TarInfo("model/evil-link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
    members = [*read_members(rig.good_bundle), (link, b"")]
    env = rig.document(slot=rig.host("symlink.efb", members))
    rig.send(env)
    return "unsafe_member", env.signed.seq


DOCUMENT_CASES: list[Callable[[Rig], tuple[str, int]]] = [
    doc_unsigned, doc_unknown_key, doc_revoked_key, doc_expired_key, doc_altered_after_signing,
    doc_lower_seq, doc_replayed_seq, doc_expired, doc_for_another_device, doc_keyring_rollback,
    doc_keyring_from_another_root,
]  # fmt: skip
BUNDLE_CASES: list[Callable[[Rig], tuple[str, int]]] = [
    bundle_flipped_model_byte, bundle_flipped_manifest_byte, bundle_signed_by_unknown_key,
    bundle_signed_by_revoked_key, bundle_expired, bundle_wrong_profile, bundle_wrong_runtime,
    bundle_oversize_download, bundle_digest_differs_from_document, bundle_tar_traversal,
    bundle_symlink_member,
]  # fmt: skip


def test_a_legitimate_keyring_update_is_accepted(rig: Rig) -> None:
    case_keyring_update_is_accepted(rig)
    _still_serving_v1(rig)


@pytest.mark.parametrize("case", DOCUMENT_CASES, ids=lambda c: c.__name__)
def test_tampered_desired_state_is_refused(
    rig: Rig, case: Callable[[Rig], tuple[str, int]]
) -> None:
    if rig.keyring_v2 is None:
        case_keyring_update_is_accepted(rig)
    reason, seq = case(rig)
    _expect_refusal(rig, reason, seq)
    _still_serving_v1(rig)


@pytest.mark.parametrize("case", BUNDLE_CASES, ids=lambda c: c.__name__)
def test_tampered_bundle_is_refused(rig: Rig, case: Callable[[Rig], tuple[str, int]]) -> None:
    if rig.keyring_v2 is None:
        case_keyring_update_is_accepted(rig)
    reason, seq = case(rig)
    _expect_failed(rig, reason, seq)
    _still_serving_v1(rig)
    assert not Path("/tmp/edgefleet-pwned").exists()
    state = rig.agent.dir / "state"
    assert sorted(p.name for p in (state / "models").iterdir()) == [rig.good.bundle_sha256]
    assert list((state / "staging").iterdir()) == []
