"""``edgefleet demo`` as a user runs it (a subprocess, the README's command), checked from
outside: its exit status, what it prints, and what its server's database says happened."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_the_demo_tells_the_whole_story(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "160", "PATH": os.environ["PATH"] + ":/usr/sbin"}
    done = subprocess.run(
        [sys.executable, "-c", "from fleet_server.cli import main; main()", "demo",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out[-6000:] + done.stderr[-3000:]
    assert "1.1.0 serving on 6 of 6 devices" in out
    assert "1.2.0 stopped at its first stage by the prediction-shift gate" in out
    assert "failed: 0;" in out  # no request dropped while versions were swapped
    assert "TensorRT absent here: ONNX Runtime fallback" in out
    assert "/ui" in out and "input drift above 0.25: raspberry-pi-5" in out

    db = sqlite3.connect(tmp_path / "server" / "edgefleet.db")
    rollouts = [
        (rid, version, json.loads(plan)["strategy"], state, stage)
        for rid, version, plan, state, stage in db.execute(
            "SELECT r.id, v.version, r.plan, r.state, r.stage FROM rollouts r "
            "JOIN model_versions v ON v.id = r.model_version_id ORDER BY r.created_at"
        )
    ]
    assert [(v, s, st) for _, v, s, st, _ in rollouts] == [
        ("1.0.0", "all_at_once", "completed"),
        ("1.1.0", "canary", "completed"),
        ("1.2.0", "canary", "aborted"),
    ]
    bad_id, bad_stage = rollouts[2][0], rollouts[2][4]
    assert bad_stage == 0  # stopped at the canary stage
    breaches = [m for (m,) in db.execute(
        "SELECT message FROM rollout_events WHERE rollout_id = ? AND kind = 'gate_breach'",
        (bad_id,),
    )]  # fmt: skip
    assert len(breaches) == 1 and "max_prediction_shift" in breaches[0]
    touched = db.execute(
        "SELECT COUNT(*) FROM rollout_targets WHERE rollout_id = ? AND notified_at IS NOT NULL",
        (bad_id,),
    ).fetchone()[0]
    assert touched == 1  # one device of six ever received 1.2.0
    serving: dict[str, str] = {}
    for device_id, profile, reported in db.execute("SELECT id, profile, reported FROM devices"):
        active = json.loads(reported)["slots"]["digits"]["active"]
        serving[device_id] = (
            f"{profile} {active['version']} {active['runtime']} {active['precision']}"
        )
    assert len(serving) == 6 and all(" 1.1.0 " in s for s in serving.values()), serving
    # The three profiles, each on the artifact the issue names.
    kinds = {s.split(" ", 2)[0] + " " + s.split(" ", 2)[2] for s in serving.values()}
    assert kinds == {
        "x86-64-avx2 onnxruntime int8",
        "raspberry-pi-5 litert int8",
        "jetson-orin-nano onnxruntime fp32",
    }, kinds
