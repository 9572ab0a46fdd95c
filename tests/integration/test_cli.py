"""The ``edgefleet`` and ``edge-agent`` command lines as a user runs them (subprocesses),
against a real server: outputs, one-line errors, exit codes 0 / 1 / 2."""

from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fleet_server.client import ApiClient, ApiError
from fleet_server.server import EmbeddedStack
from hil.rig import wait_until
from tests.conftest import ADMIN_TOKEN
from tests.factories import TestFleet, make_bundle, read_members, write_members


def edgefleet(stack: EmbeddedStack | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGEFLEET_TOKEN": ADMIN_TOKEN, "COLUMNS": "200"}
    if stack is not None:
        env["EDGEFLEET_SERVER"] = stack.url
    return subprocess.run(
        [sys.executable, "-c", "from fleet_server.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_models_push_list_show(stack: EmbeddedStack, model_path: Path) -> None:
    r = edgefleet(
        stack, "models", "push", str(model_path), "--name", "classifier", "--version", "1.0.0"
    )
    assert r.returncode == 0, r.stderr
    assert "pushed classifier 1.0.0" in r.stdout and "x['batch', 16]" in r.stdout
    r = edgefleet(stack, "models", "list", "--json")
    assert json.loads(r.stdout)[0]["versions"][0]["version"] == "1.0.0"
    r = edgefleet(stack, "models", "show", "classifier")
    assert r.returncode == 0 and "1.0.0" in r.stdout
    # Duplicate: operation failed → exit 1, one line.
    r = edgefleet(
        stack, "models", "push", str(model_path), "--name", "classifier", "--version", "1.0.0"
    )
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "already exists" in r.stderr


def test_a_version_explains_itself(
    stack: EmbeddedStack, api: ApiClient, model_path: Path, model_v2_path: Path, tmp_path: Path
) -> None:
    card = tmp_path / "CARD.md"
    card.write_text("# Classifier\n\nTrained on **bench-2026-11**; known weak on class 3.\n")
    r = edgefleet(stack, "models", "push", str(model_path), "--name", "clf", "--version", "1.0.0",
                  "--card", str(card), "--meta", "commit=4be1f0c", "--meta", "owner=vision-team",
                  "--meta", "offline_top1=0.913")  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = edgefleet(stack, "models", "push", str(model_v2_path), "--name", "clf", "--version",
                  "1.1.0", "--parent", "1.0.0", "--meta", "data=s3://datasets/bench-2026-12")  # fmt: skip
    assert r.returncode == 0, r.stderr
    api.post("/v1/builds", json={"model": "clf", "version": "1.1.0", "profile": "x86-64-avx2"})
    wait_until(lambda: api.get("/v1/models/clf/versions/1.1.0/overview")["bundles"], 120,
               "the build")  # fmt: skip
    shown = edgefleet(stack, "models", "show", "clf", "1.1.0")
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "lineage: 1.1.0 ← 1.0.0" in out and "s3://datasets/bench-2026-12" in out, out
    assert "x86-64-avx2" in out and "runs on 0 device(s)" in out, out
    root = edgefleet(stack, "models", "show", "clf", "1.0.0").stdout
    assert "derived from it: 1.1.0" in root and "known weak on class 3" in root, root
    assert "vision-team" in root and "4be1f0c" in root
    detail = api.get("/v1/models/clf/versions/1.0.0")
    assert detail["meta"]["offline_top1"] == "0.913" and detail["card"].startswith("# Classifier")
    diff = edgefleet(stack, "models", "diff", "clf", "1.0.0", "1.1.0")
    assert diff.returncode == 0 and "callers need no change" in diff.stdout, diff.stdout


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"meta": '{"not an identifier": "x"}'}, "meta"),
        ({"meta": '{"1st": "x"}'}, "meta"),
        ({"meta": "[1, 2]"}, "meta"),
        ({"meta": '{"k": {"nested": 1}}'}, "meta"),
        ({"parents": "9.9.9"}, "parents"),
        ({"card": b"x" * (64 * 1024 + 1)}, "card"),
        ({"card": b"\xff\xfe not utf-8"}, "card"),
    ],
)
def test_bad_cards_metadata_and_parents_store_nothing(
    stack: EmbeddedStack, api: ApiClient, model_path: Path, extra: dict[str, Any], field: str
) -> None:
    data = {"name": "clf", "version": "2.0.0", **{k: v for k, v in extra.items() if k != "card"}}
    files: dict[str, Any] = {"file": ("m.onnx", model_path.read_bytes())}
    if "card" in extra:
        files["card"] = ("CARD.md", extra["card"])
    with pytest.raises(ApiError) as refused:
        api.post("/v1/models", files=files, data=data)
    assert refused.value.status == 422 and field in str(refused.value.fields), refused.value
    with pytest.raises(ApiError):  # nothing stored half-way
        api.get("/v1/models/clf/versions/2.0.0")


