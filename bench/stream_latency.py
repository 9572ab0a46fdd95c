"""Streaming latency: from a message's publish on the device's broker to its prediction
arriving on the output topic, at 100 and 1,000 messages a second, beside the broker's own
round trip in the same run.

A real Mosquitto on a free port; the agent's serving half (slot table, the MLP classifier on
onnxruntime, and one ``Stream``: ``edge_agent.serving.stream``) in a process of its own, as
the daemon runs it; this process publishes frames (JSON, 16 features) at a steady rate
and receives the answers, stamping both ends with one clock (``--qos``: the stream's, and
the frames' and answers' QoS; default 0, as a stream's). The baseline: the same frames
published to a topic this process itself subscribes to (the broker's round trip alone): the
difference is what the agent adds. Prints p50/p99 per rate and one JSON line.

Run: .venv/bin/python bench/stream_latency.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SERVE = r"""
import sys
from pathlib import Path
from tests.factories import onnx_serving
from edge_agent.serving import SlotTable
from edge_agent.serving.stream import Stream, StreamSpec

model, url, qos = sys.argv[1], sys.argv[2], int(sys.argv[3])
table = SlotTable()
table.swap("clf", onnx_serving(Path(model), "1.0.0"))
stream = Stream(StreamSpec(name="bench", slot="clf", input=f"{url}/frames",
                           output=f"{url}/answers", queue=10_000, qos=qos), table)
stream.start()
assert stream.wait_connected()
print("ready", flush=True)
sys.stdin.read()
stream.stop()
"""


def _client(port: int) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def run_rate(
    port: int, send: str, receive: str, rate: int, seconds: float, qos: int
) -> dict[str, float]:
    """Publish ``rate`` frames a second for ``seconds`` on ``send``; latencies of the answers
    (or echoes) on ``receive``, by id."""
    sent: dict[str, float] = {}
    got: dict[str, float] = {}
    done = threading.Event()
    total = int(rate * seconds)
    subscribed = threading.Event()
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(c: object, u: object, m: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        got[json.loads(m.payload)["id"]] = now
        if len(got) >= total:
            done.set()

    sub.on_message = on_message
    sub.on_subscribe = lambda *_: subscribed.set()
    sub.on_connect = lambda c, *_: c.subscribe(receive, qos=qos)
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    assert subscribed.wait(10)
    pub = _client(port)
    x = np.random.default_rng(0).standard_normal(16).astype(np.float32).tolist()
    start = time.perf_counter()
    for i in range(total):
        due = start + i / rate
        while (now := time.perf_counter()) < due:
            time.sleep(min(due - now, 0.002))
        mid = f"m{i}"
        payload = json.dumps({"id": mid, "inputs": {"x": [x]}}).encode()
        sent[mid] = time.perf_counter()
        pub.publish(send, payload, qos=qos)
    done.wait(seconds + 30)
    pub.loop_stop()
    sub.loop_stop()
    lat = np.array([(got[k] - sent[k]) * 1000 for k in sent if k in got])
    return {
        "rate": rate,
        "sent": total,
        "answered": len(lat),
        "p50_ms": round(float(np.percentile(lat, 50)), 3),
        "p99_ms": round(float(np.percentile(lat, 99)), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--qos", type=int, choices=[0, 1], default=0, help="as the stream's")
    args = parser.parse_args()

    from converters.onnx.samples import mlp_classifier
    from fleet_server.broker import EmbeddedBroker

    with (
        tempfile.TemporaryDirectory() as tmp,
        EmbeddedBroker(Path(tmp) / "mosquitto", backend="mosquitto") as broker,
    ):
        port = int(broker.url.rsplit(":", 1)[1])
        model = mlp_classifier(Path(tmp) / "mlp.onnx", seed=3)
        agent = subprocess.Popen(
            [sys.executable, "-c", SERVE, str(model), f"mqtt://127.0.0.1:{port}", str(args.qos)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=Path(__file__).resolve().parents[1],
        )  # fmt: skip
        assert agent.stdout is not None and agent.stdout.readline().strip() == "ready"
        results = []
        try:
            for rate in (100, 1000):
                echo = run_rate(port, "echo", "echo", rate, args.seconds, args.qos)
                through = run_rate(port, "frames", "answers", rate, args.seconds, args.qos)
                results.append({"rate": rate, "agent": through, "broker": echo})
                print(
                    f"{rate:>5} msg/s: agent p50 {through['p50_ms']:.2f} ms p99 "
                    f"{through['p99_ms']:.2f} ms ({through['answered']}/{through['sent']} "
                    f"answered) | broker round trip p50 {echo['p50_ms']:.2f} ms p99 "
                    f"{echo['p99_ms']:.2f} ms"
                )
        finally:
            assert agent.stdin is not None
            agent.stdin.close()
            agent.wait(30)
    low, high = results
    print(
        f"summary: publish to prediction p50 {low['agent']['p50_ms']:.2f} / p99 "
        f"{low['agent']['p99_ms']:.2f} ms at 100 msg/s, {high['agent']['p50_ms']:.2f} / "
        f"{high['agent']['p99_ms']:.2f} ms at 1,000 msg/s; the broker's own round trip "
        f"p50 {low['broker']['p50_ms']:.2f} / {high['broker']['p50_ms']:.2f} ms"
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
