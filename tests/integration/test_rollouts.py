"""The rollout engine with real agents on a real broker: staged canaries, gates that trip on
what the devices report (install failures on one profile, a latency regression, drift), fleet
rollback to the previous version, a dynamic cohort, offline devices, restarts of the server and
the broker mid-rollout, and two server processes on one PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from converters.onnx.samples import slow_classifier
from fleet_server.broker import EmbeddedBroker, free_port
from fleet_server.client import ApiClient
from fleet_server.server import EmbeddedStack
from fleet_server.settings import Settings
from hil.rig import LocalAgent, wait_until

pytestmark = pytest.mark.slow

#: Agents report telemetry every half second, so gates have figures within a bake of seconds.
TELEMETRY = "[telemetry]\ninterval_s = 0.5\ncheckpoint_s = 0.25\nmin_sample_rate = 1.0\n"
FINISHED = {"completed", "failed", "aborted", "superseded"}

#: A Raspberry Pi whose runtime computes wrong results (a broken delegate): loaded before the
#: agent, it shifts every float output of LiteRT and onnxruntime on that device only.
BROKEN_RUNTIME = """
import numpy as np

def _shift(value):
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return value + np.float32(0.5)
    return value

try:
    import onnxruntime as _ort
    _run = _ort.InferenceSession.run
    _ort.InferenceSession.run = lambda self, *a, **k: [_shift(v) for v in _run(self, *a, **k)]
except ImportError:
    pass
try:
    from ai_edge_litert import interpreter as _lrt
    _get = _lrt.Interpreter.get_tensor
    _lrt.Interpreter.get_tensor = lambda self, i, *a: _shift(_get(self, i, *a))
except ImportError:
    pass
"""


def start_fleet(
    api: ApiClient,
    stack: EmbeddedStack,
    root: Path,
    fleet: list[tuple[str, str, dict[str, str]]],
    *,
    probation: str = "",
    env: dict[str, dict[str, str]] | None = None,
) -> list[LocalAgent]:
    agents = []
    for device_id, profile, labels in fleet:
        token = api.post("/v1/enrollment-tokens", json={"profile": profile})["token"]
        agent = LocalAgent(root, device_id, profile, probation=probation)
        agent.enroll(stack.url, token, labels)
        agent.configure(TELEMETRY)
        agent.start(env=(env or {}).get(device_id))
        agents.append(agent)
    for agent in agents:
        agent.wait_ready()
    return agents


def follow(api: ApiClient, rollout_id: str, timeout_s: float = 90) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        r: dict[str, Any] = api.get(f"/v1/rollouts/{rollout_id}")
        return r if r["state"] in FINISHED else None

    try:
        return wait_until(ended, timeout_s, f"rollout {rollout_id} to end", interval_s=0.2)
    except TimeoutError as e:
        r = api.get(f"/v1/rollouts/{rollout_id}", params={"targets": "false"})
        stages = [(s["state"], s["counts"]) for s in r["stages"]]
        raise TimeoutError(f"{e}: {r['state']} stage {r['stage']}, {stages}, gates {r['gates']}, "
                           f"events {[ev['kind'] for ev in r['events']]}") from None  # fmt: skip


def kinds(rollout: dict[str, Any]) -> list[str]:
    return [e["kind"] for e in rollout["events"]]


@contextmanager
def traffic(
    agents: list[LocalAgent], make: Callable[[np.random.Generator], np.ndarray]
) -> Iterator[None]:
    """Requests to every agent's model in the background (what a gate judges)."""
    stop = threading.Event()

    def send(agent: LocalAgent, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            try:
                agent.client.predict("classifier", {"x": make(rng)})
            except Exception:
                time.sleep(0.05)  # mid-swap or restarting: the next request goes on

    threads = [
        threading.Thread(target=send, args=(a, i), daemon=True) for i, a in enumerate(agents)
    ]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)


