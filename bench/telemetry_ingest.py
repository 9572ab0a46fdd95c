"""Telemetry ingest throughput: batches stored per second by one and by two ingest processes
(members of one ``$share/`` group), on SQLite and on PostgreSQL, side by side in one run.

A real mosquitto broker (its per-client queue unbounded, see ``_Mosquitto``); publisher
processes play ``--devices`` devices, each sending its batches in sequence (QoS 1) as fast as
the broker takes them. A batch is what an agent sends for one model: one slot with a latency
sketch (~130 bins), 16 features x 10 drift bins, 4 top-1 classes, process figures (~1.7 KB of
JSON). Also printed: how the batches split between the processes, and the ingest processes'
CPU time per batch (what sizes a deployment: the publishers, broker and database share this
machine's cores with them). Each ingest process is ``TelemetryService`` with its
own connection, as ``edgefleet telemetry ingest`` runs it. Measured: from the first publish
until the database holds every batch (each exactly once).

PostgreSQL: ``EDGEFLEET_BENCH_POSTGRES_URL`` (a database this may wipe), else a fresh database
on 127.0.0.1:5432 (trust auth) when one answers, else SQLite only.

The floor on this machine: the same batches from the same publishers received by a bare paho
subscriber pair in the same share group that only acknowledges them. The summary gives two
ingest processes on PostgreSQL as a share of that rate. The bare pair and the two ingest
processes on PostgreSQL run ``--rounds`` times in turns (the bare pair's rate moves by a
fifth from one run to the next here): each round's share is printed, and their median.

Run: .venv/bin/python bench/telemetry_ingest.py [--batches 20000] [--devices 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHA = "be" * 32


def _batch(device: str, seq: int, rng: np.random.Generator) -> bytes:
    from edge_agent.telemetry.sketch import new_sketch, to_wire

    sketch = new_sketch()
    for v in rng.lognormal(0, 0.5, 200):
        sketch.add(float(v))
    wire = to_wire(sketch)
    assert wire is not None
    now = datetime.now(UTC)
    body = {
        "device_id": device,
        "stream": "0123456789abcdef",
        "seq": seq,
        "floor": 0,  # nothing acknowledged yet, as a device that sends a backlog
        "interval_start": (now - timedelta(seconds=60)).isoformat(),
        "interval_end": now.isoformat(),
        "slots": [
            {
                "slot": "clf",
                "role": "active",
                "model": "bench",
                "version": "1.0.0",
                "bundle_sha256": SHA,
                "requests": 200,
                "errors": 0,
                "nonfinite": 0,
                "latency_ms": wire.to_dict(),
                "sampled": 50,
                "sample_rate": 0.25,
                "inputs": {"x": {"kind": "bins", "counts": [[5] * 10 for _ in range(16)]}},
                "outputs": {"probs": {"kind": "top1", "counts": [[20, 10, 10, 10]]}},
            }
        ],
        "process": {"cpu_percent": 12.5, "rss_bytes": 90_000_000, "temperature_c": 51.0},
        "dropped_batches_total": 0,
    }
    return json.dumps(body).encode()


def _publisher(url: str, devices: list[str], per_device: int, ready: object) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    rng = np.random.default_rng(abs(hash(devices[0])) % 2**32)
    payloads = [
        (f"edgefleet/v1/devices/{d}/telemetry", _batch(d, seq, rng))
        for seq in range(1, per_device + 1)
        for d in devices
    ]
    host, port = url.removeprefix("mqtt://").split(":")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(host, int(port))
    client.loop_start()
    ready.wait()  # type: ignore[attr-defined]
    infos = [client.publish(t, p, qos=1) for t, p in payloads]
    for info in infos:
        info.wait_for_publish(120)
    client.loop_stop()
    client.disconnect()


def _member(
    db_url: str,
    artifacts: str,
    mqtt_url: str,
    ready: object,
    stop: object,
    out: object,
    stored: object,
) -> None:
    from fleet_server.artifacts.local import LocalArtifactStore
    from fleet_server.database import make_engine
    from fleet_server.heap import settle
    from fleet_server.telemetry.service import TelemetryService

    engine = make_engine(db_url)
    service = TelemetryService(engine, LocalArtifactStore(Path(artifacts)))
    ingest = service.start_ingest(mqtt_url)
    assert service.connection is not None
    service.connection.subscribed.wait(30)
    settle()  # as `edgefleet telemetry ingest` does once started
    ready.set()  # type: ignore[attr-defined]
    cpu = time.process_time()
    # What this process has committed, where the parent reads it for free (as it counts the
    # bare pair's): polling the database instead took CPU from the processes measured.
    while not stop.wait(0.01):  # type: ignore[attr-defined]
        stored.value = ingest.stored_total  # type: ignore[attr-defined]
    out.put((ingest.stored_total, time.process_time() - cpu))  # type: ignore[attr-defined]
    service.stop()


def _raw_member(mqtt_url: str, ready: object, received: object) -> None:
    """A bare paho subscriber in the ingest share group: it receives each batch, acknowledges
    it (QoS 1, and an ``ack`` message to the device at the real ingest's QoS) and stores
    nothing. The floor the real ingest is compared with."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edge_agent.protocol.telemetry import ACK_QOS
    from fleet_server.telemetry.ingest import SHARED_FILTER

    host, port = mqtt_url.removeprefix("mqtt://").split(":")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)

    def on_message(c: mqtt.Client, userdata: object, m: mqtt.MQTTMessage) -> None:
        device = m.topic.split("/")[3]
        c.publish(f"edgefleet/v1/devices/{device}/ack", b'{"acked":1}', qos=ACK_QOS)
        with received.get_lock():  # type: ignore[attr-defined]
            received.value += 1  # type: ignore[attr-defined]

    client.on_message = on_message
    client.on_subscribe = lambda *_: ready.set()  # type: ignore[attr-defined]
    client.on_connect = lambda c, *_: c.subscribe(SHARED_FILTER, qos=1)
    client.connect(host, int(port))
    client.loop_forever()


