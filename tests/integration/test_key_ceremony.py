"""The key ceremony end to end, in production mode: no signing keys until `keys init` (run
with the root key on the operator's side), then rotation and revocation through the CLI,
followed by a real agent that must keep serving and end up on the newest keyring."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fleet_server.broker import EmbeddedBroker
from fleet_server.client import ApiClient, ApiError
from fleet_server.server import EmbeddedStack
from fleet_server.settings import Settings
from hil.rig import LocalAgent, wait_until

pytestmark = pytest.mark.slow
ADMIN = "efa_production-admin-token-with-enough-entropy-0123456789"


def cli(stack: EmbeddedStack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "EDGEFLEET_SERVER": stack.url,
        "EDGEFLEET_TOKEN": ADMIN,
        "EDGEFLEET_ROOT_PASSPHRASE": "correct horse battery staple",
        "COLUMNS": "200",
    }
    return subprocess.run(
        [sys.executable, "-c", "from fleet_server.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_init_rotate_revoke(
    tmp_path: Path, broker: EmbeddedBroker, model_path: Path, uid: str
) -> None:
    settings = Settings(
        env="production",
        data_dir=tmp_path / "server",
        mqtt_url=broker.url,
        port=0,
        admin_token=ADMIN,
        desired_resend_interval_s=0.2,
    )  # type: ignore[arg-type]
    device = f"kc-{uid}"
    agent = None
    with EmbeddedStack(settings) as stack:
        api = ApiClient(stack.url, ADMIN)
        api.upload_model(model_path, "classifier", "1.0.0")
        token = api.post("/v1/enrollment-tokens", json={})["token"]
        # Production: no keys until the operator runs `keys init`.
        with pytest.raises(ApiError) as e:
            api.post(
                "/v1/devices/enroll",
                json={"token": token, "device_id": device, "profile": "x86-64-avx2"},
            )
        assert e.value.status == 409 and "keys init" in e.value.message
        assert not (settings.keys_dir / "dev-root.pem").exists()

        root_key = tmp_path / "operator" / "root.pem"
        r = cli(stack, "keys", "init", "--root-key", str(root_key))
        assert r.returncode == 0, r.stderr
        assert "keyring version 1 installed" in r.stdout
        assert root_key.stat().st_mode & 0o777 == 0o600 and b"ENCRYPTED" in root_key.read_bytes()
        root_public = r.stdout.split("--root-key):")[1].split()[0]

        # The device pins the root key it was told out of band.
        agent = LocalAgent(tmp_path / "devices", device, "x86-64-avx2")
        enroll = [
            sys.executable,
            "-m",
            "edge_agent.cli",
            "enroll",
            "--server",
            stack.url,
            "--token",
            token,
            "--device-id",
            device,
            "--profile",
            "x86-64-avx2",
            "--dir",
            str(agent.dir),
            "--serving-port",
            str(agent.serving_port),
        ]
        bad = subprocess.run(
            [*enroll, "--root-key", "AAAA" + root_public[4:]], capture_output=True, text=True
        )
        assert bad.returncode == 1 and "root key is not the one the device expects" in bad.stderr
        ok = subprocess.run([*enroll, "--root-key", root_public], capture_output=True, text=True)
        assert ok.returncode == 0, ok.stderr
        agent.configure("[probation]\nwindow_s = 0.5\nprobe_interval_s = 0.02\n")
        agent.start()
        agent.wait_ready()
        api.post(
            "/v1/rollouts", json={"model": "classifier", "version": "1.0.0", "devices": [device]}
        )
        agent.wait_serving("classifier", "1.0.0")
        first_sha = agent.serving("classifier")["bundle_sha256"]  # type: ignore[index]

        def agent_keyring_version() -> int:
            path = agent.dir / "state" / "keyring.json"
            return int(json.loads(path.read_text())["signed"]["version"]) if path.is_file() else 0

        assert agent_keyring_version() == 1
        old_key = api.get("/v1/keyring")["keys"][0]["keyid"]

        r = cli(stack, "keys", "rotate", "--root-key", str(root_key))
        assert r.returncode == 0, r.stderr
        assert "keyring version 2 installed; 1 device(s)" in r.stdout
        wait_until(lambda: agent_keyring_version() == 2, 15, "the agent to take keyring v2")

        r = cli(stack, "keys", "revoke", old_key, "--root-key", str(root_key))
        assert r.returncode == 0, r.stderr
        assert "revoked" in r.stdout
        wait_until(lambda: agent_keyring_version() == 3, 15, "the agent to take keyring v3")
        # The bundle signed by the revoked key was re-signed; the device moved to it.
        wait_until(
            lambda: (
                (agent.serving("classifier") or {}).get("bundle_sha256") not in (None, first_sha)
            ),
            30,
            "the re-signed bundle to be served",
        )
        assert agent.serving("classifier")["version"] == "1.0.0"  # type: ignore[index]
        reported = api.get(f"/v1/devices/{device}")["reported"]
        assert not reported.get("refusal")

        # Refused: an older keyring again, a keyring from another root, a wrong passphrase.
        trust = api.get("/v1/trust")
        older = dict(trust["keyring"])
        with pytest.raises(ApiError) as e:
            api.request(
                "PUT",
                "/v1/keyring",
                json={"root_public_key": trust["root_public_key"], "keyring": older},
            )
        assert e.value.status == 409 and "not newer" in e.value.message
        other_root = tmp_path / "other-root.pem"
        assert cli(stack, "keys", "init", "--root-key", str(other_root)).returncode == 1
        env_wrong = cli(stack, "keys", "rotate", "--root-key", str(root_key))
        assert env_wrong.returncode == 0  # right passphrase from the environment
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                "from fleet_server.cli import main; main()",
                "keys",
                "rotate",
                "--root-key",
                str(root_key),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={
                **os.environ,
                "EDGEFLEET_SERVER": stack.url,
                "EDGEFLEET_TOKEN": ADMIN,
                "EDGEFLEET_ROOT_PASSPHRASE": "wrong",
            },
        )
        assert r.returncode == 2 and "wrong passphrase" in r.stderr
        actions = [e["action"] for e in api.get("/v1/audit", params={"action": "keyring"})]
        assert actions.count("keyring.install") == 4
    if agent is not None:
        agent.stop()
