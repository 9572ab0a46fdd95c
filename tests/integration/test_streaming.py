"""Streams: a local topic on a real Mosquitto, and frames on a real Unix socket, scored on
real onnxruntime sessions through the slot table, through hot-swaps, floods and bad frames."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import onnxruntime as ort
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from converters.onnx.samples import mlp_classifier
from edge_agent.config import AgentConfig
from edge_agent.protocol.telemetry import TelemetryBatch
from edge_agent.serving import SlotTable
from edge_agent.serving.metrics import render
from edge_agent.serving.stream import Stream, StreamCollector, StreamSpec
from edge_agent.telemetry.outbox import Outbox
from edge_agent.telemetry.reporter import TelemetryReporter, TelemetrySettings
from fleet_server.broker import EmbeddedBroker
from fleet_server.client import ApiClient
from fleet_server.demo.agents import FAST_TELEMETRY, LocalAgent, wait_until
from fleet_server.server import EmbeddedStack
from tests.factories import onnx_serving
from tests.integration.test_batch_scoring import FEATURES


class Collector:
    """A consumer of the output topic (a real paho client)."""

    def __init__(self, broker: EmbeddedBroker, topic: str) -> None:
        self.got: list[dict[str, object]] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self.ready.set()
        self.client.on_message = self._on_message
        parts = urlsplit(broker.url)
        self.client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
        self.client.loop_start()
        assert self.ready.wait(10)

    def _on_message(self, c: object, u: object, m: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.got.append(json.loads(m.payload))

    def wait_for(self, count: int, timeout_s: float = 120) -> list[dict[str, object]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.got) >= count:
                    return list(self.got)
            time.sleep(0.05)
        with self.lock:
            return list(self.got)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publisher(broker: EmbeddedBroker) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    parts = urlsplit(broker.url)
    client.max_inflight_messages_set(1000)
    client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
    client.loop_start()
    return client


def mqtt_url(broker: EmbeddedBroker, topic: str) -> str:
    parts = urlsplit(broker.url)
    return f"mqtt://{parts.hostname}:{parts.port}/{topic}"


def frame(i: int, x: np.ndarray) -> bytes:
    return json.dumps({"id": f"m{i}", "inputs": {"x": x[None].tolist()}}).encode()


def raw(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run(None, {"x": x})[0]
    return out


@pytest.mark.slow
def test_ten_thousand_messages_through_two_swaps_each_answered_once_by_the_version_serving(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    v1 = mlp_classifier(tmp_path / "v1.onnx", seed=3)
    v2 = mlp_classifier(tmp_path / "v2.onnx", seed=4)
    table = SlotTable()
    reporter = TelemetryReporter(
        "dev-s", Outbox(tmp_path / "outbox"), TelemetrySettings(), publish=lambda b: True
    )
    table.on_serving = reporter.track
    table.swap("clf", onnx_serving(v1, "1.0.0"))
    topic = f"t{time.monotonic_ns()}"
    spec = StreamSpec(
        name="cam", slot="clf", input=mqtt_url(broker, f"{topic}/in"), qos=1,
        output=mqtt_url(broker, f"{topic}/out"), queue=20_000,
    )  # fmt: skip
    stream = Stream(spec, table)
    out = Collector(broker, f"{topic}/out")
    stream.start()
    assert stream.wait_connected()
    pub = publisher(broker)
    total = 10_000
    xs = np.random.default_rng(5).standard_normal((total, FEATURES)).astype(np.float32)
    try:
        for i in range(total):
            pub.publish(f"{topic}/in", frame(i, xs[i]), qos=1)
            if i in (3_000, 7_000):  # swap while messages are queued and one is in flight
                while stream.counters.answered < i // 2:
                    time.sleep(0.001)
                version = "2.0.0" if i == 3_000 else "3.0.0"
                table.swap("clf", onnx_serving(v2 if i == 3_000 else v1, version))
        got = out.wait_for(total)
    finally:
        pub.loop_stop()
        stream.stop()
        out.close()
    ids = [g["id"] for g in got]
    assert len(ids) == total and len(set(ids)) == total, (len(ids), len(set(ids)))
    assert stream.counters.dropped == stream.counters.invalid == stream.counters.failed == 0
    by_version: dict[str, list[int]] = {}
    for g in got:
        by_version.setdefault(str(g["version"]), []).append(int(str(g["id"])[1:]))
    assert set(by_version) == {"1.0.0", "2.0.0", "3.0.0"}, {
        k: len(v) for k, v in by_version.items()
    }
    for version, numbers in by_version.items():  # each answered by the model that served it
        model = v2 if version == "2.0.0" else v1
        want = raw(model, xs[numbers])
        outputs = np.array([g["outputs"]["probs"] for g in got if g["version"] == version])
        order = np.argsort([int(str(g["id"])[1:]) for g in got if g["version"] == version])
        np.testing.assert_allclose(outputs[order][:, 0], want[np.argsort(numbers)], atol=1e-5)
    # Counted under the stream role, per version, apart from online requests.
    reporter.close_interval()
    slots = [
        s
        for seq in reporter.outbox.pending()
        for s in TelemetryBatch.from_bytes(reporter.outbox.read(seq) or b"").slots
    ]
    stream_requests = {s.version: s.requests for s in slots if s.role == "stream"}
    assert stream_requests == {v: len(n) for v, n in by_version.items()}
    assert all(s.requests == 0 for s in slots if s.role == "active")


def test_a_flood_drops_the_oldest_and_bad_messages_are_answered_and_counted(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    v1 = mlp_classifier(tmp_path / "v1.onnx", seed=3)
    table = SlotTable()
    table.swap("clf", onnx_serving(v1, "1.0.0"))
    topic = f"f{time.monotonic_ns()}"
    spec = StreamSpec(
        name="flood", slot="clf", input=mqtt_url(broker, f"{topic}/in"),
        output=mqtt_url(broker, f"{topic}/out"), queue=50,
    )  # fmt: skip
    stream = Stream(spec, table)
    table.collectors.append(StreamCollector([stream]))
    out = Collector(broker, f"{topic}/out")
    gate = threading.Event()
    original = stream._score

    def slow_first(payload: bytes) -> bytes:
        gate.wait(10)  # the worker is busy while the flood arrives
        return original(payload)

    stream._score = slow_first  # type: ignore[method-assign]
    stream.start()
    assert stream.wait_connected()
    pub = publisher(broker)
    bad = [
        b"not json",
        b'{"id": "no-inputs"}',
        b'{"id": "wrong-width", "inputs": {"x": [[1, 2, 3]]}}',
        b'{"id": "wrong-name", "inputs": {"y": [[0]]}}',
        b'{"id": {"nested": 1}, "inputs": {"x": [[0]]}}',
        b"[1, 2, 3]",
        b"\xff\xfe\x00 binary",
    ]
    x = np.zeros(FEATURES, np.float32)
    try:
        for i in range(500):
            pub.publish(f"{topic}/in", frame(i, x), qos=1)
        wait_until(lambda: stream.counters.received >= 500, 20, "the flood to arrive")
        gate.set()
        good = out.wait_for(50, timeout_s=30)
        for payload in bad:
            pub.publish(f"{topic}/in", payload, qos=1)
        got = out.wait_for(len(good) + len(bad), timeout_s=30)
    finally:
        pub.loop_stop()
        stream.stop()
        out.close()
    c = stream.counters
    assert c.received == 500 + len(bad)
    assert c.dropped >= 400 and c.answered + c.dropped == 500  # the flood: bounded, counted
    # The newest messages were kept: the last one published was answered.
    assert any(g.get("id") == "m499" for g in got)
    errors = [g for g in got if "error" in g]
    assert len(errors) == len(bad) == c.invalid
    assert {e["id"] for e in errors} >= {"no-inputs", "wrong-width", "wrong-name"}
    reasons = {e["id"]: e["error"]["code"] for e in errors}  # type: ignore[index]
    assert reasons["wrong-width"] == "input_shape" and reasons["wrong-name"] == "input_names"
    metrics = render(table).decode()
    assert 'edgefleet_agent_stream_dropped_total{slot="clf",stream="flood"}' in metrics
    table.close()


def test_a_stopping_stream_answers_every_message_it_queued_before_it_closes(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """The agent stops (SIGTERM) with messages queued: it takes no new ones, answers those on
    the connection it read them from, and only then closes it."""
    table = SlotTable()
    table.swap("clf", onnx_serving(mlp_classifier(tmp_path / "v1.onnx", seed=3), "1.0.0"))
    topic = f"s{time.monotonic_ns()}"
    spec = StreamSpec(
        name="stop", slot="clf", input=mqtt_url(broker, f"{topic}/in"),
        output=mqtt_url(broker, f"{topic}/out"), qos=1,
    )  # fmt: skip
    stream = Stream(spec, table)
    gate = threading.Event()
    original = stream._score
    stream._score = lambda payload: (gate.wait(10), original(payload))[1]  # type: ignore[method-assign]
    out = Collector(broker, f"{topic}/out")
    stream.start()
    assert stream.wait_connected()
    pub = publisher(broker)
    x = np.zeros(FEATURES, np.float32)
    try:
        for i in range(50):
            pub.publish(f"{topic}/in", frame(i, x), qos=1)
        wait_until(lambda: stream.counters.received >= 50, 10, "the 50 messages to arrive")
        stopping = threading.Thread(target=stream.stop)
        stopping.start()
        time.sleep(0.2)
        pub.publish(f"{topic}/in", frame(99, x), qos=1)  # after the stop began: not taken
        gate.set()
        stopping.join(30)
        got = out.wait_for(50, timeout_s=10)
    finally:
        pub.loop_stop()
        out.close()
        table.close()
    assert sorted(int(str(g["id"])[1:]) for g in got) == list(range(50))
    assert stream.counters.answered == 50


def test_frames_on_a_unix_socket_are_answered_on_their_connection(tmp_path: Path) -> None:
    v1 = mlp_classifier(tmp_path / "v1.onnx", seed=3)
    table = SlotTable()
    table.swap("clf", onnx_serving(v1, "1.0.0"))
    path = tmp_path / "frames.sock"
    stream = Stream(StreamSpec(name="u", slot="clf", input=f"unix://{path}", output=None), table)
    stream.start()
    xs = np.random.default_rng(1).standard_normal((200, FEATURES)).astype(np.float32)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            sock.sendall(b"".join(frame(i, xs[i]) + b"\n" for i in range(100)))
            sock.sendall(b"garbage\n\n")  # an empty line is no frame
            sock.sendall(b"".join(frame(i, xs[i]) + b"\n" for i in range(100, 200)))
            reader = sock.makefile("rb")
            lines = [json.loads(reader.readline()) for _ in range(201)]
    finally:
        stream.stop()
        table.close()
    answers = {g["id"]: g for g in lines if "error" not in g}
    assert len(answers) == 200 and next(g for g in lines if "error" in g)["id"] is None
    got = np.array([answers[f"m{i}"]["outputs"]["probs"][0] for i in range(200)])
    np.testing.assert_allclose(got, raw(v1, xs), atol=1e-5)
    assert not path.exists()  # the socket is removed when the stream stops


def test_stream_configuration_is_checked_and_relative_sockets_sit_beside_the_config(
    tmp_path: Path,
) -> None:
    base = (
        'device_id = "d1"\nprofile = "x86-64-avx2"\nstate_dir = "s"\n'
        '[server]\nurl = "http://h:1"\ncredential_file = "c"\n[mqtt]\nurl = "mqtt://h:1"\n'
        '[trust]\nroot_key_file = "r"\n'
    )
    path = tmp_path / "agent.toml"
    path.write_text(base + '[[streams]]\nslot = "clf"\ninput = "unix:frames.sock"\n')
    config = AgentConfig.load(path)
    assert config.streams[0].input == f"unix://{tmp_path.resolve()}/frames.sock"
    from edge_agent.contracts.errors import ConfigError

    for bad, words in (
        ('input = "mqtt://127.0.0.1:1883/in"\n', "needs an output topic"),
        ('input = "http://x/y"\n', "mqtt://127.0.0.1:1883/topic or unix"),
        ('input = "mqtt://h:1/in"\noutput = "mqtt://h:1/out/#"\n', "wildcards"),
        ('input = "unix:a"\nqueue = 0\n', "queue"),
    ):
        path.write_text(base + '[[streams]]\nslot = "clf"\n' + bad)
        with pytest.raises(ConfigError) as caught:
            AgentConfig.load(path)
        assert words in str(caught.value), caught.value


@pytest.mark.slow
def test_an_enrolled_agent_process_scores_files_and_a_stream_and_the_server_sees_both_roles(
    stack: EmbeddedStack, api: ApiClient, model_path: Path, tmp_path: Path, uid: str
) -> None:
    """From the outside: ``edge-agent run`` with a ``[[streams]]`` section, a rollout from the
    server, frames on the stream's Unix socket, ``edge-agent score`` as a process, and the
    server's telemetry API showing each workload under its own role."""
    api.upload_model(model_path, "classifier", "1.0.0")
    token = api.post("/v1/enrollment-tokens", json={"profile": "x86-64-avx2"})["token"]
    agent = LocalAgent(tmp_path / "devices", f"wl-{uid}", "x86-64-avx2")
    agent.enroll(stack.url, token, {"ring": f"wl-{uid}"})
    # A Unix socket path has room for ~100 bytes; pytest's directories are deep.
    frames = Path(tempfile.mkdtemp(prefix="ef-")) / "frames.sock"
    agent.configure(
        FAST_TELEMETRY + '[[streams]]\nname = "frames"\nslot = "classifier"\n'
        f'input = "unix://{frames}"\n'
    )
    agent.start()
    try:
        agent.wait_ready()
        api.post(
            "/v1/rollouts",
            json={"model": "classifier", "version": "1.0.0", "selector": {"ring": f"wl-{uid}"}},
        )
        agent.wait_serving("classifier", "1.0.0")
        xs = np.random.default_rng(3).standard_normal((30, FEATURES)).astype(np.float32)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(frames))
            sock.sendall(b"".join(frame(i, xs[i]) + b"\n" for i in range(30)))
            reader = sock.makefile("rb")
            answers = [json.loads(reader.readline()) for _ in range(30)]
        assert {a["version"] for a in answers} == {"1.0.0"}
        np.testing.assert_allclose(
            [a["outputs"]["probs"][0] for a in answers], raw(model_path, xs), atol=1e-5
        )
        inputs = tmp_path / "in"
        inputs.mkdir()
        for i in range(20):
            np.save(inputs / f"{i}.npy", xs[i])
        scored = subprocess.run(
            [sys.executable, "-m", "edge_agent.cli", "score", "--config", str(agent.config),
             "--model", "classifier", "--in", str(inputs), "--out", str(tmp_path / "s.npz")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert scored.returncode == 0, scored.stderr
        assert "scored 20 file(s), 20 row(s)" in scored.stdout

        def roles() -> dict[str, int] | None:
            got = {
                role: sum(
                    h["requests"]
                    for h in api.get("/v1/telemetry/models/classifier", params={"role": role})
                )
                for role in ("active", "batch", "stream")
            }
            return got if got["stream"] == 30 and got["batch"] >= 1 else None

        figures = wait_until(roles, 30, "stream and batch telemetry at the server")
        assert figures["active"] == 0
        metrics = agent.client._request("GET", "/metrics").body.decode()
        assert 'edgefleet_agent_stream_answered_total{slot="classifier",stream="frames"} 30.0' in (
            metrics
        )
    finally:
        agent.stop()
    assert not frames.exists()
    frames.parent.rmdir()
