"""Several ``edgefleet serve`` processes on one PostgreSQL and one broker, one of them killed
with SIGKILL midway: a build in flight finishes once (taken over when its lease runs out), a
canary in flight completes with every decision once, every status report is stored once
(the share group), and two servers creating overlapping rollouts at the same moment cannot
both pass. Without a kill, two servers stepping the same rollouts take each decision once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from fleet_server.broker import EmbeddedBroker, free_port
from fleet_server.client import ApiClient, ApiError
from fleet_server.database import make_engine
from fleet_server.schema import drop_everything, upgrade
from fleet_server.settings import Settings
from hil.rig import wait_until
from hil.simulator import Behaviour, FleetSimulator, enroll_fleet
from tests.conftest import ADMIN_TOKEN, POSTGRES_URL
from tests.integration.test_rollouts import follow

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not POSTGRES_URL, reason="EDGEFLEET_TEST_POSTGRES_URL is not set (CI sets it)"
    ),
]


class Servers:
    """``edgefleet serve`` processes sharing a database, a broker and a data directory (as
    they would share an object store and a key vault)."""

    def __init__(self, tmp_path: Path, broker: EmbeddedBroker, n: int) -> None:
        assert POSTGRES_URL is not None
        self.logs = [tmp_path / f"server-{i}.log" for i in range(n)]
        env = {
            **os.environ,
            "EDGEFLEET_DATA_DIR": str(tmp_path / "shared"),
            "EDGEFLEET_DATABASE_URL": POSTGRES_URL,
            "EDGEFLEET_MQTT_URL": broker.url,
            "EDGEFLEET_ADMIN_TOKEN": ADMIN_TOKEN,
            "EDGEFLEET_ROLLOUT_TICK_S": "0.2",
            "EDGEFLEET_BUILD_LEASE_S": "3",
        }
        self.processes: list[subprocess.Popen[bytes]] = []
        self.apis: list[ApiClient] = []
        for log_path in self.logs:
            port = free_port()
            with log_path.open("wb") as log:
                self.processes.append(subprocess.Popen(
                    [sys.executable, "-c", "from fleet_server.cli import main; main()", "serve"],
                    env={**env, "EDGEFLEET_PORT": str(port)}, stdout=log,
                    stderr=subprocess.STDOUT,
                ))  # fmt: skip
            api = ApiClient(f"http://127.0.0.1:{port}", ADMIN_TOKEN, timeout_s=120)
            wait_until(lambda a=api: server_healthy(a), 60, f"server on port {port}")  # type: ignore[misc]
            self.apis.append(api)

    def stop(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.processes:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        for api in self.apis:
            api.close()
        for log_path in self.logs:
            print(log_path.read_text()[-3000:])


def server_healthy(api: ApiClient) -> bool:
    try:
        return bool(api.get("/healthz")["broker_connected"])
    except Exception:
        return False


def _fresh_schema() -> None:
    assert POSTGRES_URL is not None
    engine = make_engine(Settings(database_url=POSTGRES_URL).resolved_database_url)
    drop_everything(engine)
    upgrade(engine)
    engine.dispose()


def _rows(query: str) -> list[Any]:
    assert POSTGRES_URL is not None
    engine = make_engine(Settings(database_url=POSTGRES_URL).resolved_database_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(query)).all())
    finally:
        engine.dispose()


def test_a_server_killed_midway_leaves_no_half_made_decision(
    tmp_path: Path, model_path: Path, model_v2_path: Path, uid: str
) -> None:
    _fresh_schema()
    broker = EmbeddedBroker(tmp_path / "broker", backend="mosquitto").start()
    servers: Servers | None = None
    sim: FleetSimulator | None = None
    try:
        servers = Servers(tmp_path, broker, 2)
        one, two = servers.apis
        one.upload_model(model_path, "classifier", "1.0.0")
        one.upload_model(model_v2_path, "classifier", "2.0.0")
        devices = enroll_fleet(two, 30, prefix=f"k9-{uid}", labels={"ring": uid})
        sim = FleetSimulator(broker.url, devices, default=Behaviour(install_s=0.3),
                             root_public_key=devices[0].root_public_key).start()  # fmt: skip
        first = one.post("/v1/rollouts", json={"model": "classifier", "version": "1.0.0",
                                               "selector": f"ring={uid}"})  # fmt: skip
        assert follow(two, first["id"], timeout_s=120)["state"] == "completed"

        # Two servers asked at the same moment for rollouts whose cohorts overlap: one only.
        ids = [d.device_id for d in devices[:5]]
        for attempt in range(4):
            body = {"model": "classifier", "version": "1.0.0", "devices": ids,
                    "slot": f"race-{attempt}", "strategy": "canary", "stages": [20, 100],
                    "manual_approval": True}  # fmt: skip
            answers = _at_once(
                [lambda a=api, b=body: a.post("/v1/rollouts", json=b) for api in (one, two)]
            )
            made = [a for a in answers if isinstance(a, dict)]
            refused = [a for a in answers if isinstance(a, ApiError)]
            assert len(made) == 1 and len(refused) == 1, answers
            assert refused[0].reason == "overlapping_rollout", refused[0]
            one.post(f"/v1/rollouts/{made[0]['id']}/abort", json={"reason": "race test"})

        # A canary in flight, and a build running, when the build's server is killed.
        canary = two.post("/v1/rollouts", json={
            "model": "classifier", "version": "2.0.0", "selector": f"ring={uid}",
            "strategy": "canary", "stages": [10, 40, 100], "bake_s": 1,
        })  # fmt: skip
        # A TFLite build (onnx2tf in its own process) takes long enough to be caught running.
        build = one.post(
            "/v1/builds", json={"model": "classifier", "version": "2.0.0",
                                "profile": "raspberry-pi-4"},
        )  # fmt: skip
        running = wait_until(
            lambda: (b := one.get(f"/v1/builds/{build['id']}"))["state"] == "running" and b,
            60, "the build to run", 0.02,
        )  # fmt: skip
        pid = int(running["claimed_by"].split(":")[1])
        victim = next(p for p in servers.processes if p.pid == pid)
        survivor = servers.apis[1 - servers.processes.index(victim)]
        assert survivor.get(f"/v1/rollouts/{canary['id']}")["state"] == "in_progress"
        victim.kill()
        victim.wait(10)

        finished = wait_until(
            lambda: (b := survivor.get(f"/v1/builds/{build['id']}"))["state"]
            in ("succeeded", "failed") and b,
            120, "the build to be taken over and finish", 0.2,
        )  # fmt: skip
        assert finished["state"] == "succeeded", finished
        assert finished["claimed_by"] != running["claimed_by"]
        assert finished["attempts"] == 2
        log = survivor.get(f"/v1/builds/{build['id']}/log")["text"]
        assert "taken over by" in log, log
        bundles = _rows(
            "SELECT count(*) FROM bundles b JOIN builds d ON d.bundle_sha256 = b.sha256 "
            f"WHERE d.id = '{build['id']}'"
        )
        assert bundles[0][0] == 1

        done = follow(survivor, canary["id"], timeout_s=120)
        assert done["state"] == "completed", done["events"]
        kinds = [e["kind"] for e in done["events"]]
        assert kinds.count("created") == 1 and kinds.count("completed") == 1, kinds
        assert [e["stage"] for e in done["events"] if e["kind"] == "promoted"] == [1, 2], kinds
        wait_until(lambda: sim.serving("classifier") == {"2.0.0": 30}, 60, "the fleet on 2.0.0")

        # Each reported transition was stored once, by one server or the other.
        duplicated = _rows(
            "SELECT device_id, slot, to_state, at, count(*) FROM device_transitions "
            "GROUP BY device_id, slot, to_state, at HAVING count(*) > 1"
        )
        assert duplicated == []
        stored = _rows("SELECT count(*) FROM device_transitions")[0][0]
        assert stored >= 30 * 2  # at least two versions' commits per device
    finally:
        if sim is not None:
            sim.stop()
        if servers is not None:
            servers.stop()
        broker.stop()


def test_two_server_processes_never_both_act_on_a_rollout(
    tmp_path: Path, model_path: Path, model_v2_path: Path, uid: str
) -> None:
    """Every decision of every rollout is in its history once, and the fleet ends where the
    rollouts say."""
    _fresh_schema()
    broker = EmbeddedBroker(tmp_path / "broker", backend="mosquitto").start()
    servers: Servers | None = None
    sim: FleetSimulator | None = None
    try:
        servers = Servers(tmp_path, broker, 2)
        one, two = servers.apis
        one.upload_model(model_path, "classifier", "1.0.0")
        one.upload_model(model_v2_path, "classifier", "2.0.0")
        devices = enroll_fleet(two, 40, prefix=f"pg-{uid}", labels={"ring": uid})
        sim = FleetSimulator(broker.url, devices, default=Behaviour(install_s=0.05),
                             root_public_key=devices[0].root_public_key).start()  # fmt: skip
        rollouts = []
        for version, api in (("1.0.0", one), ("2.0.0", two)):
            created = api.post(
                "/v1/rollouts",
                json={"model": "classifier", "version": version, "selector": f"ring={uid}",
                      "strategy": "canary", "stages": [5, 10, 25, 50, 75, 100]},
            )  # fmt: skip
            rollouts.append(follow(one, created["id"], timeout_s=120))
        for done in rollouts:
            assert done["state"] == "completed", done["events"]
            kinds = [e["kind"] for e in done["events"]]
            assert kinds.count("promoted") == 5 and kinds.count("completed") == 1, kinds
            promoted = [e["stage"] for e in done["events"] if e["kind"] == "promoted"]
            assert promoted == [1, 2, 3, 4, 5]
        assert sim.serving("classifier") == {"2.0.0": 40}
        actors = {e["actor"] for r in rollouts for e in r["events"] if e["kind"] == "promoted"}
        print(f"decisions taken by {sorted(actors)}")
    finally:
        if sim is not None:
            sim.stop()
        if servers is not None:
            servers.stop()
        broker.stop()


def _at_once(calls: list[Any]) -> list[Any]:
    """Run the calls in threads released together; each answer, or the ApiError raised."""
    barrier = threading.Barrier(len(calls))
    answers: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            answers[i] = calls[i]()
        except ApiError as e:
            answers[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return answers
