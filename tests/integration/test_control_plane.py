"""The server's MQTT side against a real Mosquitto, observed by a raw paho client: desired
state is published retained at QoS 1, status and presence are ingested, and a device that
comes back with a stale seq gets its document again."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlmodel import Session, select

from edge_agent.protocol import ReportedStatus, Topics
from fleet_server.broker import EmbeddedBroker
from fleet_server.client import ApiClient
from fleet_server.database import make_engine
from fleet_server.devices.tables import DeviceTransition
from fleet_server.server import EmbeddedStack
from hil.rig import wait_until
from tests.conftest import ADMIN_TOKEN
from tests.integration.test_api import enroll


class Peer:
    """A raw MQTT 5 client standing in for a device."""

    def __init__(self, broker: EmbeddedBroker, client_id: str) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connected = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_connect = lambda c, u, f, rc, p: self.connected.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self.connected.wait(5)

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)

    def next(self, timeout_s: float = 5) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout_s)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def peer(broker: EmbeddedBroker, request: pytest.FixtureRequest) -> Iterator[Peer]:
    p = Peer(broker, f"peer-{abs(hash(request.node.nodeid)) % 10**8}")
    yield p
    p.close()


def _status(device_id: str, seq: int) -> bytes:
    return ReportedStatus(
        device_id=device_id,
        profile="x86-64-avx2",
        agent_version="test",
        desired_seq=seq,
        reported_at=datetime.now(UTC),
    ).to_bytes()


def test_desired_state_is_retained_and_resent_to_a_stale_device(
    api: ApiClient,
    broker: EmbeddedBroker,
    peer: Peer,
    model_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    device_id = f"cp-{abs(hash(request.node.nodeid)) % 10**6}"  # unique topics per test
    topics = Topics(device_id)
    api.upload_model(model_path, "classifier", "1.0.0")
    enroll(api, device_id)
    api.post(
        "/v1/rollouts", json={"model": "classifier", "version": "1.0.0", "devices": [device_id]}
    )
    wait_until(lambda: api.get(f"/v1/devices/{device_id}")["desired_seq"] == 1, 30, "seq 1")
    time.sleep(0.2)  # published right after it is stored

    # Subscribing after the publish still delivers it: it was retained.
    peer.subscribe(topics.desired)
    msg = peer.next()
    assert msg.retain and msg.qos == 1
    doc = json.loads(msg.payload)["signed"]
    assert doc["device_id"] == device_id and doc["seq"] == 1
    assert doc["slots"]["classifier"]["version"] == "1.0.0"

    # Presence and status are ingested into the database.
    peer.publish(topics.status, _status(device_id, 0), retain=True)
    peer.publish(topics.online, b"online", retain=True)
    wait_until(lambda: api.get(f"/v1/devices/{device_id}")["online"], 5, "presence ingest")
    # The device reported seq 0 < 1: the server re-sends the document.
    time.sleep(0.3)  # past the resend interval
    peer.publish(topics.status, _status(device_id, 0), retain=True)
    again = peer.next()
    assert json.loads(again.payload)["signed"]["seq"] == 1

    peer.publish(topics.status, _status(device_id, 1), retain=True)
    wait_until(lambda: api.get(f"/v1/devices/{device_id}")["reported_seq"] == 1, 5, "status ingest")
    peer.publish(topics.online, b"offline", retain=True)
    wait_until(lambda: not api.get(f"/v1/devices/{device_id}")["online"], 5, "offline ingest")


def test_status_for_another_device_or_garbage_is_ignored(
    api: ApiClient, peer: Peer, request: pytest.FixtureRequest
) -> None:
    a, b = (
        "cpa" + str(abs(hash(request.node.nodeid)) % 10**6),
        "cpb" + str(abs(hash(request.node.nodeid)) % 10**6),
    )
    enroll(api, a)
    enroll(api, b)
    peer.publish(Topics(a).status, _status(b, 7))  # a's topic, b's name
    peer.publish(Topics(a).status, b"{not json")
    peer.publish(Topics(a).status, _status(a, 3))
    wait_until(lambda: api.get(f"/v1/devices/{a}")["reported_seq"] == 3, 5, "a's status")
    assert api.get(f"/v1/devices/{b}")["reported_seq"] == 0


def test_a_device_flooding_its_status_is_cut_to_its_rate_and_the_rest_are_stored(
    api: ApiClient, stack: EmbeddedStack, peer: Peer, uid: str
) -> None:
    """One device sending 400 reports at once (a bug, or a device someone took over) gets
    its burst stored and the rest refused and counted; another device's report goes in as
    before."""
    loud, quiet = f"loud-{uid}", f"quiet-{uid}"
    enroll(api, loud)
    enroll(api, quiet)
    for seq in range(1, 401):
        peer.client.publish(Topics(loud).status, _status(loud, seq), qos=0)
    peer.publish(Topics(quiet).status, _status(quiet, 5))
    wait_until(lambda: api.get(f"/v1/devices/{quiet}")["reported_seq"] == 5, 5, "quiet's status")
    scraped = httpx.get(
        f"{stack.url}/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    ).text
    refused = next(
        float(line.split()[-1])
        for line in scraped.splitlines()
        if line.startswith('edgefleet_status_refused_total{reason="rate"}')
    )
    # The burst (50) and what the bucket refilled at 5 a second went in; the rest did not.
    assert 300 <= refused <= 350, refused
    # Which ones went in depends on when they arrived (on a busy machine the 400 spread over
    # seconds, and the refill lets later ones through), so the newest stored is at least the
    # burst's last, and at most the last sent.
    stored = api.get(f"/v1/devices/{loud}")["reported_seq"]
    assert 50 <= stored <= 400, stored


def test_enrollment_clears_a_stale_retained_document(
    api: ApiClient, peer: Peer, model_path: Path, uid: str
) -> None:
    """A device id used before (re-flashed device, reset database) must not find an old
    document waiting on the broker."""
    device_id = f"reused-{uid}"
    topics = Topics(device_id)
    peer.publish(topics.desired, b'{"signed": {"seq": 99}, "signatures": []}', retain=True)
    enroll(api, device_id)
    time.sleep(0.3)
    peer.subscribe(topics.desired)
    with pytest.raises(queue.Empty):
        peer.next(timeout_s=1)


def test_a_report_with_nul_bytes_is_stored_without_them_and_spoils_no_other(
    api: ApiClient, stack: EmbeddedStack, peer: Peer, uid: str
) -> None:
    """PostgreSQL text cannot hold NUL: a device that sends one in its free text (a bug, or
    someone probing) has it dropped, and the reports drained beside it are stored too."""
    from edge_agent.protocol.lifecycle import SlotEvent, SlotState
    from edge_agent.protocol.status import Transition

    odd, plain = f"nul-{uid}", f"plain-{uid}"
    enroll(api, odd)
    enroll(api, plain)
    hostile = ReportedStatus(
        device_id=odd,
        profile="x86-64-avx2",
        agent_version="1.0\x00evil",
        desired_seq=4,
        reported_at=datetime.now(UTC),
        last_transition=Transition(
            slot="clf",
            from_state=SlotState.DOWNLOADING,
            to_state=SlotState.FAILED,
            event=SlotEvent.FAILURE,
            at=datetime.now(UTC),
            reason="bad\x00reason",
            message="nul \x00 inside",
        ),
    ).to_bytes()
    peer.client.publish(Topics(odd).status, hostile, qos=1)
    peer.publish(Topics(plain).status, _status(plain, 6))
    wait_until(lambda: api.get(f"/v1/devices/{plain}")["reported_seq"] == 6, 5, "plain's status")
    wait_until(lambda: api.get(f"/v1/devices/{odd}")["reported_seq"] == 4, 5, "odd's status")
    stored = api.get(f"/v1/devices/{odd}")
    assert stored["agent_version"] == "1.0evil"
    engine = make_engine(stack.settings.resolved_database_url)
    with Session(engine) as session:
        moved = session.exec(select(DeviceTransition).where(DeviceTransition.device_id == odd))
        assert [(t.reason, t.message) for t in moved] == [("badreason", "nul  inside")]
    engine.dispose()
