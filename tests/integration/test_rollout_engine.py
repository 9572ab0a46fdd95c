"""The rollout engine against the fleet simulator (protocol-only devices with their own
identities on the real broker): refusals that change nothing, rate limits, gates on install
failures and on telemetry, and the operator's commands from the CLI. (Several server
processes on one PostgreSQL: test_several_servers.py.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleet_server.client import ApiClient, ApiError
from fleet_server.server import EmbeddedStack
from hil.rig import wait_until
from hil.simulator import Behaviour, FleetSimulator, SimulatedDevice, enroll_fleet
from tests.integration.test_cli import edgefleet
from tests.integration.test_rollouts import follow, notified

#: The engine's logic on one database; what differs on PostgreSQL (locks, two servers) is
#: tested there by the refusals, the rate limit and the two-server test.
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture
def fleet(
    stack: EmbeddedStack, api: ApiClient, model_path: Path, model_v2_path: Path, uid: str
) -> Iterator[tuple[FleetSimulator, list[SimulatedDevice]]]:
    """Twenty simulated devices labelled ``ring=<uid>``, all serving classifier 1.0.0."""
    api.upload_model(model_path, "classifier", "1.0.0")
    api.upload_model(model_v2_path, "classifier", "2.0.0")
    devices = enroll_fleet(api, 20, prefix=f"sim-{uid}", labels={"ring": uid})
    sim = FleetSimulator(
        stack.mqtt_url,
        devices,
        root_public_key=devices[0].root_public_key,
        default=Behaviour(install_s=0.05),
        telemetry_interval_s=0.5,
    )
    with sim:
        first = api.post("/v1/rollouts", json={"model": "classifier", "version": "1.0.0",
                                               "selector": f"ring={uid}"})  # fmt: skip
        assert follow(api, first["id"])["state"] == "completed"
        assert sim.serving("classifier") == {"1.0.0": 20}
        yield sim, devices


def desired_seqs(api: ApiClient) -> dict[str, int]:
    return {d["id"]: d["desired_seq"] for d in api.get("/v1/devices")}


def test_bad_requests_are_refused_naming_the_field_and_change_nothing(
    api: ApiClient, fleet: tuple[FleetSimulator, list[SimulatedDevice]], uid: str
) -> None:
    del fleet  # twenty devices serving 1.0.0
    base = {"model": "classifier", "version": "2.0.0", "selector": f"ring={uid}"}
    before_rollouts = len(api.get("/v1/rollouts"))
    before_seqs = desired_seqs(api)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"strategy": "canary", "stages": [10, 5, 100]}, "stages"),
        ({"strategy": "canary", "stages": [10, 150]}, "stages"),
        ({"strategy": "canary", "stages": [10, 50]}, "stages"),
        ({"strategy": "canary", "stages": [0, 100]}, "stages"),
        ({"stages": [50, 100]}, "stages"),  # stages belong to canaries
        ({"gates": {"max_latency": 2.0}}, "max_latency"),
        ({"gates": {"max_error_rate": "high"}}, "max_error_rate"),
        ({"gates": {"max_error_rate": 2.0}}, "max_error_rate"),
        ({"selector": "site in (berlin"}, "selector"),
        ({"strategy": "blue_green"}, "strategy"),
        ({"strategy": "ab"}, "bake_s"),  # an A/B test holds for a while
        ({"split_pct": 30}, "split_pct"),
        ({"strategy": "ab", "bake_s": 5, "split_pct": 100}, "split_pct"),
        ({"strategy": "stage_then_activate", "shadow_of": "classifier"}, "shadow_of"),
        ({"strategy": "shadow"}, "shadow_of"),
        ({"rate": {"max_per_minute": 0}}, "max_per_minute"),
        (
            {
                "rate": {
                    "ramp": {"base_per_minute": 10, "increase_factor": 1.0, "after_succeeded": 5}
                }
            },
            "increase_factor",
        ),
        ({"supersedes": "0123456789abcdef"}, "supersedes"),
        ({"selector": "ring=nobody-has-this"}, "selector"),
    ]
    for change, field in cases:
        with pytest.raises(ApiError) as refused:
            api.post("/v1/rollouts", json={**base, **change})
        assert refused.value.status in (404, 409, 422), (change, refused.value)
        assert field in str(refused.value) or field in str(refused.value.fields), (
            change,
            str(refused.value),
            refused.value.fields,
        )
    assert len(api.get("/v1/rollouts")) == before_rollouts
    assert desired_seqs(api) == before_seqs

    # An active rollout on the slot: an overlapping one is refused unless it supersedes it.
    slow = api.post("/v1/rollouts", json={**base, "strategy": "canary", "stages": [5, 100],
                                          "manual_approval": True})  # fmt: skip
    wait_until(lambda: notified(api, slow["id"], 0, 1), 30, "the first stage notified")
    seqs = desired_seqs(api)
    with pytest.raises(ApiError) as overlap:
        api.post("/v1/rollouts", json=base)
    assert overlap.value.reason == "overlapping_rollout" and slow["id"] in str(overlap.value)
    assert desired_seqs(api) == seqs
    # Commands that do not fit the rollout's state.
    follow_state = wait_until(
        lambda: (r := api.get(f"/v1/rollouts/{slow['id']}"))["state"] == "awaiting_approval" and r,
        30,
        "the first stage to pass",
    )
    assert follow_state["stages"][0]["state"] == "awaiting_approval"
    with pytest.raises(ApiError) as resume:
        api.post(f"/v1/rollouts/{slow['id']}/resume")
    assert resume.value.reason == "rollout_state"
    api.post(f"/v1/rollouts/{slow['id']}/abort", json={"reason": "testing"})
    for verb in ("pause", "resume", "promote", "abort"):
        with pytest.raises(ApiError) as late:
            api.post(f"/v1/rollouts/{slow['id']}/{verb}")
        assert late.value.status == 409 and "aborted" in str(late.value), verb
    with pytest.raises(ApiError) as missing:
        api.post("/v1/rollouts/ffffffffffffffff/pause")
    assert missing.value.status == 404


@SQLITE_ONLY
def test_a_device_no_bundle_can_be_built_for_is_excluded_with_the_reason(
    api: ApiClient, fleet: tuple[FleetSimulator, list[SimulatedDevice]], uid: str
) -> None:
    sim, _ = fleet
    # An x86 device that has only LiteRT installed: no x86 candidate runs on it.
    token = api.post("/v1/enrollment-tokens", json={})["token"]
    api.post("/v1/devices/enroll", json={"token": token, "device_id": f"odd-{uid}",
                                         "profile": "x86-64-avx2", "labels": {"ring": uid},
                                         "runtimes": {"litert": "2.1.0"}})  # fmt: skip
    rollout = api.post("/v1/rollouts", json={"model": "classifier", "version": "2.0.0",
                                             "selector": f"ring={uid}"})  # fmt: skip
    done = follow(api, rollout["id"])
    assert done["state"] == "completed", done["events"]
    odd = next(t for t in done["targets"] if t["device_id"] == f"odd-{uid}")
    assert odd["state"] == "excluded" and "x86-64-avx2" in odd["note"], odd
    assert done["counts"]["serving"] == 20 and sim.serving("classifier") == {"2.0.0": 20}
    assert next(e for e in done["events"] if e["kind"] == "created")["figures"]["excluded"] == 1


def test_the_rate_limit_notifies_at_most_n_devices_a_minute(
    api: ApiClient, fleet: tuple[FleetSimulator, list[SimulatedDevice]], uid: str
) -> None:
    sim, _ = fleet
    rollout = api.post(
        "/v1/rollouts",
        json={"model": "classifier", "version": "2.0.0", "selector": f"ring={uid}",
              "rate": {"max_per_minute": 6}},
    )  # fmt: skip
    wait_until(lambda: sim.serving("classifier").get("2.0.0") == 6, 30, "six devices to serve")
    # The next minute's allowance has not come: the rest wait, however quickly the six serve.
    import time

    time.sleep(3)
    status = api.get(f"/v1/rollouts/{rollout['id']}")
    assert status["counts"]["serving"] == 6 and status["counts"]["waiting"] == 14, status["counts"]
    assert sim.serving("classifier") == {"1.0.0": 14, "2.0.0": 6}
    # An abort gives the six their previous version back; the fourteen were never touched.
    api.post(f"/v1/rollouts/{rollout['id']}/abort")
    wait_until(lambda: sim.serving("classifier") == {"1.0.0": 20}, 30, "the rollback")
    done = api.get(f"/v1/rollouts/{rollout['id']}")
    assert done["state"] == "aborted"
    assert done["counts"]["reverted"] == 6 and done["counts"]["released"] == 14


@SQLITE_ONLY
def test_install_failures_stop_the_canary_and_roll_its_stage_back(
    api: ApiClient, fleet: tuple[FleetSimulator, list[SimulatedDevice]], uid: str
) -> None:
    sim, _ = fleet
    sim.behaviours["2.0.0"] = Behaviour(install_s=0.05, fail="probation:nonfinite_outputs")
    rollout = api.post(
        "/v1/rollouts",
        json={"model": "classifier", "version": "2.0.0", "selector": f"ring={uid}",
              "strategy": "canary", "stages": [10, 50, 100],
              "gates": {"max_agent_rollback_pct": 20}},
    )  # fmt: skip
    done = follow(api, rollout["id"])
    assert done["state"] == "aborted", done["events"]
    breach = next(e for e in done["events"] if e["kind"] == "gate_breach")
    [figure] = breach["figures"]["breached"]
    # The first stage's devices rolled it back: the first of the two is already 50 % against
    # 20 % (the gate is checked at every step, so it may stop the stage before the second).
    assert figure["gate"] == "max_agent_rollback_pct" and figure["value"] >= 50, figure
    assert done["stages"][0]["counts"]["targeted"] == 2
    assert done["counts"]["reverted"] == 2 and done["counts"]["released"] == 18
    assert sim.serving("classifier") == {"1.0.0": 20}
    audit = api.get("/v1/audit", params={"target": rollout["id"]})
    assert "rollout.abort" in {a["action"] for a in audit}


@SQLITE_ONLY
def test_a_telemetry_gate_trips_on_the_error_rate_the_devices_report(
    api: ApiClient, fleet: tuple[FleetSimulator, list[SimulatedDevice]], uid: str
) -> None:
    sim, _ = fleet
    sim.behaviours["2.0.0"] = Behaviour(install_s=0.05, error_rate=0.3, requests_per_interval=50)
    rollout = api.post(
        "/v1/rollouts",
        json={"model": "classifier", "version": "2.0.0", "selector": f"ring={uid}",
              "strategy": "canary", "stages": [25, 100], "bake_s": 2,
              "gates": {"max_error_rate": 0.05, "min_requests": 100,
                        "min_devices_reporting": 5}},
    )  # fmt: skip
    done = follow(api, rollout["id"])
    assert done["state"] == "aborted", done["events"]
    breach = next(e for e in done["events"] if e["kind"] == "gate_breach")
    figure = breach["figures"]["breached"][0]
    assert figure["gate"] == "max_error_rate" and 0.2 < figure["value"] < 0.4, figure
    gates = {g["gate"]: g for g in done["gates"]}
    assert (
        gates["min_devices_reporting"]["ok"] is True
        and gates["min_devices_reporting"]["value"] == 5
    )
    wait_until(lambda: sim.serving("classifier") == {"1.0.0": 20}, 30, "the rollback")


@SQLITE_ONLY
def test_a_healthy_version_passes_its_telemetry_gates_and_completes(
    api: ApiClient, fleet: tuple[FleetSimulator, list[SimulatedDevice]], uid: str
) -> None:
    sim, _ = fleet
    sim.behaviours["2.0.0"] = Behaviour(install_s=0.05, requests_per_interval=50)
    rollout = api.post(
        "/v1/rollouts",
        json={"model": "classifier", "version": "2.0.0", "selector": f"ring={uid}",
              "strategy": "canary", "stages": [25, 100], "bake_s": 1.5,
              "rate": {"ramp": {"base_per_minute": 5, "increase_factor": 4,
                                "after_succeeded": 5}},
              "gates": {"max_error_rate": 0.05, "min_requests": 100,
                        "min_devices_reporting": 5}},
    )  # fmt: skip
    done = follow(api, rollout["id"], timeout_s=90)
    assert done["state"] == "completed", done["events"]
    assert sim.serving("classifier") == {"2.0.0": 20}
    figures = next(e for e in done["events"] if e["kind"] == "promoted")["figures"]["gates"]
    assert {g["gate"]: g["ok"] for g in figures} == {
        "max_error_rate": True,
        "min_devices_reporting": True,
        "max_prediction_shift": None,  # on by default for a canary…
    }
    shift = next(g for g in figures if g["gate"] == "max_prediction_shift")
    # …and off here: simulated devices report no predictions to compare.
    assert shift["applies"] is False and "no predictions" in shift["detail"]


@SQLITE_ONLY
def test_operator_commands_from_the_cli(
    stack: EmbeddedStack, api: ApiClient, fleet: tuple[FleetSimulator, list[SimulatedDevice]],
    uid: str,
) -> None:  # fmt: skip
    sim, _ = fleet
    r = edgefleet(stack, "rollouts", "create", "--model", "classifier", "--version", "2.0.0",
                  "--selector", f"ring={uid}", "--strategy", "canary", "--stages", "10,100",
                  "--manual-approval", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    import json

    rollout = json.loads(r.stdout)
    assert rollout["state"] == "awaiting_approval"
    r = edgefleet(stack, "rollouts", "status", rollout["id"])
    assert r.returncode == 0 and "awaiting_approval" in r.stdout and "latest events" in r.stdout
    assert edgefleet(stack, "rollouts", "pause", rollout["id"]).returncode == 0
    r = edgefleet(stack, "rollouts", "promote", rollout["id"])
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "paused" in r.stderr, r.stderr
    assert edgefleet(stack, "rollouts", "resume", rollout["id"]).returncode == 0
    wait_until(
        lambda: api.get(f"/v1/rollouts/{rollout['id']}")["state"] == "awaiting_approval",
        30,
        "the stage to pass again after the pause",
    )
    assert edgefleet(stack, "rollouts", "promote", rollout["id"]).returncode == 0
    done = follow(api, rollout["id"])
    assert done["state"] == "completed" and sim.serving("classifier") == {"2.0.0": 20}
    kinds = [e["kind"] for e in done["events"]]
    assert kinds.index("paused") < kinds.index("resumed") < kinds.index("promoted")
    assert next(e for e in done["events"] if e["kind"] == "promoted")["actor"] == "bootstrap-admin"
    # The live view ends by itself once the rollout has ended, showing how it ended.
    r = edgefleet(stack, "rollouts", "status", rollout["id"], "--watch")
    assert r.returncode == 0 and "completed" in r.stdout and "promoted" in r.stdout, r.stdout
    r = edgefleet(stack, "rollouts", "abort", rollout["id"])
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "completed" in r.stderr
    r = edgefleet(stack, "rollouts", "list")
    assert r.returncode == 0 and rollout["id"] in r.stdout


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("candidate", "winner", "final"),
    [
        (Behaviour(install_s=0.05, latency_ms=0.5, requests_per_interval=60), "b", "2.0.0"),
        (Behaviour(install_s=0.05, latency_ms=2.0, error_rate=0.2, requests_per_interval=60),
         "a", "1.0.0"),
    ],
    ids=["faster-candidate-wins", "failing-candidate-loses"],
)  # fmt: skip
def test_an_ab_split_ends_in_a_verdict_with_confidence(
    api: ApiClient, fleet: tuple[FleetSimulator, list[SimulatedDevice]], uid: str,
    candidate: Behaviour, winner: str, final: str,
) -> None:  # fmt: skip
    sim, _ = fleet
    sim.behaviours["1.0.0"] = Behaviour(install_s=0.05, latency_ms=2.0, requests_per_interval=60)
    sim.behaviours["2.0.0"] = candidate
    rollout = api.post(
        "/v1/rollouts",
        json={"model": "classifier", "version": "2.0.0", "selector": f"ring={uid}",
              "strategy": "ab", "split_pct": 50, "bake_s": 3, "gates": {}},
    )  # fmt: skip
    wait_until(lambda: sim.serving("classifier") == {"1.0.0": 10, "2.0.0": 10}, 30,
               "the split")  # fmt: skip
    done = follow(api, rollout["id"])
    assert done["state"] == "completed", done["events"]
    verdict = next(e for e in done["events"] if e["kind"] == "ab_verdict")["figures"]["verdict"]
    assert verdict["winner"] == winner, verdict
    better = verdict["comparison"]["latency" if winner == "b" else "error_rate"]
    assert better["better"] == winner and better["confidence"] > 0.99, verdict
    # Both arms side by side, each from its own devices' telemetry.
    assert verdict["a"]["version"] == "1.0.0" and verdict["b"]["version"] == "2.0.0"
    assert verdict["a"]["requests"] >= 300 and verdict["b"]["requests"] >= 300, verdict
    wait_until(lambda: sim.serving("classifier") == {final: 20}, 30, f"every device on {final}")


@SQLITE_ONLY
def test_a_gate_without_evidence_never_passes_a_stage(
    api: ApiClient, fleet: tuple[FleetSimulator, list[SimulatedDevice]], uid: str
) -> None:
    """Devices that serve no request give an error-rate gate nothing to judge: the stage waits
    up to max_bake_s, then stops for approval, saying which gate lacks what; promote accepts
    the stage without it (audited), and the rollout goes on."""
    sim, _ = fleet
    sim.behaviours["2.0.0"] = Behaviour(install_s=0.05, requests_per_interval=0)
    rollout = api.post(
        "/v1/rollouts",
        json={"model": "classifier", "version": "2.0.0", "selector": f"ring={uid}",
              "strategy": "canary", "stages": [10, 100], "bake_s": 0.5, "max_bake_s": 2,
              "gates": {"max_error_rate": 0.01, "min_requests": 50}},
    )  # fmt: skip

    def waiting() -> dict[str, Any] | None:
        r: dict[str, Any] = api.get(f"/v1/rollouts/{rollout['id']}")
        return r if r["state"] == "awaiting_approval" else None

    held = wait_until(waiting, 60, "the stage to stop for approval")
    assert held["awaiting"] == "evidence" and held["stage"] == 0
    figure = next(g for g in held["gates"] if g["gate"] == "max_error_rate")
    assert figure["ok"] is None and figure["applies"] is True
    event = next(e for e in held["events"] if e["kind"] == "no_evidence")
    assert "max_error_rate" in event["message"] and "max_bake_s" in event["message"]
    assert sim.serving("classifier") == {"1.0.0": 18, "2.0.0": 2}  # nothing went further
    api.post(f"/v1/rollouts/{rollout['id']}/promote")
    # Stage 2 lacks the evidence too: it stops again, and is accepted again.
    wait_until(lambda: (r := waiting()) is not None and r["stage"] == 1, 60, "stage 2 to stop")
    api.post(f"/v1/rollouts/{rollout['id']}/promote")
    done = follow(api, rollout["id"])
    assert done["state"] == "completed", done["events"]
    assert [e["kind"] for e in done["events"]].count("approved") == 2
    audit = api.get("/v1/audit", params={"limit": 50})
    assert any(a["action"] == "rollout.accept_without_evidence" for a in audit), audit


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("accuracy", "state"), [(0.9, "completed"), (0.6, "aborted")], ids=["kept", "dropped"]
)
def test_online_accuracy_gates_judge_the_candidate_against_its_predecessor(
    api: ApiClient, fleet: tuple[FleetSimulator, list[SimulatedDevice]], uid: str,
    accuracy: float, state: str,
) -> None:  # fmt: skip
    sim, _ = fleet
    labelled = dict(install_s=0.05, requests_per_interval=60, labels_per_interval=100)
    sim.behaviours["1.0.0"] = Behaviour(**labelled, accuracy=0.9)  # type: ignore[arg-type]
    sim.behaviours["2.0.0"] = Behaviour(**labelled, accuracy=accuracy)  # type: ignore[arg-type]
    rollout = api.post(
        "/v1/rollouts",
        json={"model": "classifier", "version": "2.0.0", "selector": f"ring={uid}",
              "strategy": "canary", "stages": [20, 100], "bake_s": 1,
              "gates": {"min_accuracy": 0.8, "max_accuracy_drop": 0.05, "min_labels": 1000}},
    )  # fmt: skip
    done = follow(api, rollout["id"], timeout_s=120)
    assert done["state"] == state, done["events"]
    judged = next(e for e in done["events"] if e["kind"] in ("promoted", "gate_breach"))
    figures = {g["gate"]: g for g in judged["figures"].get("gates") or
               judged["figures"]["breached"]}  # fmt: skip
    drop = figures["max_accuracy_drop"]
    assert "against 1.0.0's" in drop["detail"], drop
    # Online accuracy per version x profile x rollout, from the outside too.
    rows = api.get("/v1/telemetry/models/classifier", params={"by_rollout": "true"})
    mine = [r for r in rows if r["rollout_id"] == rollout["id"]]
    assert mine and all(r["version"] == "2.0.0" for r in mine), rows
    # The simulator draws one sample of 100 labels per version and round, shared by the
    # devices serving it (hil/simulator.py): 1,200 labels are ~3 independent draws, so the
    # measured accuracy's standard deviation is ~0.03, not the ~0.014 of 1,200 draws.
    assert mine[0]["labelled"] >= 1000 and abs(mine[0]["accuracy"] - accuracy) < 0.12, mine
    shown = edgefleet(None, "telemetry", "show", "classifier", "--by-rollout",
                      "--server", api.base_url)  # fmt: skip
    assert shown.returncode == 0 and rollout["id"] in shown.stdout, shown.stdout + shown.stderr
    if state == "completed":
        assert drop["ok"] is True and figures["min_accuracy"]["ok"] is True
    else:
        assert drop["ok"] is False and drop["value"] > 0.2, drop
        wait_until(lambda: sim.serving("classifier") == {"1.0.0": 20}, 30, "the rollback")


@SQLITE_ONLY
def test_no_evidence_can_abort_instead(
    api: ApiClient, fleet: tuple[FleetSimulator, list[SimulatedDevice]], uid: str
) -> None:
    sim, _ = fleet
    sim.behaviours["2.0.0"] = Behaviour(install_s=0.05, requests_per_interval=0)
    rollout = api.post(
        "/v1/rollouts",
        json={"model": "classifier", "version": "2.0.0", "selector": f"ring={uid}",
              "strategy": "canary", "stages": [10, 100], "bake_s": 0.5, "max_bake_s": 1,
              "on_no_evidence": "abort", "gates": {"max_error_rate": 0.01}},
    )  # fmt: skip
    done = follow(api, rollout["id"])
    assert done["state"] == "aborted" and "no evidence" in done["reason"], done["reason"]
    assert "max_error_rate" in done["reason"]
    wait_until(lambda: sim.serving("classifier") == {"1.0.0": 20}, 30, "the rollback")


def _variant(source: Path, out: Path, change: str) -> Path:
    """The sample classifier with one change to what its callers see."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load(str(source))
    g = m.graph
    if change == "renamed_input":
        g.input[0].name = "features"
        for node in g.node:
            node.input[:] = ["features" if i == "x" else i for i in node.input]
    elif change == "dtype":
        g.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE
        g.node.insert(0, helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT))
        for node in list(g.node)[1:]:
            node.input[:] = ["x32" if i == "x" else i for i in node.input]
    elif change == "output_rank":
        for node in g.node:
            node.output[:] = ["probs2" if o == "probs" else o for o in node.output]
        g.initializer.append(onnx.numpy_helper.from_array(np.array([1], np.int64), "axis1"))
        g.node.append(helper.make_node("Unsqueeze", ["probs2", "axis1"], ["probs"]))
        g.output[0].CopyFrom(
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 1, 4])
        )
    onnx.checker.check_model(m)
    onnx.save(m, str(out))
    return out


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("renamed_input", "input 'x' is gone (new inputs: features)"),
        ("dtype", "input 'x': dtype float32 → float64"),
        ("output_rank", "output 'probs': rank 2 → 3"),
    ],
)
def test_a_version_that_breaks_its_callers_is_refused_unless_allowed(
    api: ApiClient, fleet: tuple[FleetSimulator, list[SimulatedDevice]], uid: str,
    model_path: Path, tmp_path: Path, change: str, named: str,
) -> None:  # fmt: skip
    sim, _ = fleet
    api.upload_model(_variant(model_path, tmp_path / "v3.onnx", change), "classifier", "3.0.0")
    before = desired_seqs(api)
    body = {"model": "classifier", "version": "3.0.0", "selector": f"ring={uid}"}
    with pytest.raises(ApiError) as refused:
        api.post("/v1/rollouts", json=body)
    e = refused.value
    assert e.status == 409 and e.reason == "breaking_change", e
    assert named in e.message and "classifier 1.0.0" in e.message, e.message
    assert desired_seqs(api) == before  # nothing changed
    assert api.get("/v1/rollouts", params={"targets": "false"})[0]["version"] == "1.0.0"
    # models diff says the same.
    diff = api.get("/v1/models/classifier/diff", params={"a": "1.0.0", "b": "3.0.0"})
    assert diff["compatible"] is False and named in " ".join(diff["io_differences"]), diff

    # allow_breaking goes through, audited; a fleet rollback across the change says so.
    rollout = api.post("/v1/rollouts", json={**body, "allow_breaking": True, "strategy": "canary",
                                            "stages": [50, 100], "manual_approval": True})  # fmt: skip
    audit = api.get("/v1/audit", params={"action": "rollout.allow_breaking"})
    assert audit and audit[0]["target"] == rollout["id"], audit
    assert named in str(audit[0]["detail"]), audit[0]
    wait_until(lambda: sim.serving("classifier").get("3.0.0") == 10, 30, "the first stage")
    api.post(f"/v1/rollouts/{rollout['id']}/abort")
    done = follow(api, rollout["id"])
    rollback = next(e for e in done["events"] if e["kind"] == "rollback")
    assert "across an input/output change" in rollback["message"] and named in rollback["message"]
    wait_until(lambda: sim.serving("classifier") == {"1.0.0": 20}, 30, "the rollback")
