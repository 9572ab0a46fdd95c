"""The whole path with every real part: the server, a real Mosquitto, and three ``edge-agent``
OS processes (separate state directories, different profiles), enrolled through the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from fleet_server.client import ApiClient
from fleet_server.server import EmbeddedStack
from fleet_server.settings import Settings
from hil.rig import LocalAgent, roll_out, wait_until

pytestmark = pytest.mark.slow

PROFILES = ["x86-64-avx2", "raspberry-pi-4", "jetson-orin-nano"]


def _start_agents(
    api: ApiClient, stack: EmbeddedStack, root: Path, fleet: list[tuple[str, str]]
) -> list[LocalAgent]:
    agents = []
    for device_id, profile in fleet:
        token = api.post("/v1/enrollment-tokens", json={"profile": profile})["token"]
        agent = LocalAgent(root, device_id, profile)
        agent.enroll(stack.url, token, {"ring": "e2e"})
        agent.start()
        agents.append(agent)
    for agent in agents:
        agent.wait_ready()
    return agents


def test_three_agents_serve_what_onnxruntime_computes(
    stack: EmbeddedStack,
    api: ApiClient,
    model_path: Path,
    model_v2_path: Path,
    tmp_path: Path,
    uid: str,
) -> None:
    fleet = [(f"e2e-{i}-{uid}", profile) for i, profile in enumerate(PROFILES)]
    api.upload_model(model_path, "classifier", "1.0.0")
    api.upload_model(model_v2_path, "classifier", "1.1.0")
    agents = _start_agents(api, stack, tmp_path / "devices", fleet)
    try:
        rollout = api.post(
            "/v1/rollouts",
            json={"model": "classifier", "version": "1.0.0", "selector": {"ring": "e2e"}},
        )
        for agent in agents:
            agent.wait_serving("classifier", "1.0.0")
        x = np.random.default_rng(11).standard_normal((16, 16)).astype(np.float32)
        want = ort.InferenceSession(str(model_path)).run(None, {"x": x})[0]
        for agent in agents:
            got = agent.client.predict("classifier", {"x": x})["probs"]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        done = wait_until(
            lambda: (r := api.get(f"/v1/rollouts/{rollout['id']}"))["state"] == "completed" and r,
            30,
            "the rollout to be reported complete",
        )
        assert done["counts"]["serving"] == 3
        devices = {d["id"]: d for d in api.get("/v1/devices")}
        for device_id, _ in fleet:
            assert devices[device_id]["online"]
            assert devices[device_id]["reported"]["slots"]["classifier"]["state"] == "COMMITTED"

        # A second version replaces the first on every device.
        api.post(
            "/v1/rollouts",
            json={"model": "classifier", "version": "1.1.0", "selector": {"ring": "e2e"}},
        )
        want2 = ort.InferenceSession(str(model_v2_path)).run(None, {"x": x})[0]
        for agent in agents:
            agent.wait_serving("classifier", "1.1.0")
            np.testing.assert_allclose(
                agent.client.predict("classifier", {"x": x})["probs"], want2, rtol=1e-5, atol=1e-6
            )
    finally:
        for agent in agents:
            agent.stop()


def test_agent_offline_during_rollout_catches_up_on_reconnect(
    stack: EmbeddedStack, api: ApiClient, model_path: Path, tmp_path: Path, uid: str
) -> None:
    api.upload_model(model_path, "classifier", "1.0.0")
    [agent] = _start_agents(api, stack, tmp_path / "devices", [(f"late-{uid}", "x86-64-avx2")])
    agent.stop()
    try:
        api.post(
            "/v1/rollouts",
            json={"model": "classifier", "version": "1.0.0", "devices": [f"late-{uid}"]},
        )
        agent.start()
        agent.wait_serving("classifier", "1.0.0")
    finally:
        agent.stop()


def test_restarted_agent_serves_again_without_server_or_broker(
    model_path: Path, tmp_path: Path
) -> None:
    # A private stack with its own broker, so both can be taken away.
    settings = Settings(data_dir=tmp_path / "server", port=0, broker_port=0)
    stack = EmbeddedStack(settings).start()
    agent = None
    try:
        api = ApiClient(stack.url, stack.admin_token)
        api.upload_model(model_path, "classifier", "1.0.0")
        [agent] = _start_agents(api, stack, tmp_path / "devices", [("e2e-restart", "x86-64-avx2")])
        rollout = api.post(
            "/v1/rollouts",
            json={"model": "classifier", "version": "1.0.0", "devices": ["e2e-restart"]},
        )
        agent.wait_serving("classifier", "1.0.0")
        # Committed, not merely on probation (a crash on probation rolls back).
        wait_until(
            lambda: api.get(f"/v1/rollouts/{rollout['id']}")["state"] == "completed",
            30,
            "the version to pass probation",
        )
    finally:
        stack.stop()
    assert agent is not None
    try:
        agent.kill()  # kill -9: no clean shutdown
        agent.start()
        agent.wait_serving("classifier", "1.0.0", timeout_s=30)
        x = np.ones((2, 16), np.float32)
        want = ort.InferenceSession(str(model_path)).run(None, {"x": x})[0]
        np.testing.assert_allclose(
            agent.client.predict("classifier", {"x": x})["probs"], want, rtol=1e-5
        )
    finally:
        agent.stop()


def test_bad_versions_are_rolled_back_by_the_agent_and_reported(
    stack: EmbeddedStack, api: ApiClient, model_path: Path, tmp_path: Path, uid: str
) -> None:
    """A version that emits NaN and one that is far slower: each passes upload, build and
    self-test, gets switched in, fails probation on the device, and the prior version serves
    again. The server learns why, with the figures."""
    from converters.onnx.samples import nan_classifier, slow_classifier

    api.upload_model(model_path, "classifier", "1.0.0")
    api.upload_model(nan_classifier(tmp_path / "nan.onnx"), "classifier", "1.1.0")
    api.upload_model(slow_classifier(tmp_path / "slow.onnx", seed=3), "classifier", "1.2.0")
    device = f"bad-{uid}"
    [agent] = _start_agents(api, stack, tmp_path / "devices", [(device, "x86-64-avx2")])
    try:
        assert roll_out(api, "classifier", "1.0.0", [device])["state"] == "completed"
        for version, reason in (("1.1.0", "nonfinite_outputs"), ("1.2.0", "latency_regression")):
            done = roll_out(api, "classifier", version, [device])
            target = done["targets"][0]
            assert done["state"] == "failed" and done["counts"]["rolled_back"] == 1, (
                version,
                target,
            )
            assert target["state"] == "rolled_back" and target["error"]["reason"] == reason, target
            assert (agent.serving("classifier") or {})["version"] == "1.0.0"
            reported = api.get(f"/v1/devices/{device}")["reported"]
            transition = reported["last_transition"]
            assert transition["to_state"] == "ROLLED_BACK" and transition["reason"] == reason
        x = np.ones((1, 16), np.float32)
        assert np.isfinite(agent.client.predict("classifier", {"x": x})["probs"]).all()
    finally:
        agent.stop()


# What is tested is the agent's swap; the server's database only records the rollouts, so
# this minute of saturated cores runs once, on SQLite (the rollout tests cover PostgreSQL).
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_twenty_swaps_under_load_drop_no_request(
    stack: EmbeddedStack,
    api: ApiClient,
    model_path: Path,
    model_v2_path: Path,
    tmp_path: Path,
    uid: str,
) -> None:
    """Clients send requests back to back, over HTTP and the Unix socket, while the agent
    swaps between two versions 20 times. Every request succeeds; both versions answer."""
    import threading

    from edge_agent.serving.client import AgentClient

    api.upload_model(model_path, "classifier", "1.0.0")
    api.upload_model(model_v2_path, "classifier", "2.0.0")
    device = f"load-{uid}"
    token = api.post("/v1/enrollment-tokens", json={})["token"]
    # The clients saturate this 2-core machine, which makes p95 latency too noisy for the
    # probation's latency check; what is tested here is the swap itself.
    agent = LocalAgent(
        tmp_path / "devices",
        device,
        "x86-64-avx2",
        probation_window_s=0.1,
        probation="max_latency_ratio = 100.0\n",
    )
    agent.enroll(stack.url, token)
    agent.start()
    try:
        agent.wait_ready()
        assert roll_out(api, "classifier", "1.0.0", [device])["state"] == "completed"
        x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
        want = {
            v: ort.InferenceSession(str(p)).run(None, {"x": x})[0]
            for v, p in (("1.0.0", model_path), ("2.0.0", model_v2_path))
        }
        stop = threading.Event()
        results: dict[str, list[str]] = {"http": [], "unix": []}
        failures: list[str] = []

        def load(kind: str, url: str) -> None:
            client = AgentClient(url, timeout_s=10)
            while not stop.is_set():
                try:
                    got = client.predict("classifier", {"x": x})["probs"]
                except Exception as e:
                    failures.append(f"{kind}: {e!r}")
                    continue
                version = next((v for v, w in want.items() if np.allclose(got, w, atol=1e-5)), "?")
                results[kind].append(version)

        threads = [
            threading.Thread(target=load, args=("http", f"http://127.0.0.1:{agent.serving_port}")),
            threading.Thread(target=load, args=("unix", f"unix://{agent.socket_path}")),
        ]
        for t in threads:
            t.start()
        for i in range(20):
            version = "2.0.0" if i % 2 == 0 else "1.0.0"
            done = roll_out(api, "classifier", version, [device])
            assert done["state"] == "completed", (i, done["targets"])
        stop.set()
        for t in threads:
            t.join(10)
        assert failures == []
        for kind, versions in results.items():
            assert len(versions) > 100, kind
            assert "?" not in versions, f"{kind}: an answer matched neither version"
            assert {"1.0.0", "2.0.0"} <= set(versions), kind
        slot = api.get(f"/v1/devices/{device}")["reported"]["slots"]["classifier"]
        assert slot["state"] == "COMMITTED" and slot["active"]["version"] == "1.0.0"
    finally:
        agent.stop()


def test_shadow_rollout_reports_agreement_to_the_server(
    stack: EmbeddedStack,
    api: ApiClient,
    model_path: Path,
    model_v2_path: Path,
    tmp_path: Path,
    uid: str,
) -> None:
    api.upload_model(model_path, "classifier", "1.0.0")
    api.upload_model(model_v2_path, "classifier", "2.0.0")
    device = f"shadow-{uid}"
    token = api.post("/v1/enrollment-tokens", json={})["token"]
    agent = LocalAgent(tmp_path / "devices", device, "x86-64-avx2")
    agent.enroll(stack.url, token)
    agent.configure("[reporting]\nstatus_interval_s = 0.3\n")
    agent.start()
    try:
        agent.wait_ready()
        assert roll_out(api, "classifier", "1.0.0", [device])["state"] == "completed"
        shadow = roll_out(
            api, "classifier", "2.0.0", [device], shadow_of="classifier", sample_rate=1.0
        )
        assert shadow["slot"] == "classifier-shadow" and shadow["state"] == "completed"
        x = np.random.default_rng(5).standard_normal((4, 16)).astype(np.float32)
        want = ort.InferenceSession(str(model_path)).run(None, {"x": x})[0]
        for _ in range(20):
            np.testing.assert_allclose(
                agent.client.predict("classifier", {"x": x})["probs"], want, rtol=1e-5
            )

        def shadow_figures() -> dict | None:  # type: ignore[type-arg]
            slots = (api.get(f"/v1/devices/{device}")["reported"] or {}).get("slots", {})
            report = (slots.get("classifier-shadow") or {}).get("shadow") or {}
            return report if report.get("samples", 0) >= 20 else None

        report = wait_until(shadow_figures, 15, "shadow figures at the server")
        assert report["of"] == "classifier" and report["version"] == "2.0.0"
        assert 0.0 <= report["top1_agreement"] <= 1.0 and report["shadow_p50_ms"] > 0
    finally:
        agent.stop()
