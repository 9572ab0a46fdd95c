"""The embedded broker: both backends speak MQTT 5 with retained messages and persistent
sessions, and ``edgefleet serve`` starts and stops its broker with itself."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.contracts.errors import ConfigError
from fleet_server.broker import EmbeddedBroker, free_port
from hil.rig import wait_until


def _client(
    broker: EmbeddedBroker, client_id: str, inbox: queue.Queue[bytes], clean: bool
) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    up = threading.Event()
    c.on_connect = lambda *a: up.set()
    c.on_message = lambda cl, u, m: inbox.put(m.payload)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 300
    c.connect(broker.host, broker.port, clean_start=clean, properties=props)
    c.loop_start()
    assert up.wait(5), "no CONNACK"
    return c


@pytest.mark.parametrize("backend", ["mosquitto", "iotcore"])
def test_backend_speaks_mqtt5_with_retained_messages(backend: str, tmp_path: Path) -> None:
    if backend == "mosquitto":
        from tests.conftest import _ensure_mosquitto

        _ensure_mosquitto()
    with EmbeddedBroker(tmp_path, backend=backend) as broker:  # type: ignore[arg-type]
        inbox: queue.Queue[bytes] = queue.Queue()
        pub = _client(broker, "pub", queue.Queue(), clean=True)
        pub.publish(
            "edgefleet/v1/devices/d1/desired", b"doc-1", qos=1, retain=True
        ).wait_for_publish(5)
        sub = _client(broker, "sub", inbox, clean=True)
        sub.subscribe("edgefleet/v1/devices/d1/desired", qos=1)
        assert inbox.get(timeout=5) == b"doc-1"
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()
    with pytest.raises(ConnectionRefusedError):  # the broker is gone
        socket.create_connection(("127.0.0.1", broker.port), timeout=2).close()


def test_mosquitto_keeps_offline_sessions(tmp_path: Path) -> None:
    """What the agent relies on: with clean_start=False, QoS 1 messages published while it was
    away are delivered when it comes back."""
    from tests.conftest import _ensure_mosquitto

    _ensure_mosquitto()
    with EmbeddedBroker(tmp_path, backend="mosquitto") as broker:
        inbox: queue.Queue[bytes] = queue.Queue()
        dev = _client(broker, "dev-offline", inbox, clean=False)
        dev.subscribe("edgefleet/v1/devices/dev-offline/cmd", qos=1)
        time.sleep(0.2)
        dev.disconnect()
        dev.loop_stop()
        pub = _client(broker, "srv", queue.Queue(), clean=True)
        pub.publish("edgefleet/v1/devices/dev-offline/cmd", b"while-away", qos=1).wait_for_publish(
            5
        )
        dev = _client(broker, "dev-offline", inbox, clean=False)
        assert inbox.get(timeout=5) == b"while-away"
        for c in (pub, dev):
            c.disconnect()
            c.loop_stop()


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port} is already in use"):
            EmbeddedBroker(tmp_path, port=port).start()


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_serve_starts_and_stops_its_broker(tmp_path: Path, stop_signal: signal.Signals) -> None:
    api_port, broker_port = free_port(), free_port()
    env = {
        **os.environ,
        "EDGEFLEET_DATA_DIR": str(tmp_path / "data"),
        "EDGEFLEET_PORT": str(api_port),
        "EDGEFLEET_BROKER_PORT": str(broker_port),
    }
    env.pop("EDGEFLEET_MQTT_URL", None)
    env.pop("EDGEFLEET_ADMIN_TOKEN", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", "from fleet_server.cli import main; main()", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:

        def healthy() -> bool:
            try:
                return bool(
                    httpx.get(f"http://127.0.0.1:{api_port}/healthz").json()["broker_connected"]
                )
            except (httpx.HTTPError, ValueError, KeyError):
                return False

        wait_until(healthy, 30, "edgefleet serve to come up with its broker")
        token_file = tmp_path / "data" / "admin.token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        r = httpx.get(
            f"http://127.0.0.1:{api_port}/v1/models", headers={"Authorization": f"Bearer {token}"}
        )
        assert r.status_code == 200 and r.json() == []
    finally:
        proc.send_signal(stop_signal)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
    for port in (api_port, broker_port):  # nothing is left listening
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
