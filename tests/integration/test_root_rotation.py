"""Root key rotation end to end: `edgefleet keys rotate-root` against a real server, and a real
agent process enrolled under root 1 that follows the chain (online, and after being offline
through two rotations) and keeps deploying. A rotation without the old root's passphrase, or
a keyring under a root nobody vouched for, changes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.trust import SignedKeyring
from edge_agent.trust.signing import public_key_to_b64
from fleet_server.client import ApiClient, ApiError
from fleet_server.keys.root import create_root_key, next_keyring
from fleet_server.keys.service import sign_keyring
from fleet_server.server import EmbeddedStack
from fleet_server.settings import Settings
from hil.rig import LocalAgent, roll_out, wait_until
from tests.conftest import ADMIN_TOKEN


@pytest.fixture
def stack(tmp_path: Path, model_path: Path, model_v2_path: Path) -> Iterator[EmbeddedStack]:
    settings = Settings(data_dir=tmp_path / "server", port=0, broker_port=0,
                        admin_token=ADMIN_TOKEN, desired_resend_interval_s=0.2)  # type: ignore[arg-type]  # fmt: skip
    with EmbeddedStack(settings) as stack:
        api = ApiClient(stack.url, ADMIN_TOKEN)
        api.upload_model(model_path, "classifier", "1.0.0")
        api.upload_model(model_v2_path, "classifier", "2.0.0")
        yield stack


def rotate(
    stack: EmbeddedStack, old: Path, new: Path, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from fleet_server.cli import main; main()", "keys",
         "rotate-root", "--root-key", str(old), "--new-root-key", str(new)],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        env={**os.environ, "EDGEFLEET_SERVER": stack.url, "EDGEFLEET_TOKEN": ADMIN_TOKEN,
             "EDGEFLEET_NEW_ROOT_PASSPHRASE": "a new root passphrase", **env},
    )  # fmt: skip


def deploy(api: ApiClient, agent: LocalAgent, version: str) -> None:
    rollout = roll_out(api, "classifier", version, [agent.device_id])
    assert rollout["state"] == "completed", rollout
    agent.wait_serving("classifier", version)


def pinned_version(agent: LocalAgent) -> int:
    path = agent.dir / "state" / "root.json"
    return json.loads(path.read_text())["signed"]["version"] if path.is_file() else 1


def test_an_agent_follows_root_rotations_online_and_after_being_offline(
    stack: EmbeddedStack, tmp_path: Path, uid: str
) -> None:
    api = ApiClient(stack.url, ADMIN_TOKEN)
    root1 = stack.settings.keys_dir / "dev-root.pem"  # development: made at start, unencrypted
    agent = LocalAgent(tmp_path / "devices", f"rot-{uid}", "x86-64-avx2")
    agent.enroll(stack.url, api.post("/v1/enrollment-tokens", json={})["token"])
    agent.start()
    try:
        agent.wait_ready()
        deploy(api, agent, "1.0.0")

        done = rotate(stack, root1, tmp_path / "root2.pem", EDGEFLEET_ROOT_PASSPHRASE="")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "root version 2 installed" in done.stdout
        trust = api.get("/v1/trust")
        assert trust["root_version"] == 2 and len(trust["roots"]) == 1
        # The agent, pinned to root 1, walks to root 2 with its next document and deploys on.
        wait_until(lambda: pinned_version(agent) == 2, 30, "the agent on root 2")
        deploy(api, agent, "2.0.0")

        # Offline through two rotations: it catches up through the chain when it returns.
        agent.stop()
        assert rotate(stack, tmp_path / "root2.pem", tmp_path / "root3.pem",
                      EDGEFLEET_ROOT_PASSPHRASE="a new root passphrase").returncode == 0  # fmt: skip
        assert rotate(stack, tmp_path / "root3.pem", tmp_path / "root4.pem",
                      EDGEFLEET_ROOT_PASSPHRASE="a new root passphrase").returncode == 0  # fmt: skip
        agent.start()
        agent.wait_ready()
        wait_until(lambda: pinned_version(agent) == 4, 30, "the agent on root 4")
        deploy(api, agent, "1.0.0")  # and it deploys on, under root 4
    finally:
        agent.stop()


def test_a_rotation_the_old_root_does_not_sign_changes_nothing(
    stack: EmbeddedStack, tmp_path: Path
) -> None:
    api = ApiClient(stack.url, ADMIN_TOKEN)
    before = api.get("/v1/trust")
    # Without the old root's passphrase: refused before anything is made.
    locked = tmp_path / "locked.pem"
    create_root_key(locked, "the right passphrase")
    wrong = rotate(stack, locked, tmp_path / "new.pem", EDGEFLEET_ROOT_PASSPHRASE="the wrong one!")
    assert wrong.returncode == 2 and not (tmp_path / "new.pem").exists()
    assert wrong.stderr.strip().splitlines() == [
        f"error: {locked}: cannot open the root key (wrong passphrase?)"
    ]
    # A root that is not the one in force: refused, nothing written.
    other = rotate(stack, locked, tmp_path / "new.pem",
                   EDGEFLEET_ROOT_PASSPHRASE="the right passphrase")  # fmt: skip
    assert other.returncode == 2 and "is not the fleet's root in force" in other.stderr
    assert not (tmp_path / "new.pem").exists()
    # A keyring signed by a root nobody vouched for, without a rotation: 409.
    stranger = Ed25519PrivateKey.generate()
    current = SignedKeyring.from_dict(before["keyring"])
    forged = sign_keyring(stranger, next_keyring(current.signed))
    with pytest.raises(ApiError) as e:
        api.request("PUT", "/v1/keyring", json={
            "root_public_key": public_key_to_b64(stranger.public_key()),
            "keyring": forged.to_dict()})  # fmt: skip
    assert e.value.status == 409 and "rotate-root" in e.value.message
    after = api.get("/v1/trust")
    assert after == before
