"""Fault injection against real agent processes: the agent is SIGKILLed (no clean-up, like a
power cut) at each lifecycle state, inside a journal write, and in the middle of a download.
After a restart it serves a committed version within seconds, its journal is consistent, and
it either finishes the deployment (the download resuming where it stopped) or, when it died
while the new version was on probation, stays on the prior version."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from converters.onnx.samples import mlp_classifier
from edge_agent.contracts.failpoints import ENV
from edge_agent.lifecycle.journal import Journal
from fleet_server.client import ApiClient
from fleet_server.server import EmbeddedStack
from fleet_server.settings import Settings
from hil.rig import LocalAgent, roll_out, wait_until

pytestmark = pytest.mark.slow


@dataclass
class Fleet:
    stack: EmbeddedStack
    api: ApiClient
    root: Path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("crash")
    settings = Settings(
        data_dir=root / "server", port=0, broker_port=0, desired_resend_interval_s=0.2
    )
    with EmbeddedStack(settings) as stack:
        api = ApiClient(stack.url, stack.admin_token)
        api.upload_model(model_path, "classifier", "1.0.0")
        # A bigger v2 (~170 kB bundle), so a download spans several chunks.
        big = mlp_classifier(root / "v2.onnx", hidden=2048, seed=5)
        api.upload_model(big, "classifier", "2.0.0")
        yield Fleet(stack, api, root)


def _journal(agent: LocalAgent) -> dict:  # type: ignore[type-arg]
    path = agent.dir / "state" / "journal.json"
    json.loads(path.read_text())  # whole and parseable, never torn
    return Journal(path, owner=False).data.to_dict()


CASES = [
    ("lifecycle.DOWNLOADING=1", "COMMITTED"),
    ("lifecycle.VERIFYING=1", "COMMITTED"),
    ("lifecycle.STAGING=1", "COMMITTED"),
    ("lifecycle.SWITCHING=1", "COMMITTED"),
    ("lifecycle.PROBATION=1", "ROLLED_BACK"),
    ("write.journal.json=3", "COMMITTED"),  # inside the 3rd journal write of the deployment
    ("download.chunk=3", "COMMITTED"),
]


@pytest.mark.parametrize(("failpoint", "outcome"), CASES, ids=[c[0] for c in CASES])
def test_kill_9_then_restart(fleet: Fleet, failpoint: str, outcome: str, uid: str) -> None:
    device = f"crash-{uid}"
    api = fleet.api
    token = api.post("/v1/enrollment-tokens", json={})["token"]
    agent = LocalAgent(fleet.root / "devices", device, "x86-64-avx2", probation_window_s=1.0)
    agent.enroll(fleet.stack.url, token)
    agent.start()
    try:
        agent.wait_ready()
        assert roll_out(api, "classifier", "1.0.0", [device])["state"] == "completed"
        agent.stop()

        agent.start(env={ENV: failpoint})
        agent.wait_ready()
        api.post(
            "/v1/rollouts", json={"model": "classifier", "version": "2.0.0", "devices": [device]}
        )
        proc = agent.process
        assert proc is not None
        code = proc.wait(timeout=60)
        assert code == -9, f"agent exited {code}, not killed at {failpoint}:\n{agent.log_tail()}"
        agent.process = None
        _journal(agent)

        agent.start()  # no failpoint: a normal boot after the crash
        agent.wait_ready(timeout_s=15)
        served = agent.serving("classifier")
        assert served is not None and served["version"] in ("1.0.0", "2.0.0")

        def settled() -> str | None:
            slot = _journal(agent)["slots"]["classifier"]
            state, error = slot["state"], slot.get("error") or {}
            if state == "COMMITTED":
                return state if slot["committed"]["version"] == "2.0.0" else None
            if state == "FAILED" and error.get("retryable"):
                return None  # interrupted: the redelivered document restarts it
            return state if state in ("ROLLED_BACK", "FAILED") else None

        final = wait_until(settled, 60, f"the deployment to settle after {failpoint}")
        assert final == outcome, agent.log_tail()
        slot = _journal(agent)["slots"]["classifier"]
        if outcome == "COMMITTED":
            assert agent.wait_serving("classifier", "2.0.0")
            assert slot["previous"]["version"] == "1.0.0"
        else:
            assert (agent.serving("classifier") or {})["version"] == "1.0.0"
            assert slot["committed"]["version"] == "1.0.0"
            assert slot["error"]["reason"] == "interrupted_in_probation"
        if failpoint.startswith("download."):
            assert "resuming download at" in agent.log_path.read_text()
        # Only what the journal names is on disk.
        kept = {p.name for p in (agent.dir / "state" / "models").iterdir()}
        named = {v["bundle_sha256"] for v in (slot["committed"], slot["previous"]) if v}
        assert kept <= named | ({slot["target"]["bundle_sha256"]} if slot.get("target") else set())
    finally:
        agent.stop()