def _publish_and_wait(
    ctx: Any, args: argparse.Namespace, url: str, received: Callable[[], int], poll_s: float
) -> tuple[float, int, int]:
    """Start the publishers (their payloads built before the clock starts), release them
    together and time until ``received()`` counts every batch (or the timeout); returns
    (seconds, batches counted, batches sent)."""
    devices = [f"bench-{i}" for i in range(args.devices)]
    ready = ctx.Event()
    per_device = args.batches // args.devices
    groups = [devices[i :: args.publishers] for i in range(args.publishers)]
    pubs = [ctx.Process(target=_publisher, args=(url, g, per_device, ready)) for g in groups]
    for p in pubs:
        p.start()
    time.sleep(4)  # publishers built their payloads
    total = per_device * args.devices
    start = time.monotonic()
    ready.set()
    deadline = start + args.timeout_s
    count = 0
    while time.monotonic() < deadline:
        count = received()
        if count >= total:
            break
        time.sleep(poll_s)
    elapsed = time.monotonic() - start
    for p in pubs:
        p.join(30)
    return elapsed, count, total


def run_raw(args: argparse.Namespace, url: str, members: int = 2) -> float:
    """The same batches, the same publishers, received by ``members`` bare subscribers."""
    ctx = mp.get_context("spawn")
    received = ctx.Value("l", 0)
    joined = [ctx.Event() for _ in range(members)]
    procs = [ctx.Process(target=_raw_member, args=(url, j, received)) for j in joined]
    for p in procs:
        p.start()
    for j in joined:
        j.wait(60)
    elapsed, got, total = _publish_and_wait(ctx, args, url, lambda: int(received.value), 0.02)
    for p in procs:
        p.terminate()
        p.join(10)
    rate = got / elapsed
    print(
        f"{'raw paho':10s} {members} bare subscribers: {total} batches in {elapsed:.2f} s "
        f"= {rate:,.0f} batches/s (received and acknowledged, nothing stored)"
    )
    return rate


