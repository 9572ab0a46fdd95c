"""Model health with real agents on a real broker: a silently wrong version stops at its
canary on the prediction gate, an honest retrain passes; labels from the field give the server
the exact online accuracy through an agent's kill -9 and a server restart; labels drive an
A/B verdict."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from converters.onnx.samples import mlp_classifier
from fleet_server.broker import EmbeddedBroker, free_port
from fleet_server.client import ApiClient
from fleet_server.demo.agents import LocalAgent
from fleet_server.server import EmbeddedStack
from fleet_server.settings import Settings
from hil.devices.local import LATENCY_SLACK_MS
from hil.rig import wait_until
from tests.integration.test_cli import edgefleet
from tests.integration.test_rollouts import (
    all_at_once,
    follow,
    kinds,
    normal,
    start_fleet,
    traffic,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("health-models")
    return {
        "1.0.0": mlp_classifier(d / "v1.onnx", seed=3),
        # An honest retrain: ~3 % of top-1 decisions change.
        "1.1.0": mlp_classifier(d / "v11.onnx", seed=3, retrain=0.05),
        # Loads, is fast, answers every request with finite scores: always class 0.
        "2.0.0": mlp_classifier(d / "v2.onnx", seed=3, answer=0),
    }


def gate(figures: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(g for g in figures if g["gate"] == name)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_one_class_model_stops_at_its_canary_and_a_retrain_passes(
    stack: EmbeddedStack, api: ApiClient, versions: dict[str, Path], tmp_path: Path, uid: str
) -> None:
    for version, path in versions.items():
        api.upload_model(path, "classifier", version)
    fleet = [(f"ph-{i}-{uid}", "x86-64-avx2", {"ring": uid}) for i in range(4)]
    # Four agents and a server on one machine: a sub-millisecond p95 can triple for no reason
    # of the model's own (1.69 ms against 0.33 here). This test is about the server's health
    # gates, not the agent's latency probation: the HIL rigs' slack.
    probation = f"latency_slack_ms = {LATENCY_SLACK_MS}\n"
    agents = start_fleet(api, stack, tmp_path / "devices", fleet, probation=probation)
    canary = {"model": "classifier", "selector": f"ring={uid}", "strategy": "canary",
              "stages": [25, 100], "bake_s": 2}  # fmt: skip
    try:
        all_at_once(api, "1.0.0", f"ring={uid}")
        with traffic(agents, normal):
            # No gates named: the prediction gate is on by default for a canary.
            retrain = follow(
                api, api.post("/v1/rollouts", json={**canary, "version": "1.1.0"})["id"]
            )
            assert retrain["state"] == "completed", json.dumps(retrain["events"], indent=1)
            passed = next(e for e in retrain["events"] if e["kind"] == "promoted")
            shift = gate(passed["figures"]["gates"], "max_prediction_shift")
            assert shift["ok"] is True and shift["value"] < 0.25, shift
            assert shift["data"]["previous_version"] == "1.0.0"

            bad = follow(api, api.post("/v1/rollouts", json={**canary, "version": "2.0.0"})["id"])
        assert bad["state"] == "aborted", json.dumps(bad["events"], indent=1)
        breach = next(e for e in bad["events"] if e["kind"] == "gate_breach")
        assert breach["stage"] == 0  # the canary: one device of four
        [figure] = breach["figures"]["breached"]
        assert figure["gate"] == "max_prediction_shift" and figure["value"] > 1, figure
        # Status shows both distributions: the candidate answers class 0 only.
        assert figure["data"]["candidate"] == [1.0, 0.0, 0.0, 0.0], figure
        assert figure["data"]["previous_version"] == "1.1.0"
        assert "promoted" not in kinds(bad)
        # What an operator reads: both distributions beside the breached gate.
        shown = edgefleet(stack, "rollouts", "status", bad["id"])
        assert shown.returncode == 0, shown.stderr
        print(shown.stdout)
        assert "BREACH" in shown.stdout and "prediction shift: probs (top1)" in shown.stdout
        assert "previous 1.1.0" in shown.stdout and "candidate" in shown.stdout
        for agent in agents:
            agent.wait_serving("classifier", "1.1.0", timeout_s=30)
    finally:
        for agent in agents:
            agent.stop()


def _label(answer: int, i: int) -> int:
    """The truth the test's application learns later: the model is right 3 times in 4."""
    return answer if i % 4 else (answer + 1) % 4


