"""``edgefleet demo``: the whole path on embedded defaults, on this machine.

A fleet server with SQLite and an embedded broker; three simulated devices of different
profiles (x86 AVX2, Raspberry Pi 5, Jetson Orin Nano), each a real ``edge-agent`` process;
a model uploaded, built per profile, rolled out over MQTT; every device's prediction checked
against onnxruntime on the original model.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from converters.onnx.samples import mlp_classifier, nan_classifier
from fleet_server.client import ApiClient
from fleet_server.demo.agents import LocalAgent, wait_until
from fleet_server.server import EmbeddedStack
from fleet_server.settings import Settings

DEVICES = [
    ("edge-x86-01", "x86-64-avx2", {"site": "lab", "ring": "canary"}),
    ("edge-pi5-01", "raspberry-pi-5", {"site": "lab", "ring": "canary"}),
    ("edge-orin-01", "jetson-orin-nano", {"site": "lab", "ring": "canary"}),
]


#: A rollout in these states is still running.
ACTIVE = {"in_progress", "paused", "awaiting_approval"}


def _progress(rollout: dict) -> Table:  # type: ignore[type-arg]
    table = Table(
        "device",
        "profile",
        "artifact",
        "state",
        "agent lifecycle",
        "stage",
        title=f"{rollout.get('strategy', 'all_at_once')} rollout {rollout['id']} of "
        f"{rollout['model']} {rollout['version']}: {rollout['state']}",
    )
    for t in rollout["targets"]:
        table.add_row(
            t["device_id"],
            t["profile"],
            f"{t['runtime']}/{t['precision']}" if t.get("runtime") else "-",
            t["state"],
            t.get("device_state") or "-",
            str(t.get("stage", 0) + 1),
        )
    return table


def _follow(api: ApiClient, rollout: dict, console: Console) -> dict:  # type: ignore[type-arg]
    """Show the rollout live until every device has committed, failed or rolled back."""
    with Live(_progress(rollout), console=console, refresh_per_second=8) as live:
        deadline = time.monotonic() + 120
        while rollout["state"] in ACTIVE and time.monotonic() < deadline:
            time.sleep(0.2)
            rollout = api.get(f"/v1/rollouts/{rollout['id']}")
            live.update(_progress(rollout))
    return rollout


TELEMETRY = "/v1/telemetry/models/demo-classifier"


def run_demo(workdir: Path | None, console: Console) -> int:
    root = workdir or Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    console.rule(Text("edgefleet demo", style="bold"))
    console.print(f"working directory: {root}")
    settings = Settings(data_dir=root / "server", port=0, broker_port=0, env="development")
    agents: list[LocalAgent] = []
    started = time.monotonic()
    try:
        with EmbeddedStack(settings) as stack:
            assert stack.broker is not None
            console.print(
                f"fleet server  {stack.url}  (SQLite, artifacts in {settings.artifacts_dir})"
            )
            console.print(f"MQTT broker   {stack.mqtt_url}  ({stack.broker.backend}, embedded)")
            api = ApiClient(stack.url, stack.admin_token)

            model_path = mlp_classifier(root / "models" / "demo-classifier.onnx", seed=7)
            # Calibration data (what the model sees in production) is also the drift baseline.
            calibration = root / "models" / "demo-calibration.npz"
            reference_rows = np.random.default_rng(0).standard_normal((512, 1, 16))
            np.savez(calibration, x=reference_rows.astype(np.float32))
            pushed = api.upload_model(
                model_path,
                "demo-classifier",
                "1.0.0",
                "demo MLP classifier",
                calibration=calibration,
            )
            console.print(
                f"uploaded      demo-classifier 1.0.0 (sha256 {pushed['source_sha256'][:12]})"
            )

            for device_id, profile, labels in DEVICES:
                token = api.post("/v1/enrollment-tokens", json={"profile": profile})["token"]
                agent = LocalAgent(root / "devices", device_id, profile, probation_window_s=3)
                agent.enroll(stack.url, token, labels)
                # Telemetry every second, so the demo shows the fleet's figures at once. The
                # demo model answers in ~20 µs, so 2 % of that buys almost no drift sampling
                # (a real model's budget covers it, see bench/telemetry_cost.py): count all.
                agent.configure(
                    "[telemetry]\ninterval_s = 1\ncheckpoint_s = 0.5\nmin_sample_rate = 1.0\n"
                )
                agent.start()
                agents.append(agent)
            for agent in agents:
                agent.wait_ready()
            console.print(
                f"enrolled      {len(agents)} agents: "
                + ", ".join(f"{a.device_id} ({a.profile})" for a in agents)
            )

            deploy_at = time.monotonic()
            rollout = api.post(
                "/v1/rollouts",
                json={
                    "model": "demo-classifier",
                    "version": "1.0.0",
                    "selector": {"ring": "canary"},
                },
            )
            rollout = _follow(api, rollout, console)
            rolled_out_s = time.monotonic() - deploy_at
            if rollout["state"] != "completed":
                console.print(f"rollout ended {rollout['state']}", style="red")
                for agent in agents:
                    console.print(f"--- {agent.device_id} log ---\n{agent.log_tail(15)}")
                return 1

            import onnxruntime as ort

            reference = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
            x = np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32)
            want = reference.run(None, {"x": x})[0]
            results = Table(
                "device", "served", "precision", "max |Δ| vs onnxruntime fp32", "top-1 agreement"
            )
            ok = True
            for agent in agents:
                got = agent.client.predict("demo-classifier", {"x": x})["probs"]
                served = agent.serving("demo-classifier") or {}
                err = float(np.abs(got - want).max())
                agree = float((got.argmax(1) == want.argmax(1)).mean())
                precision = served.get("precision", "?")
                # fp32 matches the reference; a quantized artifact (x86 int8, built from the
                # calibration data) passed the build's parity gate and must agree on top-1.
                ok = ok and agree == 1.0 and (err < 1e-4 or precision != "fp32")
                results.add_row(
                    agent.device_id,
                    served.get("version", "?"),
                    precision,
                    f"{err:.2e}",
                    f"{agree:.0%}",
                )
            console.print(results)

            # Live traffic, then what the fleet reports about it (merged on the server).
            served_requests = 0
            traffic = np.random.default_rng(2).standard_normal((1000, 1, 16)).astype(np.float32)
            for agent in agents:
                for row in traffic:
                    agent.client.predict("demo-classifier", {"x": row})
                served_requests += len(traffic) + 1
            wait_until(
                lambda: sum(r["requests"] for r in api.get(TELEMETRY)) >= served_requests,
                30,
                "the agents' telemetry",
            )
            health = Table(
                "version",
                "profile",
                "devices",
                "requests",
                "errors",
                "p50 ms",
                "p95 ms",
                "drift-sampled",
                "worst PSI",
                title="fleet telemetry (edgefleet telemetry show demo-classifier)",
            )
            for r in api.get(TELEMETRY):
                lat = r["latency_ms"]
                psi = r["worst_psi"]
                health.add_row(
                    r["version"],
                    r["profile"],
                    str(r["devices"]),
                    str(r["requests"]),
                    str(r["errors"]),
                    f"{lat['p50']:.3f}",
                    f"{lat['p95']:.3f}",
                    str(r["sampled"]),
                    "-" if psi is None else f"{psi:.3f}",
                )
            console.print(health)

            # A bad version: it passes upload, build and self-test, but emits NaN. It goes out
            # as a canary: the first stage's device catches it on probation and switches back
            # to 1.0.0 by itself; that agent rollback trips the rollout's gate, which stops the
            # rollout before any other device is touched.
            console.rule("a bad version: demo-classifier 1.1.0 (emits NaN), as a canary")
            bad = nan_classifier(root / "models" / "demo-classifier-bad.onnx")
            api.upload_model(bad, "demo-classifier", "1.1.0", "broken on purpose")
            rollout = api.post(
                "/v1/rollouts",
                json={
                    "model": "demo-classifier",
                    "version": "1.1.0",
                    "selector": "ring=canary",
                    "strategy": "canary",
                    "stages": [33, 100],
                    "gates": {"max_agent_rollback_pct": 0, "max_install_failure_pct": 0},
                },
            )
            rollout = _follow(api, rollout, console)
            reasons = {t["error"]["reason"] for t in rollout["targets"] if t.get("error")}
            still = {(a.serving("demo-classifier") or {}).get("version") for a in agents}
            touched = rollout["counts"]["reverted"]
            spared = rollout["counts"]["released"]
            breach = next((e for e in rollout["events"] if e["kind"] == "gate_breach"), None)
            rolled_back = (
                rollout["state"] == "aborted"
                and breach is not None
                and touched == 1
                and spared == len(agents) - 1
                and still == {"1.0.0"}
            )
            why = ", ".join(sorted(reasons)) or "-"
            console.print(
                f"\nrollout {rollout['state']}: {breach['message'] if breach else 'no gate breach'}"
            )
            console.print(
                f"stage 1 device rolled back by its agent (reason: {why}) and was given 1.0.0; "
                f"{spared} device(s) never received 1.1.0; serving now: "
                f"{', '.join(sorted(str(v) for v in still))}"
            )
            ok = ok and rolled_back
            console.rule(
                Text.assemble(("ok" if ok else "FAILED", "green" if ok else "red"))
                + f": 3 devices serving demo-classifier "
                f"1.0.0 ({rolled_out_s:.1f}s from deploy to all committed); the bad 1.1.0 was "
                f"stopped by its canary gate after one device; "
                f"{time.monotonic() - started:.1f}s total"
            )
            return 0 if ok else 1
    finally:
        for agent in agents:
            agent.stop()
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
