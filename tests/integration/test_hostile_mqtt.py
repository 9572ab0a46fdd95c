"""Hostile payloads on a device's desired-state topic (anyone can publish there on an anonymous
development broker): a real agent process refuses each with a reason, keeps serving, keeps
listening — and a legitimate rollout afterwards still lands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent.protocol.topics import Topics
from fleet_server.broker import EmbeddedBroker
from fleet_server.client import ApiClient
from fleet_server.server import EmbeddedStack
from hil.rig import LocalAgent, roll_out, wait_until
from tests.integration.test_control_plane import Peer

pytestmark = pytest.mark.slow

SHA = "a" * 64
HOSTILE: list[tuple[str, bytes]] = [
    ("deep nesting", b"[" * 200_000 + b"]" * 200_000),
    ("deep object nesting", b'{"signed":' * 50_000 + b"1" + b"}" * 50_000),
    ("not UTF-8", b"\xff\xfe\x00garbage\x80"),
    ("not JSON", b"{not json"),
    ("a number", b"12345678901234567890"),
    ("duplicate keys", b'{"signed": {}, "signed": {}, "signatures": []}'),
    ("NaN seq", b'{"signed": {"seq": NaN}, "signatures": []}'),
    ("wrong shape", json.dumps({"signed": {"device_id": ["x"], "seq": "many"}}).encode()),
    ("oversized", b'{"pad": "' + b"x" * (2 << 20) + b'"}'),
    (
        "unsigned, huge seq",
        json.dumps(
            {
                "signed": {
                    "device_id": "DEVICE",
                    "seq": 2**62,
                    "issued_at": "2026-01-01T00:00:00Z",
                    "expires_at": "2099-01-01T00:00:00Z",
                    "slots": {
                        "classifier": {
                            "model": "m",
                            "version": "9",
                            "bundle_sha256": SHA,
                            "bundle_url": "http://127.0.0.1:1/x",
                            "size": 1,
                        }
                    },
                },
                "signatures": [],
            }
        ).encode(),
    ),
]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_hostile_desired_state_payloads_change_nothing_and_a_rollout_still_lands(
    stack: EmbeddedStack,
    api: ApiClient,
    broker: EmbeddedBroker,
    model_path: Path,
    model_v2_path: Path,
    tmp_path: Path,
    uid: str,
) -> None:
    api.upload_model(model_path, "classifier", "1.0.0")
    api.upload_model(model_v2_path, "classifier", "1.1.0")
    token = api.post("/v1/enrollment-tokens", json={"profile": "x86-64-avx2"})["token"]
    agent = LocalAgent(tmp_path / "devices", f"hostile-{uid}", "x86-64-avx2")
    agent.enroll(stack.url, token)
    agent.start()
    peer = Peer(broker, f"attacker-{uid}")
    try:
        agent.wait_ready()
        assert roll_out(api, "classifier", "1.0.0", [agent.device_id])["state"] == "completed"
        topic = Topics(agent.device_id).desired
        for case, payload in HOSTILE:
            before = _reported(api, agent.device_id).get("reported_at")
            peer.publish(topic, payload.replace(b"DEVICE", agent.device_id.encode()))
            # This payload's own refusal: a status reported after it, naming a reason.
            report = wait_until(
                lambda b=before: (
                    (r := _reported(api, agent.device_id)).get("reported_at") != b
                    and r.get("refusal")
                    and r
                ),
                10,
                f"a refusal of the {case!r} payload",
            )
            refusal = report["refusal"]
            assert refusal["reason"] and refusal["message"], refusal
            assert agent.process is not None and agent.process.poll() is None, agent.log_tail()
            assert (agent.serving("classifier") or {}).get("version") == "1.0.0", case
        # The worker is alive: the next legitimate document is applied.
        done = roll_out(api, "classifier", "1.1.0", [agent.device_id])
        assert done["state"] == "completed", done
        assert agent.wait_serving("classifier", "1.1.0")
        log = agent.log_path.read_text()
        assert "Traceback" not in log, agent.log_tail(80)
    finally:
        peer.close()
        agent.stop()


def _reported(api: ApiClient, device_id: str) -> dict[str, object]:
    reported = api.get(f"/v1/devices/{device_id}")["reported"] or {}
    return dict(reported)
