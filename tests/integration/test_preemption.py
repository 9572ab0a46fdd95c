"""A newer desired state preempts probation: with a 60 s probation window, a rollout of a newer
version, and then a fleet rollback to the committed one, each take effect within seconds on a
real agent process, not at the end of the window."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from fleet_server.client import ApiClient, ApiError
from fleet_server.server import EmbeddedStack
from hil.rig import LocalAgent, roll_out, wait_until

pytestmark = pytest.mark.slow

WINDOW_S = 60.0


def _slot(agent: LocalAgent) -> dict[str, Any]:
    journal = json.loads((agent.dir / "state" / "journal.json").read_text())
    slot: dict[str, Any] = journal["slots"]["classifier"]
    return slot


def _in_probation(agent: LocalAgent, version: str) -> bool:
    served = agent.serving("classifier")
    return bool(served and served["version"] == version and _slot(agent)["state"] == "PROBATION")


def _timed_switch(api: ApiClient, agent: LocalAgent, version: str, supersedes: str) -> float:
    """Roll ``version`` out while another is on probation, superseding its rollout (an
    overlapping rollout on the slot is refused otherwise); seconds until it answers."""
    start = time.monotonic()
    api.post(
        "/v1/rollouts",
        json={
            "model": "classifier",
            "version": version,
            "devices": [agent.device_id],
            "supersedes": supersedes,
        },
    )
    agent.wait_serving("classifier", version, timeout_s=WINDOW_S / 2)
    return time.monotonic() - start


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_newer_document_ends_probation_at_once(
    stack: EmbeddedStack,
    api: ApiClient,
    model_path: Path,
    model_v2_path: Path,
    tmp_path: Path,
    uid: str,
) -> None:
    api.upload_model(model_path, "classifier", "1.0.0")
    api.upload_model(model_v2_path, "classifier", "2.0.0")
    api.upload_model(model_path, "classifier", "3.0.0")
    token = api.post("/v1/enrollment-tokens", json={"profile": "x86-64-avx2"})["token"]
    agent = LocalAgent(tmp_path / "devices", f"preempt-{uid}", "x86-64-avx2")
    agent.enroll(stack.url, token)
    agent.start()
    try:
        agent.wait_ready()
        first = roll_out(api, "classifier", "1.0.0", [agent.device_id])
        assert first["state"] == "completed", first
        # From now on a new version stays on probation for a minute.
        agent.stop()
        text = re.sub(r"(?m)^window_s = .*$", f"window_s = {WINDOW_S}", agent.config.read_text())
        agent.config.write_text(
            re.sub(r"(?m)^probe_interval_s = .*$", "probe_interval_s = 5", text)
        )
        agent.start()
        agent.wait_ready()

        second = api.post(
            "/v1/rollouts",
            json={"model": "classifier", "version": "2.0.0", "devices": [agent.device_id]},
        )
        wait_until(lambda: _in_probation(agent, "2.0.0"), 30, "2.0.0 on probation")

        # A second rollout on the slot while 2.0.0's is active is refused unless it says it
        # supersedes it; nothing changes.
        with pytest.raises(ApiError) as refused:
            api.post(
                "/v1/rollouts",
                json={"model": "classifier", "version": "3.0.0", "devices": [agent.device_id]},
            )
        assert refused.value.reason == "overlapping_rollout" and second["id"] in str(refused.value)

        # A newer version takes over: 2.0.0's probation ends, 3.0.0 proceeds.
        newer_s = _timed_switch(api, agent, "3.0.0", supersedes=second["id"])
        assert api.get(f"/v1/rollouts/{second['id']}")["state"] == "superseded"
        third = max(api.get("/v1/rollouts"), key=lambda r: r["created_at"])
        wait_until(lambda: _in_probation(agent, "3.0.0"), 30, "3.0.0 on probation")

        # A fleet rollback: a newer document naming the committed version. The prior serves
        # again, and the slot says why it left 3.0.0.
        rollback_s = _timed_switch(api, agent, "1.0.0", supersedes=third["id"])
        slot = wait_until(
            lambda: (s := _slot(agent))["state"] == "ROLLED_BACK" and s, 10, "the rollback"
        )
        assert slot["committed"]["version"] == "1.0.0"
        assert slot["error"]["reason"] == "superseded" and slot["error"]["retryable"]
        log = agent.log_path.read_text()
        assert log.count("supersedes the deployment under way") == 2, agent.log_tail()
        # Both took effect long before the 60 s window could have ended.
        assert newer_s < WINDOW_S / 4 and rollback_s < WINDOW_S / 4, (newer_s, rollback_s)
        print(f"newer version answering after {newer_s:.2f} s, rollback after {rollback_s:.2f} s")

        # The rollback's rollout is complete: the device serves its committed version.
        rollouts = [r for r in api.get("/v1/rollouts") if r["version"] == "1.0.0"]
        latest = max(rollouts, key=lambda r: r["created_at"])
        done = wait_until(
            lambda: (r := api.get(f"/v1/rollouts/{latest['id']}"))["state"] == "completed" and r,
            15,
            "the rollback rollout to complete",
        )
        assert done["counts"]["serving"] == 1
    finally:
        agent.stop()