def _prepare(db_url: str, artifacts: Path, devices: list[str]) -> None:
    from sqlmodel import Session

    from edge_agent.telemetry.drift import TensorDrift
    from fleet_server.artifacts.local import LocalArtifactStore
    from fleet_server.bundles.tables import Bundle
    from fleet_server.database import make_engine
    from fleet_server.devices.tables import Device
    from fleet_server.registry.tables import MLModel, ModelVersion
    from fleet_server.schema import drop_everything, upgrade

    engine = make_engine(db_url)
    drop_everything(engine)
    upgrade(engine)
    now = datetime.now(UTC)
    rng = np.random.default_rng(0)
    with Session(engine) as session:
        model = MLModel(name="bench", created_at=now)
        session.add(model)
        session.flush()
        version = ModelVersion(
            model_id=model.id or 0,
            version="1.0.0",
            source_sha256="0" * 64,
            size=1,
            filename="m.onnx",
            opset=17,
            ir_version=8,
            inputs=[],
            outputs=[],
            created_at=now,
            created_by="bench",
        )
        session.add(version)
        session.flush()
        session.add(
            Bundle(
                sha256=SHA,
                profile="x86-64-avx2",
                runtime="onnxruntime",
                precision="fp32",
                signing_key_id="k",
                size=1,
                created_at=now,
                manifest={},
                model_version_id=version.id or 0,
                cache_key="c",
            )
        )
        for d in devices:
            session.add(
                Device(id=d, profile="x86-64-avx2", enrolled_at=now, secret_hash=uuid.uuid4().hex)
            )
        session.commit()
    engine.dispose()
    x = TensorDrift.build(rng.standard_normal((500, 1, 16)), top1=False)
    probs = TensorDrift.build(rng.random((500, 1, 4)), top1=True)
    baseline = {
        "format": 2,
        "drift": {"inputs": {"x": x.to_json()}, "outputs": {"probs": probs.to_json()}},
    }
    path = LocalArtifactStore(artifacts).path(SHA)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(baseline).encode()
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("baseline.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


class _Stored:
    """Counts the stored batch keys (after a run: the processes' own counts are what the
    clock follows)."""

    def __init__(self, db_url: str) -> None:
        from fleet_server.database import make_engine

        self._engine = make_engine(db_url)

    def __call__(self) -> int:
        from sqlmodel import Session, func, select

        from fleet_server.telemetry.tables import TelemetryBatchKey

        with Session(self._engine) as session:
            return int(session.exec(select(func.count()).select_from(TelemetryBatchKey)).one())

    def close(self) -> None:
        self._engine.dispose()


def run(db_label: str, db_url: str, members: int, args: argparse.Namespace, url: str) -> float:
    ctx = mp.get_context("spawn")
    devices = [f"bench-{i}" for i in range(args.devices)]
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = Path(tmp) / "artifacts"
        _prepare(db_url, artifacts, devices)
        stop, out = ctx.Event(), ctx.Queue()
        joined = [ctx.Event() for _ in range(members)]
        committed = [ctx.Value("l", 0, lock=False) for _ in range(members)]
        procs = [
            ctx.Process(target=_member, args=(db_url, str(artifacts), url, j, stop, out, c))
            for j, c in zip(joined, committed, strict=True)
        ]
        for p in procs:
            p.start()
        for j in joined:  # subscribed: the broker hands them batches from now on
            j.wait(60)
        elapsed, count, total = _publish_and_wait(
            ctx, args, url, lambda: sum(int(c.value) for c in committed), 0.02
        )
        time.sleep(1)
        stored = _Stored(db_url)  # the database's own count, once: every batch, once
        final = stored()
        stored.close()
        stop.set()
        shares = [out.get(timeout=30) for _ in procs]
        for p in procs:
            p.join(30)
    rate = count / elapsed
    status = "all stored once" if final == total else f"STORED {final} of {total}"
    cpu_us = sum(c for _, c in shares) / max(1, sum(n for n, _ in shares)) * 1e6
    print(
        f"{db_label:10s} {members} ingest process(es): {total} batches in {elapsed:.2f} s "
        f"= {rate:,.0f} batches/s ({status}; split {[n for n, _ in shares]}; ingest CPU "
        f"{cpu_us:.0f} µs per batch)"
    )
    return rate


def _postgres_url() -> tuple[str | None, str | None]:
    url = os.environ.get("EDGEFLEET_BENCH_POSTGRES_URL")
    if url:
        return url, None
    name = f"edgefleet_bench_{os.getpid()}"
    ok = subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-qc", f"CREATE DATABASE {name}"],
        capture_output=True,
    )
    if ok.returncode != 0:
        return None, None
    return f"postgresql://postgres@127.0.0.1:5432/{name}", name