def normal(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((1, 16)).astype(np.float32)


def notified(api: ApiClient, rollout_id: str, stage: int, n: int) -> dict[str, Any] | None:
    """The rollout, once ``n`` devices of ``stage`` have been notified."""
    rollout: dict[str, Any] = api.get(f"/v1/rollouts/{rollout_id}")
    return rollout if rollout["stages"][stage]["counts"]["notified"] == n else None


def all_at_once(api: ApiClient, version: str, selector: str) -> dict[str, Any]:
    rollout = api.post(
        "/v1/rollouts", json={"model": "classifier", "version": version, "selector": selector}
    )
    done = follow(api, rollout["id"])
    assert done["state"] == "completed", done
    return done


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_good_model_rolls_through_four_stages(
    stack: EmbeddedStack, api: ApiClient, model_path: Path, model_v2_path: Path, tmp_path: Path,
    uid: str,
) -> None:  # fmt: skip
    api.upload_model(model_path, "classifier", "1.0.0")
    api.upload_model(model_v2_path, "classifier", "1.1.0")
    fleet = [(f"can-{i}-{uid}", "x86-64-avx2", {"ring": uid}) for i in range(4)]
    agents = start_fleet(api, stack, tmp_path / "devices", fleet)
    try:
        all_at_once(api, "1.0.0", f"ring={uid}")
        rollout = api.post(
            "/v1/rollouts",
            json={
                "model": "classifier",
                "version": "1.1.0",
                "selector": f"ring={uid}",
                "strategy": "canary",
                "stages": [25, 50, 75, 100],
                "bake_s": 0.5,
            },
        )
        # The POST answers before the engine notifies; the first stage is one device of four.
        assert rollout["stages"][0]["counts"]["targeted"] == 1
        first = wait_until(
            lambda: notified(api, rollout["id"], 0, 1), 30, "the first stage notified", 0.05
        )
        # ... and the others have not been told.
        assert first["counts"]["waiting"] == 3
        done = follow(api, rollout["id"])
        assert done["state"] == "completed", done
        assert kinds(done).count("promoted") == 3 and kinds(done)[-1] == "completed"
        assert [s["counts"]["targeted"] for s in done["stages"]] == [1, 1, 1, 1]
        assert all(s["state"] == "passed" for s in done["stages"][:3])
        for agent in agents:
            assert (agent.serving("classifier") or {})["version"] == "1.1.0"
        # Each stage began only after the one before it had every device serving.
        promoted = [e for e in done["events"] if e["kind"] == "promoted"]
        assert [e["stage"] for e in promoted] == [1, 2, 3]
        audit = api.get("/v1/audit", params={"target": rollout["id"]})
        assert {"rollout.create", "rollout.promote", "rollout.completed"} <= {
            a["action"] for a in audit
        }
    finally:
        for agent in agents:
            agent.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_self_test_failure_on_one_profile_rolls_the_fleet_back(
    stack: EmbeddedStack, api: ApiClient, model_path: Path, model_v2_path: Path, tmp_path: Path,
    uid: str,
) -> None:  # fmt: skip
    api.upload_model(model_path, "classifier", "1.0.0")
    api.upload_model(model_v2_path, "classifier", "1.1.0")
    site = tmp_path / "broken-runtime"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BROKEN_RUNTIME)
    fleet = [(f"x86-{i}-{uid}", "x86-64-avx2", {"ring": uid}) for i in range(3)]
    pi = f"pi-{uid}"
    agents = start_fleet(api, stack, tmp_path / "devices", fleet)
    # A Raspberry Pi in the cohort whose runtime computes wrong answers: every version fails
    # its self-test there.
    agents += start_fleet(api, stack, tmp_path / "devices",
                          [(pi, "raspberry-pi-4", {"ring": uid})],
                          env={pi: {"PYTHONPATH": str(site)}})  # fmt: skip
    try:
        all_at_once(api, "1.0.0", f"ring={uid},profile=x86-64-avx2")
        rollout = api.post(
            "/v1/rollouts",
            json={
                "model": "classifier",
                "version": "1.1.0",
                "selector": f"ring={uid}",
                "strategy": "canary",
                "stages": [50, 100],
            },
        )
        done = follow(api, rollout["id"], timeout_s=240)
        assert done["state"] == "aborted", done
        breach = next(e for e in done["events"] if e["kind"] == "gate_breach")
        assert breach["figures"]["breached"][0]["gate"] == "max_install_failure_pct"
        assert "max_install_failure_pct" in done["reason"]
        pi_target = next(t for t in done["targets"] if t["device_id"] == pi)
        assert pi_target["error"]["reason"] == "selftest_failed", pi_target
        # The x86 devices serve 1.0.0 again (those that took 1.1.0 were given 1.0.0 back); the
        # Pi, which had nothing in the slot before, has the slot taken away.
        for agent in agents[:3]:
            agent.wait_serving("classifier", "1.0.0", timeout_s=30)
        assert "rollback" in kinds(done)
        wait_until(lambda: not agents[3].client.models(), 30, "the Pi's slot to be removed")
    finally:
        for agent in agents:
            agent.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_5x_latency_regression_trips_its_gate(
    stack: EmbeddedStack, api: ApiClient, model_path: Path, tmp_path: Path, uid: str
) -> None:
    api.upload_model(model_path, "classifier", "1.0.0")
    api.upload_model(slow_classifier(tmp_path / "slow.onnx", seed=3), "classifier", "1.1.0")
    fleet = [(f"lat-{i}-{uid}", "x86-64-avx2", {"ring": uid}) for i in range(2)]
    # The agents' own probation would catch this too; here only the fleet gate is to.
    agents = start_fleet(api, stack, tmp_path / "devices", fleet,
                         probation="max_latency_ratio = 1000\n")  # fmt: skip
    try:
        with traffic(agents, normal):
            all_at_once(api, "1.0.0", f"ring={uid}")
            time.sleep(2)  # the previous version's latency reaches the server
            rollout = api.post(
                "/v1/rollouts",
                json={
                    "model": "classifier",
                    "version": "1.1.0",
                    "selector": f"ring={uid}",
                    "strategy": "canary",
                    "stages": [50, 100],
                    "bake_s": 3,
                    "gates": {"max_latency_ratio": 5.0, "max_install_failure_pct": 0,
                              "min_requests": 20},
                },
            )  # fmt: skip
            done = follow(api, rollout["id"])
        assert done["state"] == "aborted", done
        breach = next(e for e in done["events"] if e["kind"] == "gate_breach")
        figure = breach["figures"]["breached"][0]
        assert figure["gate"] == "max_latency_ratio" and figure["value"] > 5, figure
        for agent in agents:
            agent.wait_serving("classifier", "1.0.0", timeout_s=30)
        # Only the first stage took it.
        assert done["counts"]["reverted"] == 1 and done["counts"]["released"] == 1, done["counts"]
    finally:
        for agent in agents:
            agent.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_drifting_inputs_trip_the_drift_gate(
    stack: EmbeddedStack, api: ApiClient, model_path: Path, model_v2_path: Path, tmp_path: Path,
    uid: str,
) -> None:  # fmt: skip
    rng = np.random.default_rng(7)
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, x=rng.standard_normal((2000, 1, 16)).astype(np.float32))
    api.upload_model(model_path, "classifier", "1.0.0")
    api.upload_model(model_v2_path, "classifier", "1.1.0", calibration=calibration)
    fleet = [(f"drift-{uid}", "x86-64-avx2", {"ring": uid})]
    agents = start_fleet(api, stack, tmp_path / "devices", fleet)

    def shifted(rng: np.random.Generator) -> np.ndarray:
        x = rng.standard_normal((1, 16)).astype(np.float32)
        x[:, 5] += 1.5
        return x

    try:
        all_at_once(api, "1.0.0", f"ring={uid}")
        with traffic(agents, shifted):
            rollout = api.post(
                "/v1/rollouts",
                json={
                    "model": "classifier",
                    "version": "1.1.0",
                    "selector": f"ring={uid}",
                    "strategy": "canary",
                    "stages": [100],
                    "bake_s": 4,
                    # An unrelated model (another seed): its predictions differ from 1.0.0's,
                    # which the prediction gate would catch first; this test is about drift.
                    "gates": {"max_psi": 0.25, "min_requests": 300, "max_prediction_shift": None},
                },
            )
            done = follow(api, rollout["id"])
        assert done["state"] == "aborted", done
        figure = next(e for e in done["events"] if e["kind"] == "gate_breach")["figures"][
            "breached"
        ][0]
        assert figure["gate"] == "max_psi" and figure["value"] > 0.25, figure
        agents[0].wait_serving("classifier", "1.0.0", timeout_s=30)
    finally:
        for agent in agents:
            agent.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_cohort_is_dynamic_and_offline_devices_catch_up(
    stack: EmbeddedStack, api: ApiClient, model_path: Path, tmp_path: Path, uid: str
) -> None:
    """A device enrolled mid-rollout with matching labels gets the version; one relabelled out
    is released; one offline through its stage times out without blocking, then catches up."""
    api.upload_model(model_path, "classifier", "1.0.0")
    fleet = [(f"dyn-{i}-{uid}", "x86-64-avx2", {"ring": uid}) for i in range(2)]
    agents = start_fleet(api, stack, tmp_path / "devices", fleet)
    offline = agents[1]
    offline.stop()
    try:
        rollout = api.post(
            "/v1/rollouts",
            json={
                "model": "classifier",
                "version": "1.0.0",
                "selector": f"ring={uid},!exempt",
                "strategy": "canary",
                "stages": [100],
                "stage_timeout_s": 4,
                "manual_approval": False,
                "gates": {"max_install_failure_pct": 0, "max_timed_out_pct": 50},
            },
        )
        agents[0].wait_serving("classifier", "1.0.0")
        # A newcomer with the cohort's labels joins while the rollout runs.
        [late] = start_fleet(api, stack, tmp_path / "devices",
                             [(f"dyn-late-{uid}", "x86-64-avx2", {"ring": uid})])  # fmt: skip
        agents.append(late)
        late.wait_serving("classifier", "1.0.0", timeout_s=30)
        current = api.get(f"/v1/rollouts/{rollout['id']}")
        assert "device_joined" in kinds(current)
        done = follow(api, rollout["id"])
        # The offline device timed out (1 of 3, under the 50 % threshold): not a breach.
        assert done["state"] == "completed", done
        by_id = {t["device_id"]: t for t in done["targets"]}
        assert by_id[offline.device_id]["state"] == "timed_out"
        offline.start()
        offline.wait_serving("classifier", "1.0.0", timeout_s=30)

        def caught_up() -> bool:
            r = api.get(f"/v1/rollouts/{rollout['id']}")
            return {t["device_id"]: t for t in r["targets"]}[offline.device_id][
                "state"
            ] == "serving"

        wait_until(caught_up, 30, "the late device to be reported serving")
    finally:
        for agent in agents:
            agent.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_device_relabelled_out_of_the_cohort_is_released(
    stack: EmbeddedStack, api: ApiClient, model_path: Path, tmp_path: Path, uid: str
) -> None:
    api.upload_model(model_path, "classifier", "1.0.0")
    fleet = [(f"rel-{i}-{uid}", "x86-64-avx2", {"ring": uid}) for i in range(3)]
    agents = start_fleet(api, stack, tmp_path / "devices", fleet)
    try:
        rollout = api.post(
            "/v1/rollouts",
            json={
                "model": "classifier",
                "version": "1.0.0",
                "selector": f"ring={uid},!exempt",
                "strategy": "canary",
                "stages": [33, 100],
                "manual_approval": True,
            },
        )
        waiting = wait_until(
            lambda: (
                (r := api.get(f"/v1/rollouts/{rollout['id']}"))["state"] == "awaiting_approval"
                and r
            ),
            60,
            "the first stage to pass",
        )
        untouched = [t for t in waiting["targets"] if t["state"] == "waiting"]
        assert len(untouched) == 2
        leaving = untouched[0]["device_id"]
        api.request("PATCH", f"/v1/devices/{leaving}/labels",
                    json={"set": {"exempt": "yes"}, "remove": []})  # fmt: skip
        api.post(f"/v1/rollouts/{rollout['id']}/promote")
        done = follow(api, rollout["id"])
        assert done["state"] == "completed", done
        by_id = {t["device_id"]: t for t in done["targets"]}
        assert by_id[leaving]["state"] == "released"
        assert {"awaiting_approval", "promoted", "device_released"} <= set(kinds(done))
        assert next(a for a in agents if a.device_id == leaving).serving("classifier") is None
    finally:
        for agent in agents:
            agent.stop()