def _predict_many(agent: LocalAgent, n: int, seed: int) -> list[tuple[str, int]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        probs = agent.client.predict("classifier", {"x": normal(rng)})["probs"]
        rid = agent.client.last_request_id
        assert rid is not None
        out.append((rid, int(probs.argmax())))
    return out


def test_labels_give_the_exact_online_accuracy_through_kill_9_and_a_server_restart(
    versions: dict[str, Path], tmp_path: Path, uid: str
) -> None:
    broker = EmbeddedBroker(tmp_path / "broker", port=free_port(), backend="mosquitto").start()
    settings = Settings(data_dir=tmp_path / "server", port=free_port(), mqtt_url=broker.url)
    stack = EmbeddedStack(settings).start()
    api = ApiClient(stack.url, stack.admin_token)
    agent = LocalAgent(tmp_path / "devices", f"acc-{uid}", "x86-64-avx2")
    try:
        api.upload_model(versions["1.0.0"], "classifier", "1.0.0")
        token = api.post("/v1/enrollment-tokens", json={"profile": "x86-64-avx2"})["token"]
        agent.enroll(stack.url, token, {"ring": uid})
        # Long intervals: at the kill -9 the labels are in the outbox's draft, not yet sent.
        agent.configure("[telemetry]\ninterval_s = 30\ncheckpoint_s = 5\n")
        agent.start()
        agent.wait_ready()
        all_at_once(api, "1.0.0", f"ring={uid}")

        before = _predict_many(agent, 600, seed=1)
        expected_correct = 0
        for start in range(0, 500, 100):
            chunk = [(rid, _label(a, start + i)) for i, (rid, a) in
                     enumerate(before[start:start + 100])]  # fmt: skip
            answer = agent.client.feedback("classifier", list(chunk))
            assert answer["accepted"] == 100 and answer["late"] == 0
            expected_correct += answer["correct"]
        assert expected_correct == 375  # 3 in 4 of the first 500

        agent.kill()  # the kept predictions go with the process; the counted labels do not
        stack.stop()
        api.close()
        stack = EmbeddedStack(settings).start()
        api = ApiClient(stack.url, stack.admin_token)
        agent.start()
        agent.wait_ready()

        after = _predict_many(agent, 500, seed=2)
        labels = [(rid, _label(a, i)) for i, (rid, a) in enumerate(after)]
        # Labels for answers given before the kill: their predictions are gone: late.
        late = [(rid, a) for rid, a in before[500:600]]
        threads = [
            threading.Thread(target=agent.client.feedback, args=("classifier", part))
            for part in (labels[:250], labels[250:], late)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        agent.stop()  # closes the interval into a batch and sends it

        def rolled_up() -> dict[str, Any] | None:
            rows = api.get("/v1/telemetry/models/classifier", params={"version": "1.0.0"})
            return rows[0] if rows and rows[0]["labelled"] + rows[0]["late"] >= 1100 else None

        agent.start()  # sends what the stop could not
        row = wait_until(rolled_up, 60, "every label to reach the server")
        assert (row["labelled"], row["correct"], row["late"]) == (1000, 750, 100), row
        assert row["accuracy"] == pytest.approx(0.75)
        metrics = api.text("/metrics")
        series = 'model="classifier",profile="x86-64-avx2",version="1.0.0"'
        assert f"edgefleet_feedback_labelled_total{{{series}}} 1000.0" in metrics
        assert f"edgefleet_feedback_correct_total{{{series}}} 750.0" in metrics
        assert f"edgefleet_feedback_late_total{{{series}}} 100.0" in metrics
        assert f"edgefleet_online_accuracy{{{series}}} 0.75" in metrics
    finally:
        agent.stop()
        api.close()
        stack.stop()
        broker.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_labels_decide_an_ab_test(
    stack: EmbeddedStack, api: ApiClient, versions: dict[str, Path], tmp_path: Path, uid: str
) -> None:
    """Arm B (1.1.0) is right on every labelled request, arm A (1.0.0) on half: with error
    rate and latency alike, the labels make B the winner."""
    api.upload_model(versions["1.0.0"], "classifier", "1.0.0")
    api.upload_model(versions["1.1.0"], "classifier", "1.1.0")
    fleet = [(f"abl-{i}-{uid}", "x86-64-avx2", {"ring": uid}) for i in range(2)]
    agents = start_fleet(api, stack, tmp_path / "devices", fleet)
    try:
        all_at_once(api, "1.0.0", f"ring={uid}")
        rollout = api.post(
            "/v1/rollouts",
            json={"model": "classifier", "version": "1.1.0", "selector": f"ring={uid}",
                  "strategy": "ab", "split_pct": 50, "bake_s": 6, "min_confidence": 0.9999,
                  "gates": {"max_prediction_shift": None}},
        )  # fmt: skip

        def split() -> bool:
            r = api.get(f"/v1/rollouts/{rollout['id']}")
            return bool(r["counts"].get("serving", 0) >= 1)

        wait_until(split, 60, "arm B to serve")
        for i, agent in enumerate(agents):
            version = agent.serving("classifier")
            assert version is not None
            answers = _predict_many(agent, 200, seed=10 + i)
            on_b = version["version"] == "1.1.0"
            labels = [(rid, a if on_b or k % 2 else (a + 1) % 4) for k, (rid, a) in
                      enumerate(answers)]  # fmt: skip
            agent.client.feedback("classifier", list(labels))
        done = follow(api, rollout["id"], timeout_s=90)
        verdict = next(e for e in done["events"] if e["kind"] == "ab_verdict")["figures"]
        accuracy = verdict["verdict"]["comparison"]["accuracy"]
        assert accuracy["better"] == "b" and accuracy["confidence"] >= 0.9999, verdict
        assert verdict["verdict"]["b"]["accuracy"] == 1.0
        assert verdict["verdict"]["a"]["accuracy"] == pytest.approx(0.5)
        assert verdict["verdict"]["winner"] == "b", verdict
    finally:
        for agent in agents:
            agent.stop()
