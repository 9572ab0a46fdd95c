"""Rollout at fleet scale: how long until N devices serve a new version, what it costs the
server, and how long a gate breach takes to put all of them back.

One run, on the real parts: ``edgefleet serve`` as its own process (SQLite, or PostgreSQL
with ``--database-url``), a private Mosquitto, and the fleet simulator (``hil.simulator``)
holding N MQTT connections with N enrolled identities in this process. Figures:

- **rollout**: from ``POST /v1/rollouts`` (all at once, no rate limit) until every device
  serves the version, as the devices see it and as the server reports it;
- **server CPU seconds** during it (``/proc/<pid>/stat``), in all and per 1,000 devices, and
  the broker's;
- **rollback**: a second version whose telemetry shows a 30 % error rate trips the
  ``max_error_rate`` gate after its bake time; from the breach (the event's time) until
  every device serves the first version again;
- **status lag**: from every device active (as the devices see it) until the server's
  stored reports say so;
- **raw fan-out** (``raw_fanout_s``), the same machine's floor: last, the same number of
  signed documents (signed beforehand with the server's key, a new ``seq`` each, naming the
  second version) published by this process straight to the same broker and simulator, with
  no server in between, until every device is active. The rollout's ``active_s`` is
  compared with it;
- where the server's time goes: the engine logs each large step (read, decide + sign +
  stage, commit, publish).

Server CPU counts the API process and its ingest processes. It ends with one JSON line.

    .venv/bin/python bench/rollout_scale.py --devices 1000 10000 [--database-url URL]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.served import TICKS, cpu_s, start_serve
from converters.onnx.samples import mlp_classifier
from fleet_server.broker import EmbeddedBroker
from fleet_server.client import ApiClient
from hil.rig import wait_until
from hil.simulator import Behaviour, FleetSimulator, enroll_fleet

TOKEN = "efa_bench-admin-token-0123456789abcdef0123456789"


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and its children (the server's ingest processes)."""
    total = cpu_s(pid)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def raw_fanout(
    work: Path,
    database_url: str | None,
    broker_url: str,
    sim: FleetSimulator,
    n: int,
    version: str,
) -> float:
    """Sign a new document per device naming ``version`` (untimed), then time publishing
    them straight to the broker until every simulated device is active."""
    from sqlmodel import Session, select

    from edge_agent.protocol.topics import Topics
    from fleet_server.bundles.tables import Bundle
    from fleet_server.database import make_engine
    from fleet_server.devices import desired
    from fleet_server.devices.tables import Device
    from fleet_server.keys.service import ServerKeys
    from fleet_server.registry.service import get_version
    from fleet_server.rollouts.notifier import slot_assignment
    from fleet_server.settings import Settings

    settings = Settings(data_dir=work / "server", database_url=database_url)
    engine = make_engine(settings.resolved_database_url)
    with Session(engine) as session:
        model, mv = get_version(session, "classifier", version)
        bundle = session.exec(select(Bundle).where(Bundle.model_version_id == mv.id)).first()
        assert bundle is not None
        assignment = slot_assignment("http://127.0.0.1", model, mv, bundle, None)
        ids = list(session.exec(select(Device.id)).all())
        signer = ServerKeys(settings.keys_dir).signer(session)
        documents = desired.change_many(
            session, {d: {"classifier": assignment} for d in ids}, ttl_s=86400, signer=signer
        )
        session.rollback()  # the server never hears of these
    engine.dispose()
    # Published by a process of its own, as the server publishes from its own: the simulator
    # holds this process's interpreter.
    messages = [(Topics(d.device_id).desired, d.payload) for d in documents.values()]
    ctx = multiprocessing.get_context("spawn")
    ready, start = ctx.Event(), ctx.Event()
    publisher = ctx.Process(target=_publish_raw, args=(broker_url, messages, ready, start))
    publisher.start()
    try:
        ready.wait(60)  # connected, payloads in hand
        t = time.perf_counter()
        start.set()
        wait_until(
            lambda: sim.serving("classifier").get(version) == n,
            600,
            f"every device to serve {version} from the raw publish",
            interval_s=0.05,
        )
        return time.perf_counter() - t
    finally:
        publisher.join(60)