class _Mosquitto:
    """mosquitto with an unbounded per-client queue: a backlog waits for the ingest processes
    instead of being shed (the embedded broker sheds past 10,000 queued messages a client,
    which agents make good by resending; this benchmark's publishers do not resend)."""

    def __init__(self, workdir: Path) -> None:
        from fleet_server.broker import free_port

        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        conf = workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            "max_queued_messages 0\nmax_inflight_messages 0\n"
        )
        self._process = subprocess.Popen(
            ["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(0.5)

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=20000)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=300)
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of the bare pair and two ingest processes on PostgreSQL, in turns",
    )
    args = parser.parse_args()
    print(f"one batch: {len(_batch('bench-0', 1, np.random.default_rng(0)))} bytes of JSON")
    results: dict[str, float] = {}
    raw: list[float] = []
    pg2: list[float] = []
    pg_url, pg_name = _postgres_url()
    with tempfile.TemporaryDirectory() as tmp:
        broker = _Mosquitto(Path(tmp))
        try:
            sqlite_url = f"sqlite:///{Path(tmp) / 'bench.db'}"
            for members in (1, 2):
                results[f"sqlitex{members}"] = run("sqlite", sqlite_url, members, args, broker.url)
            if pg_url:
                results["postgresqlx1"] = run("postgresql", pg_url, 1, args, broker.url)
            # The comparison the target is set on, in turns: the bare pair's rate moves by a
            # fifth from one run to the next on a shared 2-core machine.
            for _ in range(max(1, args.rounds)):
                raw.append(run_raw(args, broker.url))
                if pg_url:
                    pg2.append(run("postgresql", pg_url, 2, args, broker.url))
        finally:
            broker.stop()
            if pg_name:
                subprocess.run(
                    [
                        "psql",
                        "-h",
                        "127.0.0.1",
                        "-U",
                        "postgres",
                        "-qc",
                        f"DROP DATABASE IF EXISTS {pg_name} WITH (FORCE)",
                    ],
                    capture_output=True,
                )
    results["raw x2"] = statistics.median(raw)
    summary = "SUMMARY telemetry ingest: " + ", ".join(
        f"{k} {v:,.0f}/s" for k, v in results.items()
    )
    if pg2:
        results["postgresqlx2"] = statistics.median(pg2)
        ratios = [p / r for p, r in zip(pg2, raw, strict=True)]
        summary += (
            f", postgresqlx2 {results['postgresqlx2']:,.0f}/s (medians of {len(raw)} rounds); "
            "two processes vs one on PostgreSQL: "
            f"{results['postgresqlx2'] / results['postgresqlx1']:.2f}x; "
            "two on PostgreSQL vs the bare subscriber pair: "
            f"{statistics.median(ratios):.0%} (median; rounds "
            + ", ".join(f"{r:.0%}" for r in ratios)
            + ")"
        )
    print(summary)


if __name__ == "__main__":
    main()
