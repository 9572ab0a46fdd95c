"""Every ``edgefleet`` command group, run as a user runs it (a subprocess): 0 when it worked,
1 when the operation failed (one line on stderr, server text verbatim — brackets included),
2 for a usage error; and ``--json`` on the commands that report something."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fleet_server.client import ApiClient
from fleet_server.server import EmbeddedStack
from tests.integration.test_cli import edgefleet

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)]


def _one_line_failure(r: object, needle: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)  # type: ignore[attr-defined]
    err = r.stderr.strip()  # type: ignore[attr-defined]
    assert err.count("\n") == 0 and needle in err, err


def test_each_command_group_exits_0_1_2(
    stack: EmbeddedStack, api: ApiClient, model_path: Path, tmp_path: Path
) -> None:
    calibration = tmp_path / "cal.npz"
    np.savez(calibration, x=np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32))
    api.upload_model(model_path, "classifier", "1.0.0", calibration=calibration)

    # builds: a build that fails its parity gate exits 1 (it used to print the failure, exit 0).
    r = edgefleet(
        stack, "builds", "create", "classifier", "1.0.0", "--profile", "x86-64-avx2",
        "--precision", "int8", "--threshold", "max_rel_l2=1e-9",
    )  # fmt: skip
    assert r.returncode == 1 and "max_rel_l2" in r.stdout + r.stderr, (r.stdout, r.stderr)
    r = edgefleet(stack, "builds", "create", "classifier", "1.0.0")
    assert r.returncode == 2 and "--profile" in r.stderr
    # Server text keeps its brackets (rich markup used to delete "['tpu']").
    r = edgefleet(
        stack,
        "builds",
        "create",
        "classifier",
        "1.0.0",
        "--profile",
        "x86-64-avx2",
        "--runtime",
        "tpu",
    )
    _one_line_failure(r, "['tpu']")

    # rollouts: a rollout whose build fails exits 1.
    api.post("/v1/enrollment-tokens", json={})
    r = edgefleet(
        stack,
        "rollouts",
        "create",
        "--model",
        "classifier",
        "--version",
        "9.9.9",
        "--device",
        "nobody",
    )
    _one_line_failure(r, "9.9.9")
    r = edgefleet(stack, "rollouts", "status")
    assert r.returncode == 2

    # models / devices / tokens / audit / keys / bundle / toolchain
    _one_line_failure(edgefleet(stack, "models", "show", "no-such-model"), "no-such-model")
    assert edgefleet(stack, "models", "push").returncode == 2
    _one_line_failure(edgefleet(stack, "devices", "show", "no-such-device"), "no-such-device")
    assert edgefleet(stack, "devices", "show").returncode == 2
    _one_line_failure(edgefleet(stack, "tokens", "revoke", "999999"), "999999")
    assert edgefleet(stack, "tokens", "revoke", "not-a-number").returncode == 2
    assert edgefleet(stack, "audit", "--limit", "0").returncode == 1
    assert edgefleet(stack, "keys", "revoke").returncode == 2
    missing = tmp_path / "absent.efb"
    assert edgefleet(stack, "bundle", "verify", str(missing)).returncode == 2
    garbage = tmp_path / "garbage.efb"
    garbage.write_bytes(b"not a tar at all")
    _one_line_failure(edgefleet(stack, "bundle", "inspect", str(garbage)), "not a bundle")
    assert edgefleet(stack, "toolchain", "install").returncode == 2
    _one_line_failure(edgefleet(stack, "toolchain", "install", "nope"), "nope")


def test_reporting_commands_take_json(
    stack: EmbeddedStack, api: ApiClient, model_path: Path
) -> None:
    api.upload_model(model_path, "classifier", "1.0.0")
    build = api.post(
        "/v1/builds", json={"model": "classifier", "version": "1.0.0", "profile": "x86-64-avx2"}
    )
    token = api.post("/v1/tokens", json={"name": "ci", "role": "viewer"})
    for args in (
        ("models", "list"),
        ("models", "show", "classifier"),
        ("devices", "list"),
        ("builds", "list"),
        ("builds", "show", build["id"]),
        ("builds", "logs", build["id"]),
        ("rollouts", "list"),
        ("tokens", "list"),
        ("tokens", "revoke", str(token["id"])),
        ("audit",),
        ("keys", "list"),
        ("keys", "export-trust"),
        ("toolchain", "list"),
    ):
        r = edgefleet(stack, *args, "--json")
        assert r.returncode == 0, (args, r.stderr)
        json.loads(r.stdout)