def test_broker_and_server_restarts_mid_rollout_end_in_the_right_state(
    model_path: Path, model_v2_path: Path, tmp_path: Path, uid: str
) -> None:
    """A private broker and server, each restarted while the rollout runs: the rollout's state
    lives in the database and the reconciler carries on where it was; what a device missed
    while the broker was away is re-sent from the database."""
    broker = EmbeddedBroker(tmp_path / "broker", port=free_port(), backend="mosquitto").start()
    settings = Settings(
        data_dir=tmp_path / "server",
        port=free_port(),
        mqtt_url=broker.url,
        desired_resend_interval_s=0.2,
    )
    stack = EmbeddedStack(settings).start()
    agents: list[LocalAgent] = []
    api = ApiClient(stack.url, stack.admin_token)
    try:
        api.upload_model(model_path, "classifier", "1.0.0")
        api.upload_model(model_v2_path, "classifier", "1.1.0")
        fleet = [(f"rs-{i}-{uid}", "x86-64-avx2", {"ring": uid}) for i in range(3)]
        agents = start_fleet(api, stack, tmp_path / "devices", fleet)
        all_at_once(api, "1.0.0", f"ring={uid}")
        rollout = api.post(
            "/v1/rollouts",
            json={
                "model": "classifier",
                "version": "1.1.0",
                "selector": f"ring={uid}",
                "strategy": "canary",
                "stages": [34, 67, 100],
                "bake_s": 2,
            },
        )

        def serving(n: int) -> bool:
            return bool(api.get(f"/v1/rollouts/{rollout['id']}")["counts"]["serving"] >= n)

        wait_until(lambda: serving(1), 60, "the first stage to serve")
        broker.stop()  # the broker goes away during the bake; the next stage waits for it
        time.sleep(3)
        broker = EmbeddedBroker(tmp_path / "broker", port=broker.port, backend="mosquitto")
        broker.start()
        wait_until(lambda: serving(2), 60, "the second stage to serve")
        stack.stop()  # and the server, during the second bake
        api.close()
        stack = EmbeddedStack(settings).start()
        api = ApiClient(stack.url, stack.admin_token)
        done = follow(api, rollout["id"], timeout_s=120)
        assert done["state"] == "completed", done
        assert kinds(done).count("promoted") == 2, kinds(done)
        assert kinds(done).count("completed") == 1
        for agent in agents:
            agent.wait_serving("classifier", "1.1.0", timeout_s=30)
    finally:
        api.close()
        for agent in agents:
            agent.stop()
        stack.stop()
        broker.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_shadow_rollouts_are_gated_on_agreement(
    stack: EmbeddedStack, api: ApiClient, model_path: Path, model_v2_path: Path, tmp_path: Path,
    uid: str,
) -> None:  # fmt: skip
    """A candidate that agrees with the active model passes and stays as a shadow; one that
    disagrees trips ``min_shadow_agreement`` and the shadow slot gets back what it had. The
    active model answers throughout."""
    api.upload_model(model_path, "classifier", "1.0.0")
    api.upload_model(model_path, "classifier", "1.0.1")  # the same weights: agrees
    api.upload_model(model_v2_path, "classifier", "2.0.0")  # other weights: disagrees
    fleet = [(f"sh-{i}-{uid}", "x86-64-avx2", {"ring": uid}) for i in range(2)]
    agents = start_fleet(api, stack, tmp_path / "devices", fleet)
    for agent in agents:  # shadow figures reach the server with each status report
        agent.stop()
        agent.configure("[reporting]\nstatus_interval_s = 0.5\n")
        agent.start()
        agent.wait_ready()

    def shadow(version: str, gates: dict[str, Any]) -> dict[str, Any]:
        rollout = api.post(
            "/v1/rollouts",
            json={"model": "classifier", "version": version, "selector": f"ring={uid}",
                  "strategy": "shadow", "shadow_of": "classifier", "sample_rate": 1.0,
                  "bake_s": 2, "gates": gates},
        )  # fmt: skip
        return follow(api, rollout["id"])

    try:
        all_at_once(api, "1.0.0", f"ring={uid}")
        gates = {"min_shadow_agreement": 0.95, "max_install_failure_pct": 0, "min_requests": 50}
        with traffic(agents, normal):
            good = shadow("1.0.1", gates)
            assert good["state"] == "completed", good["events"]
            figure = {g["gate"]: g for g in good["gates"]}["min_shadow_agreement"]
            assert figure["ok"] is True and figure["value"] == 1.0, figure
            # On by default: the shadow's answers against the active version's beside it.
            shift = {g["gate"]: g for g in good["gates"]}["max_prediction_shift"]
            assert shift["ok"] is True and shift["value"] < 0.05, shift
            assert shift["data"]["previous_version"] == "1.0.0", shift
            bad = shadow("2.0.0", {**gates, "min_shadow_agreement": 0.99})
        assert bad["state"] == "aborted", bad["events"]
        breach = next(e for e in bad["events"] if e["kind"] == "gate_breach")
        assert breach["figures"]["breached"][0]["gate"] == "min_shadow_agreement"
        for agent in agents:
            # The active model never changed; the disagreeing shadow gave way to the shadow
            # the slot had before it (1.0.1, from the passing rollout).
            assert (agent.serving("classifier") or {})["version"] == "1.0.0"

            def shadowing(device_id: str = agent.device_id) -> bool:
                slots = api.get(f"/v1/devices/{device_id}")["reported"]["slots"]
                report = (slots.get("classifier-shadow") or {}).get("shadow") or {}
                return bool(report.get("version") == "1.0.1")

            wait_until(shadowing, 30, "the previous shadow to be back")
    finally:
        for agent in agents:
            agent.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_stage_then_activate_switches_no_device_before_all_have_staged(
    stack: EmbeddedStack, api: ApiClient, model_path: Path, model_v2_path: Path, tmp_path: Path,
    uid: str,
) -> None:  # fmt: skip
    """Every device loads and warms 1.1.0 beside 1.0.0 and reports it staged; one is offline,
    so none switches until it has staged too; then all switch on one command, and the spread
    of their switch times is recorded."""
    api.upload_model(model_path, "classifier", "1.0.0")
    api.upload_model(model_v2_path, "classifier", "1.1.0")
    fleet = [(f"bg-{i}-{uid}", "x86-64-avx2", {"ring": uid}) for i in range(3)]
    agents = start_fleet(api, stack, tmp_path / "devices", fleet)
    late = agents[2]
    try:
        all_at_once(api, "1.0.0", f"ring={uid}")
        late.stop()
        rollout = api.post(
            "/v1/rollouts",
            json={"model": "classifier", "version": "1.1.0", "selector": f"ring={uid}",
                  "strategy": "stage_then_activate"},
        )  # fmt: skip
        staged = wait_until(
            lambda: (r := api.get(f"/v1/rollouts/{rollout['id']}"))["counts"]["staged"] == 2 and r,
            60,
            "two devices to stage 1.1.0",
        )
        assert staged["activated_at"] is None
        for _ in range(10):  # staged, not switched, however long the third takes
            for agent in agents[:2]:
                assert (agent.serving("classifier") or {})["version"] == "1.0.0"
            time.sleep(0.2)
        assert "activated" not in kinds(api.get(f"/v1/rollouts/{rollout['id']}"))
        late.start()
        late.wait_ready()
        done = follow(api, rollout["id"])
        assert done["state"] == "completed", done["events"]
        assert kinds(done).index("activated") < kinds(done).index("completed")
        for agent in agents:
            assert (agent.serving("classifier") or {})["version"] == "1.1.0"
            # The staging slot is gone once the version it held is active.
            slots = api.get(f"/v1/devices/{agent.device_id}")["reported"]["slots"]
            assert "classifier-staged" not in slots
        switch = next(e for e in done["events"] if e["kind"] == "completed")["figures"]["switch"]
        assert switch["devices"] == 3 and 0 <= switch["spread_s"] < 5, switch
        print(f"switch spread across 3 agents: {switch}")
        # The agents switched to the model they had staged, without loading it again.
        for agent in agents:
            assert "switching to the staged classifier 1.1.0" in agent.log_path.read_text()
    finally:
        for agent in agents:
            agent.stop()
