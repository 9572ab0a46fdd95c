"""Fleet telemetry end to end: real agents (processes), a real broker, a real database.

Exactly-once accounting across a broker restart, a server restart and an agent ``kill -9``;
drift that raises an alert; hostile batches refused and counted; two ingest members of one
``$share/`` group storing each batch once.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlmodel import Session, func, select

from fleet_server.broker import EmbeddedBroker, free_port
from fleet_server.client import ApiClient
from fleet_server.server import EmbeddedStack
from fleet_server.settings import Settings
from fleet_server.telemetry.tables import TelemetryBatchKey
from hil.rig import LocalAgent, roll_out, wait_until
from tests.conftest import ADMIN_TOKEN
from tests.integration.test_cli import edgefleet

pytestmark = pytest.mark.slow

TELEMETRY = "[telemetry]\ninterval_s = 1\ncheckpoint_s = 0.3\nresend_after_s = 2\n"


def _total_requests(api: ApiClient, model: str) -> int:
    rows = api.get(f"/v1/telemetry/models/{model}", params={"since_s": 3600})
    return sum(int(r["requests"]) for r in rows)


def _serve(agent: LocalAgent, n: int, x: np.ndarray | None = None) -> None:
    feed = np.ones((1, 16), np.float32) if x is None else x
    for _ in range(n):
        agent.client.predict("classifier", {"x": feed})


def _agents(api: ApiClient, stack: EmbeddedStack, root: Path, uid: str, n: int) -> list[LocalAgent]:
    agents = []
    for i in range(n):
        token = api.post("/v1/enrollment-tokens", json={"profile": "x86-64-avx2"})["token"]
        agent = LocalAgent(root, f"tel-{i}-{uid}", "x86-64-avx2")
        agent.enroll(stack.url, token)
        agent.configure(TELEMETRY)
        agent.start()
        agents.append(agent)
    for agent in agents:
        agent.wait_ready()
    return agents


@pytest.fixture(params=["mosquitto", "iotcore"])
def own_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker(tmp_path / "broker", port=free_port(), backend=request.param)
    broker.start()
    yield broker
    broker.stop()


def test_every_request_is_counted_once_across_broker_server_and_agent_restarts(
    own_broker: EmbeddedBroker, tmp_path: Path, model_path: Path, uid: str
) -> None:
    settings = Settings(
        data_dir=tmp_path / "server",
        database_url=f"sqlite:///{tmp_path / 'edgefleet.db'}",
        mqtt_url=own_broker.url,
        port=free_port(),
        admin_token=ADMIN_TOKEN,  # type: ignore[arg-type]
        desired_resend_interval_s=0.2,
    )
    stack = EmbeddedStack(settings).start()
    api = ApiClient(stack.url, ADMIN_TOKEN)
    agents: list[LocalAgent] = []
    try:
        api.upload_model(model_path, "classifier", "1.0.0")
        agents = _agents(api, stack, tmp_path / "devices", uid, 2)
        done = roll_out(api, "classifier", "1.0.0", [a.device_id for a in agents])
        assert done["state"] == "completed", done
        served = 0
        for agent in agents:
            _serve(agent, 40)
            served += 40
        wait_until(lambda: _total_requests(api, "classifier") == served, 30, "first figures")

        # The broker goes away (iotcore forgets everything), requests go on, it comes back.
        own_broker.stop()
        for agent in agents:
            _serve(agent, 25)
            served += 25
        time.sleep(1.5)
        own_broker.start()

        # The server goes away; batches wait in the outboxes.
        stack.stop()
        for agent in agents:
            _serve(agent, 15)
            served += 15
        time.sleep(1.5)
        stack = EmbeddedStack(settings).start()

        # kill -9 after the figures reached the outbox (checkpoint_s = 0.3 s).
        _serve(agents[0], 33)
        served += 33
        time.sleep(1.0)
        agents[0].kill()
        agents[0].start()
        agents[0].wait_ready()
        agents[0].wait_serving("classifier", "1.0.0")
        _serve(agents[0], 7)
        served += 7

        wait_until(
            lambda: _total_requests(api, "classifier") == served,
            90,
            f"the server to count {served} requests",
        )
        time.sleep(3)  # resends still in flight must not be counted twice
        assert _total_requests(api, "classifier") == served
        health = api.get("/v1/telemetry/models/classifier")[0]
        assert health["devices"] == 2 and health["errors"] == 0
        assert health["latency_ms"]["p95"] is not None
        text = api.text("/metrics")
        assert (
            f'edgefleet_inference_requests_total{{model="classifier",profile="x86-64-avx2",'
            f'version="1.0.0"}} {float(served)}' in text
        ), text
    finally:
        for agent in agents:
            agent.stop()
        api.close()
        stack.stop()


def test_a_drifted_feature_scores_high_psi_alone_and_raises_an_alert(
    stack: EmbeddedStack, api: ApiClient, model_path: Path, tmp_path: Path, uid: str
) -> None:
    rng = np.random.default_rng(0)
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, x=rng.standard_normal((2000, 1, 16)).astype(np.float32))
    # The baseline is the calibration data's: 2,000 reference rows.
    api.upload_model(model_path, "classifier", "1.0.0", calibration=calibration)
    token = api.post("/v1/enrollment-tokens", json={"profile": "x86-64-avx2"})["token"]
    agent = LocalAgent(tmp_path / "devices", f"drift-{uid}", "x86-64-avx2")
    agent.enroll(stack.url, token)
    # This tiny model answers in microseconds: a 2 % budget would sample few requests, and
    # this test wants every one counted.
    agent.configure(TELEMETRY + "min_sample_rate = 1.0\n")
    agent.start()
    agent.wait_ready()
    try:
        done = roll_out(api, "classifier", "1.0.0", [agent.device_id])
        assert done["state"] == "completed", done
        api.put("/v1/models/classifier/alert-policy", json={"max_psi": 0.25, "min_requests": 50})
        # Inputs like the reference data: low PSI everywhere.
        for _ in range(1500):
            agent.client.predict(
                "classifier", {"x": rng.standard_normal((1, 16)).astype(np.float32)}
            )
        # A request is counted before it is sampled: a batch cut between the two carries it in
        # requests and the next batch in sampled. Wait for both.
        wait_until(lambda: _total_requests(api, "classifier") >= 1500
                   and api.get("/v1/telemetry/models/classifier")[0]["sampled"] >= 1500, 30,
                   "figures")  # fmt: skip
        drift = api.get("/v1/telemetry/models/classifier")[0]["drift"]
        inputs = {d["tensor"]: d for d in drift if d["io"] == "input"}
        health = api.get("/v1/telemetry/models/classifier")[0]
        assert health["sampled"] == health["requests"] == 1500, health
        assert inputs["x"]["psi"] < 0.1, drift
        assert api.get("/v1/alerts", params={"model": "classifier"}) == []
        # Feature 5 moves by one sigma (the window holds both phases: 2 parts in 3 shifted).
        for _ in range(3000):
            x = rng.standard_normal((1, 16)).astype(np.float32)
            x[0, 5] += 1.0
            agent.client.predict("classifier", {"x": x})

        def alerted() -> list[dict[str, Any]] | None:
            found = api.get("/v1/alerts", params={"model": "classifier"})
            return [a for a in found if a["kind"] == "drift"] or None

        alerts = wait_until(alerted, 30, "a drift alert")
        assert alerts[0]["subject"] == "input:x" and alerts[0]["figures"]["group"] == 5
        assert alerts[0]["value"] > 0.25
        # The alert can come before the agent's last batches are in: the CLI reads them all.
        wait_until(lambda: _total_requests(api, "classifier") >= 4500, 30, "every request counted")
        _the_cli_reads_the_same(stack, tmp_path)
    finally:
        agent.stop()


def _the_cli_reads_the_same(stack: EmbeddedStack, tmp_path: Path) -> None:
    shown = edgefleet(stack, "telemetry", "show", "classifier", "--since", "15m")
    assert shown.returncode == 0, shown.stderr
    assert "1.0.0" in shown.stdout and "x86-64-avx2" in shown.stdout
    assert "input x[5]" in shown.stdout, shown.stdout  # the worst drift, named
    rows = json.loads(edgefleet(stack, "telemetry", "show", "classifier", "--json").stdout)
    assert rows[0]["requests"] >= 4500
    png = tmp_path / "report.png"
    plotted = edgefleet(stack, "telemetry", "plot", "classifier", "--out", str(png))
    assert plotted.returncode == 0, plotted.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    listed = json.loads(edgefleet(stack, "alerts", "list", "--json").stdout)
    assert [a["kind"] for a in listed] == ["drift"]
    policy = edgefleet(
        stack, "alerts", "policy", "classifier", "--max-psi", "0.3", "--off", "max_error_rate"
    )
    assert policy.returncode == 0 and "max_psi: 0.3" in policy.stdout
    assert "max_error_rate: off" in policy.stdout
    # Failures: one line, non-zero.
    missing = edgefleet(stack, "telemetry", "show", "no-such-model")
    assert missing.returncode == 1 and "no-such-model" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    bad = edgefleet(stack, "telemetry", "show", "classifier", "--since", "soon")
    assert bad.returncode == 2 and "duration" in bad.stderr


def _publish(url: str, messages: list[tuple[str, bytes]]) -> None:
    host, port = url.removeprefix("mqtt://").split(":")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(host, int(port))
    client.loop_start()
    for topic, payload in messages:
        client.publish(topic, payload, qos=1).wait_for_publish(5)
    client.loop_stop()
    client.disconnect()


def _batch(device: str, seq: int, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "device_id": device,
        "stream": "00112233445566ff",
        "seq": seq,
        "floor": 0,  # nothing acknowledged yet: every batch is still pending
        "interval_start": "2026-11-30T00:00:00Z",
        "interval_end": "2026-11-30T00:00:01Z",
        "slots": [],
    }
    body.update(over)
    return body


def test_hostile_batches_are_refused_counted_and_never_stored(
    stack: EmbeddedStack, api: ApiClient, uid: str
) -> None:
    device = f"hostile-{uid}"
    api.post("/v1/enrollment-tokens", json={})  # the server is up
    token = api.post("/v1/enrollment-tokens", json={"profile": "x86-64-avx2"})["token"]
    import httpx

    httpx.post(
        f"{stack.url}/v1/devices/enroll",
        json={"token": token, "device_id": device, "profile": "x86-64-avx2"},
    ).raise_for_status()
    topic = f"edgefleet/v1/devices/{device}/telemetry"
    slot = {
        "slot": "clf",
        "role": "active",
        "model": "classifier",
        "version": "1",
        "bundle_sha256": "ab" * 32,
        "requests": 1,
        "errors": 0,
        "nonfinite": 0,
    }
    hostile = [
        (topic, json.dumps(_batch(device, 10**6, floor=0)).encode()),  # from the future
        (topic, json.dumps(_batch("someone-else", 1)).encode()),  # not the topic's device
        (topic, json.dumps(_batch(device, 2, slots=[slot])).encode()),  # unknown bundle
        (topic, b"{" * 5000),
        (topic, b"x" * (300 * 1024)),
        (
            "edgefleet/v1/devices/not-enrolled-x/telemetry",
            json.dumps(_batch("not-enrolled-x", 1)).encode(),
        ),
    ]
    _publish(stack.mqtt_url, hostile)
    want = {
        "future_seq",
        "device_mismatch",
        "unknown_bundle",
        "malformed",
        "too_large",
        "unknown_device",
    }

    def counted() -> bool:
        text = api.text("/metrics")
        return all(f'edgefleet_telemetry_rejected_total{{reason="{r}"}} 1.0' in text for r in want)

    wait_until(counted, 20, "every refusal to be counted")
    state = stack._server.config.app.state.edgefleet  # type: ignore[union-attr]
    with Session(state.engine) as session:
        # Only the refused-but-acknowledged key (unknown bundle) is kept, without figures.
        keys = session.exec(select(TelemetryBatchKey)).all()
        assert [(k.device_id, k.seq, k.refused) for k in keys] == [(device, 2, "unknown_bundle")]
    assert api.get("/healthz")["status"] == "ok"


def test_two_ingest_processes_of_one_share_group_store_each_batch_once(
    settings: Settings, tmp_path: Path, uid: str
) -> None:
    """Two `edgefleet telemetry ingest` processes on one database split the batches (the
    broker hands each to one member) and together store each exactly once — resends too."""
    import os
    import signal
    import subprocess
    import sys

    from fleet_server.database import make_engine
    from fleet_server.devices.tables import Device
    from fleet_server.schema import upgrade

    engine = make_engine(settings.resolved_database_url)
    upgrade(engine)
    devices = [f"share-{i}-{uid}" for i in range(4)]
    with Session(engine) as session:
        from datetime import UTC, datetime

        for d in devices:
            session.add(
                Device(
                    id=d,
                    profile="x86-64-avx2",
                    enrolled_at=datetime.now(UTC),
                    secret_hash=uuid.uuid4().hex,
                )
            )
        session.commit()
    env = {
        **os.environ,
        "EDGEFLEET_MQTT_URL": settings.mqtt_url or "",
        "EDGEFLEET_DATABASE_URL": settings.resolved_database_url,
        "EDGEFLEET_DATA_DIR": str(tmp_path / "ingest"),
    }
    cli = [sys.executable, "-c", "from fleet_server.cli import main; main()", "telemetry", "ingest"]
    members = [
        subprocess.Popen(cli, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    try:
        for m in members:  # "telemetry ingest on mqtt://…": connected and subscribed
            assert m.stdout is not None
            line = m.stdout.readline()
            assert "telemetry ingest on" in line, line
        messages = [
            (f"edgefleet/v1/devices/{d}/telemetry", json.dumps(_batch(d, seq)).encode())
            for d in devices
            for seq in range(1, 51)
        ]
        # Every third batch twice, as a device that resends would.
        _publish(settings.mqtt_url or "", messages + messages[::3])

        def stored() -> int:
            with Session(engine) as session:
                return int(session.exec(select(func.count()).select_from(TelemetryBatchKey)).one())

        try:
            wait_until(lambda: stored() == 200, 30, "all 200 batches")
        except TimeoutError:
            for m in members:
                m.send_signal(signal.SIGTERM)
            pytest.fail(
                f"{stored()} of 200 stored; the members said:\n"
                + "\n---\n".join(m.communicate(timeout=30)[0][-3000:] for m in members)
            )
        time.sleep(1)
        assert stored() == 200
    finally:
        outputs = []
        for m in members:
            if m.poll() is None:
                m.send_signal(signal.SIGTERM)
            out, _ = m.communicate(timeout=30)
            outputs.append(out or "")
        engine.dispose()
    counts = [int(re.search(r"stored (\d+) batch", out).group(1)) for out in outputs]  # type: ignore[union-attr]
    assert sum(counts) == 200 and min(counts) > 0, outputs  # both took a share, none twice


def test_with_the_server_away_past_the_bound_the_oldest_batches_go_and_are_counted(
    stack: EmbeddedStack, api: ApiClient, model_path: Path, tmp_path: Path, uid: str
) -> None:
    bound = 16 << 10
    api.upload_model(model_path, "classifier", "1.0.0")
    token = api.post("/v1/enrollment-tokens", json={"profile": "x86-64-avx2"})["token"]
    agent = LocalAgent(tmp_path / "devices", f"bound-{uid}", "x86-64-avx2")
    agent.enroll(stack.url, token)
    agent.configure(
        "[telemetry]\ninterval_s = 0.2\ncheckpoint_s = 0.1\nresend_after_s = 1\n"
        f"outbox_max_bytes = {bound}\n"
    )
    agent.start()
    agent.wait_ready()
    outbox = agent.dir / "state" / "telemetry"
    restarted: EmbeddedStack | None = None
    try:
        assert roll_out(api, "classifier", "1.0.0", [agent.device_id])["state"] == "completed"
        _serve(agent, 20)
        wait_until(lambda: _total_requests(api, "classifier") == 20, 30, "the first figures")
        stack.stop()  # the server is away; the broker stays
        served = 20
        deadline = time.monotonic() + 30
        state: dict[str, Any] = {}
        while time.monotonic() < deadline:
            _serve(agent, 5)
            served += 5
            state = json.loads((outbox / "state.json").read_text())
            held = sum(p.stat().st_size for p in outbox.glob("*.batch"))
            assert held <= bound, held  # the agent's disk use stays under the bound
            if state["dropped_batches_total"] >= 5:
                break
            time.sleep(0.05)
        assert state["dropped_batches_total"] >= 5, state
        import httpx

        local = httpx.get(f"http://127.0.0.1:{agent.serving_port}/metrics").text
        dropped = re.search(r"^edgefleet_agent_telemetry_dropped_batches_total (\S+)$", local, re.M)
        assert dropped is not None and float(dropped.group(1)) >= 5, local
        assert "edgefleet_agent_telemetry_sample_rate{" in local
        restarted = EmbeddedStack(stack.settings).start()
        api2 = ApiClient(restarted.url, ADMIN_TOKEN)
        # Every batch still held is stored and acknowledged: the device's floor carried the
        # server past the ones it dropped.
        wait_until(lambda: not list(outbox.glob("*.batch")), 30, "the outbox to empty")
        [stream] = api2.get(f"/v1/telemetry/devices/{agent.device_id}")
        assert stream["dropped_batches_total"] >= 5
        counted = _total_requests(api2, "classifier")
        assert 20 < counted < served, (counted, served)  # the dropped batches' requests
        api2.close()
    finally:
        agent.stop()
        if restarted is not None:
            restarted.stop()