def _publish_raw(
    broker_url: str, messages: list[tuple[str, bytes]], ready: Any, start: Any
) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    host, port = broker_url.split("://", 1)[1].rsplit(":", 1)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-raw", protocol=mqtt.MQTTv5)
    client.connect(host, int(port))
    client.loop_start()
    ready.set()
    start.wait(60)
    infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
    for info in infos:
        info.wait_for_publish(60)
    client.loop_stop()
    client.disconnect()


def run(
    n: int, database_url: str | None, work: Path, ingest_processes: int | None
) -> dict[str, Any]:
    broker = EmbeddedBroker(work / "broker", backend="mosquitto").start()
    settings = {
        "EDGEFLEET_DATA_DIR": str(work / "server"),
        "EDGEFLEET_MQTT_URL": broker.url,
        "EDGEFLEET_TELEMETRY_BUCKET_S": "10",
    }
    if database_url:
        settings["EDGEFLEET_DATABASE_URL"] = database_url
    if ingest_processes is not None:
        settings["EDGEFLEET_INGEST_PROCESSES"] = str(ingest_processes)
    log_path = work / "server.log"
    try:
        server, api = start_serve(settings, TOKEN, log_path)
    except BaseException:
        broker.stop()
        raise
    sim: FleetSimulator | None = None
    try:
        wait_until(lambda: _healthy(api), 60, "the server")
        api.upload_model(mlp_classifier(work / "v1.onnx", seed=1), "classifier", "1.0.0")
        api.upload_model(mlp_classifier(work / "v2.onnx", seed=2), "classifier", "2.0.0")
        for version in ("1.0.0", "2.0.0"):  # built before the clock starts
            build = api.post(
                "/v1/builds",
                json={"model": "classifier", "version": version, "profile": "x86-64-avx2"},
            )
            wait_until(
                lambda b=build: api.get(f"/v1/builds/{b['id']}")["state"] == "succeeded",
                300,
                f"the {version} build",
            )
        t = time.perf_counter()
        devices = enroll_fleet(api, n, prefix=f"b{n}", labels={"fleet": "bench"}, workers=8)
        enroll_s = time.perf_counter() - t
        sim = FleetSimulator(
            broker.url,
            devices,
            root_public_key=devices[0].root_public_key,
            default=Behaviour(install_s=0.0),
            # A bad version serves with 30 % errors; telemetry every 10 s from about 1,000
            # devices keeps ingest near 100 batches a second.
            behaviours={
                "2.0.0": Behaviour(install_s=0.0, error_rate=0.3, requests_per_interval=20)
            },
            telemetry_interval_s=10.0,
            status_interval_s=30.0,
            telemetry_share=min(1.0, 1000 / n),  # telemetry from about 1,000 devices
            resend_after_s=60,
        )
        t = time.perf_counter()
        sim.start(connect_timeout_s=600)
        connect_s = time.perf_counter() - t

        server_cpu0, api_cpu0 = tree_cpu_s(server.pid), cpu_s(server.pid)
        broker_cpu0, sim_cpu0 = _broker_cpu(broker), own_cpu_s()
        t = time.perf_counter()
        first = api.post(
            "/v1/rollouts",
            json={"model": "classifier", "version": "1.0.0", "selector": "fleet=bench"},
            params={"targets": "false"},
        )
        created_s = time.perf_counter() - t
        wait_until(
            lambda: sim.serving("classifier").get("1.0.0") == n,
            600,
            "every device to serve 1.0.0",
            interval_s=0.2,
        )
        devices_active_s = time.perf_counter() - t
        # Watched in the database, not through GET /v1/rollouts/{id}: describing a 10,000
        # device rollout several times a second would load the server being measured.
        probe = Probe(
            settings.get("EDGEFLEET_DATABASE_URL")
            or f"sqlite:///{work / 'server' / 'edgefleet.db'}"
        )
        wait_until(lambda: probe.serving("1.0.0") == n, 600, "the server to see it", 0.1)
        status_lag_s = time.perf_counter() - t - devices_active_s
        wait_until(lambda: probe.ended(first["id"]), 600, "the rollout to complete", 0.1)
        server_done_s = time.perf_counter() - t
        done = api.get(f"/v1/rollouts/{first['id']}", params={"targets": "false"})
        server_cpu = tree_cpu_s(server.pid) - server_cpu0
        api_cpu = cpu_s(server.pid) - api_cpu0
        broker_cpu = _broker_cpu(broker) - broker_cpu0
        sim_cpu = own_cpu_s() - sim_cpu0

        second = api.post(
            "/v1/rollouts",
            json={
                "model": "classifier",
                "version": "2.0.0",
                "selector": "fleet=bench",
                "bake_s": 15,
                "gates": {"max_error_rate": 0.05, "min_requests": 200},
            },
        )
        wait_until(
            lambda: sim.serving("classifier").get("2.0.0") == n,
            600,
            "every device to serve 2.0.0",
            interval_s=0.2,
        )
        # The simulator alone is watched until every device is back (the server is left to
        # its work); then the breach's time is read from the rollout's history.
        wait_until(
            lambda: probe.ended(second["id"]) and sim.serving("classifier").get("1.0.0") == n,
            900,
            "the gate breach and every device back on 1.0.0",
            interval_s=0.05,
        )
        back_at = time.time()
        aborted = api.get(f"/v1/rollouts/{second['id']}", params={"targets": "false"})
        breach = next(e for e in aborted["events"] if e["kind"] == "gate_breach")
        rollback_s = back_at - datetime.fromisoformat(breach["at"]).timestamp()
        probe.close()
        raw_fanout_s = raw_fanout(work, database_url, broker.url, sim, n, "2.0.0")
        steps = re.findall(
            r"(\d+) documents in ([\d.]+) s \(read \+ bundles ([\d.]+) s, decide \+ sign \+ "
            r"stage ([\d.]+) s, commit ([\d.]+) s, publish ([\d.]+) s\)",
            log_path.read_text(),
        )
        return {
            "devices": n,
            "database": "postgresql" if database_url else "sqlite",
            "enroll_s": enroll_s,
            "connect_s": connect_s,
            "create_s": created_s,
            "devices_active_s": devices_active_s,
            "status_lag_s": status_lag_s,
            "raw_fanout_s": raw_fanout_s,
            "server_completed_s": server_done_s,
            "server_cpu_s": server_cpu,
            "api_cpu_s": api_cpu,
            "broker_cpu_s": broker_cpu,
            "simulator_cpu_s": sim_cpu,
            "state": done["state"],
            "breach": breach["message"],
            "rollback_s": rollback_s,
            "aborted_state": aborted["state"],
            "steps": steps,
            "statuses_sent": sim.statuses_sent,
            "refused": dict(sim.refused),
        }
    finally:
        if sim is not None:
            sim.stop()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        broker.stop()
        api.close()