def test_usage_errors_exit_2(stack: EmbeddedStack, model_path: Path) -> None:
    r = edgefleet(stack, "models", "push", str(model_path), "--name", "classifier")
    assert r.returncode == 2 and "--version" in r.stderr
    r = edgefleet(
        stack,
        "rollouts",
        "create",
        "--model",
        "m",
        "--version",
        "1.0.0",
        "--selector",
        "site in (berlin",
    )
    assert r.returncode == 2 and "selector" in r.stderr, r.stderr


def test_unreachable_server_says_so(tmp_path: Path) -> None:
    env_stack = None
    r = edgefleet(env_stack, "--help")
    assert r.returncode == 0
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "from fleet_server.cli import main; main()",
            "models",
            "list",
            "--server",
            "http://127.0.0.1:9",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "EDGEFLEET_TOKEN": "x"},
    )
    assert r.returncode == 1 and "cannot reach the server" in r.stderr


def test_token_enroll_deploy_status(stack: EmbeddedStack, model_path: Path, tmp_path: Path) -> None:
    edgefleet(
        stack, "models", "push", str(model_path), "--name", "classifier", "--version", "1.0.0"
    )
    token = edgefleet(stack, "devices", "token", "--profile", "x86-64-avx2").stdout.strip()
    assert token.startswith("efe_")
    agent_dir = tmp_path / "agent"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent.cli",
            "enroll",
            "--server",
            stack.url,
            "--token",
            token,
            "--device-id",
            "cli-dev",
            "--profile",
            "x86-64-avx2",
            "--dir",
            str(agent_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert (agent_dir / "agent.toml").is_file()
    assert oct((agent_dir / "device.secret").stat().st_mode & 0o777) == "0o600"
    # The token was single-use.
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent.cli",
            "enroll",
            "--server",
            stack.url,
            "--token",
            token,
            "--device-id",
            "cli-dev2",
            "--profile",
            "x86-64-avx2",
            "--dir",
            str(tmp_path / "a2"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "already used" in r.stderr
    r = edgefleet(stack, "devices", "list")
    assert "cli-dev" in r.stdout
    r = edgefleet(
        stack,
        "rollouts",
        "create",
        "--model",
        "classifier",
        "--version",
        "1.0.0",
        "--device",
        "cli-dev",
        "--no-wait",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    rollout = json.loads(r.stdout)
    r = edgefleet(stack, "rollouts", "status", rollout["id"])
    assert r.returncode == 0 and "cli-dev" in r.stdout and "pending" in r.stdout
    r = edgefleet(
        stack,
        "rollouts",
        "create",
        "--model",
        "classifier",
        "--version",
        "1.0.0",
        "--device",
        "ghost",
        "--no-wait",
    )
    assert r.returncode == 1 and "not enrolled (or decommissioned): ghost" in r.stderr


def test_bundle_inspect_and_verify(model_path: Path, tmp_path: Path) -> None:
    fleet, stranger = TestFleet(), TestFleet()
    signed, unsigned = tmp_path / "signed.efb", tmp_path / "unsigned.efb"
    make_bundle(model_path, signed, fleet=fleet)
    make_bundle(model_path, unsigned)
    trust = tmp_path / "trust.json"
    trust.write_text(
        json.dumps({"root_public_key": fleet.root_public, "keyring": fleet.keyring.to_dict()})
    )
    other = tmp_path / "other.json"
    other.write_text(
        json.dumps(
            {
                "root_public_key": stranger.root_public,
                "keyring": stranger.keyring.to_dict(),
            }
        )
    )

    r = edgefleet(None, "bundle", "inspect", str(signed))
    assert r.returncode == 0 and json.loads(r.stdout)["model"]["name"] == "classifier"
    r = edgefleet(None, "bundle", "verify", str(signed), "--trust", str(trust))
    assert r.returncode == 0 and "3 files verified" in r.stdout and "verified" in r.stdout
    r = edgefleet(None, "bundle", "verify", str(signed))
    assert r.returncode == 0 and "not checked" in r.stdout
    r = edgefleet(None, "bundle", "verify", str(unsigned), "--trust", str(trust))
    assert r.returncode == 1 and "not signed" in r.stderr
    r = edgefleet(None, "bundle", "verify", str(signed), "--trust", str(other))
    assert r.returncode == 1 and "not in the keyring" in r.stderr
    r = edgefleet(
        None, "bundle", "verify", str(signed), "--trust", str(trust), "--profile", "raspberry-pi-4"
    )
    assert r.returncode == 1 and "profile" in r.stderr
    members = read_members(signed)
    members = [(i, d[:-1] + b"X" if i.name.startswith("model/") else d) for i, d in members]
    bad = write_members(tmp_path / "bad.efb", members)
    r = edgefleet(None, "bundle", "verify", str(bad), "--trust", str(trust))
    assert r.returncode == 1 and "sha256 does not match" in r.stderr


def _agent_config(device_id: str = "ok-id", mqtt_url: str = "mqtt://127.0.0.1:1") -> str:
    return (
        f'device_id = "{device_id}"\nprofile = "x86-64-avx2"\nstate_dir = "s"\n'
        f'[server]\nurl = "http://127.0.0.1:9"\ncredential_file = "c"\n[mqtt]\nurl = "{mqtt_url}"\n'
        '[trust]\nroot_key_file = "root.pub"\n'
    )


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (_agent_config(device_id="Bad/Id"), "device_id"),
        (_agent_config(mqtt_url="http://x"), "mqtt.url"),
        (_agent_config() + "[serving]\nport = 70000\n", "serving.port"),
        (_agent_config(), "device credential"),
        (_agent_config().replace("[trust]", "[trusty]"), "trust"),
        ("device_id = ", "not valid TOML"),
    ],
)
def test_agent_config_errors_name_the_field(tmp_path: Path, text: str, needle: str) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(text)
    r = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and needle in r.stderr, r.stderr


def test_devices_tokens_writes_a_private_csv_and_never_overwrites(
    stack: EmbeddedStack, tmp_path: Path
) -> None:
    out = tmp_path / "pallet.csv"
    r = edgefleet(stack, "devices", "tokens", "--count", "5", "--profile", "x86-64-avx2",
                  "--label", "site=lab", "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"wrote 5 enrollment token(s) to {out}" in r.stdout.replace("\n", "")
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 5 and len({row["token"] for row in rows}) == 5
    assert {(row["profile"], row["labels"]) for row in rows} == {("x86-64-avx2", "site=lab")}
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    written = out.read_text()
    again = edgefleet(stack, "devices", "tokens", "--count", "1", "--out", str(out))
    assert again.returncode == 2 and "exists" in again.stderr
    assert out.read_text() == written  # nothing overwritten