def _broker_cpu(broker: EmbeddedBroker) -> float:
    process = getattr(broker, "_process", None)
    return cpu_s(process.pid) if process is not None else float("nan")


def _healthy(api: ApiClient) -> bool:
    try:
        return bool(api.get("/healthz")["broker_connected"])
    except Exception:
        return False


class Probe:
    """What the server has stored, read straight from its database."""

    def __init__(self, url: str) -> None:
        from sqlalchemy import create_engine

        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        self._engine = create_engine(url)
        self._pg = url.startswith("postgresql")

    def serving(self, version: str) -> int:
        """Devices whose stored report has ``version`` committed in the classifier slot."""
        from sqlalchemy import text

        if self._pg:
            state = "reported->'slots'->'classifier'->>'state'"
            active = "reported->'slots'->'classifier'->'active'->>'version'"
        else:
            state = "json_extract(reported, '$.slots.classifier.state')"
            active = "json_extract(reported, '$.slots.classifier.active.version')"
        query = text(f"SELECT count(*) FROM devices WHERE {state} = 'COMMITTED' AND {active} = :v")
        with self._engine.connect() as conn:
            return int(conn.execute(query, {"v": version}).scalar_one())

    def ended(self, rollout_id: str) -> bool:
        from sqlalchemy import text

        with self._engine.connect() as conn:
            state = conn.execute(
                text("SELECT state FROM rollouts WHERE id = :id"), {"id": rollout_id}
            ).scalar_one()
        return state in ("completed", "failed", "aborted")

    def close(self) -> None:
        self._engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--database-url", help="PostgreSQL URL (default: SQLite)")
    parser.add_argument(
        "--ingest-processes", type=int, help="the server's (default: its own default)"
    )
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results = []
    for n in args.devices:
        with tempfile.TemporaryDirectory(prefix="rollout-bench-") as tmp:
            r = run(n, args.database_url, Path(tmp), args.ingest_processes)
        results.append(r)
        print(f"\n== {n} devices ({r['database']}) ==")
        print(f"enroll {r['enroll_s']:.1f} s, simulator connect {r['connect_s']:.1f} s")
        print(
            f"rollout: POST answered in {r['create_s']:.2f} s; every device active after "
            f"{r['devices_active_s']:.2f} s; the server's stored reports say so "
            f"{r['status_lag_s']:.2f} s later; server reports completed after "
            f"{r['server_completed_s']:.2f} s ({r['state']})"
        )
        print(
            f"raw fan-out (the same documents straight to the broker): {r['raw_fanout_s']:.2f} s;"
            f" the rollout took {r['devices_active_s'] / r['raw_fanout_s']:.1f}x that"
        )
        per_k = r["server_cpu_s"] / (n / 1000)
        print(
            f"CPU: server {r['server_cpu_s']:.2f} s ({per_k:.2f} s per 1,000 devices; the API "
            f"process {r['api_cpu_s']:.2f} s, its ingest processes the rest), "
            f"broker {r['broker_cpu_s']:.2f} s, simulator {r['simulator_cpu_s']:.2f} s; "
            f"{r['statuses_sent']} status reports"
        )
        for docs, total, read, decide, commit, publish in r["steps"]:
            print(
                f"  engine step: {docs} documents in {total} s: read + bundles {read} s, "
                f"decide + sign + stage {decide} s, commit {commit} s, publish {publish} s"
            )
        print(f"gate breach: {r['breach']}")
        print(
            f"rollback: every device back on 1.0.0 {r['rollback_s']:.2f} s after the breach "
            f"({r['aborted_state']})"
        )
        if r["refused"]:
            print(f"devices refused documents: {r['refused']}")
    summary = "; ".join(
        f"{r['devices']} devices: active in {r['devices_active_s']:.1f} s, rollback "
        f"{r['rollback_s']:.1f} s, server {r['server_cpu_s'] / (r['devices'] / 1000):.2f} "
        "CPU-s/1k"
        for r in results
    )
    print(f"\nsummary: {summary}")
    for r in results:
        print(
            json.dumps(
                {
                    "devices": r["devices"],
                    "database": r["database"],
                    "active_s": round(r["devices_active_s"], 2),
                    "raw_fanout_s": round(r["raw_fanout_s"], 2),
                    "completed_s": round(r["server_completed_s"], 2),
                    "rollback_s": round(r["rollback_s"], 2),
                    "server_cpu_s_per_1000": round(r["server_cpu_s"] / (r["devices"] / 1000), 2),
                    "status_lag_s": round(r["status_lag_s"], 2),
                    "create_s": round(r["create_s"], 2),
                }
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
