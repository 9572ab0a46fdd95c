"""``edgefleet demo``: the whole story on embedded defaults, on this machine.

A fleet server (SQLite, an embedded broker, a local artifact store) and six real
``edge-agent`` processes over three profiles: x86 (ONNX Runtime, int8), Raspberry Pi 5
(LiteRT, int8) and Jetson Orin Nano (TensorRT where it is installed; here, its ONNX Runtime
fallback). A digit-reading CNN is trained on the spot and built per profile with its
calibration set, each build's parity checked against the original. Under steady traffic
(with labels sent back for half the answers):

1. version 1.0.0 goes to the whole fleet;
2. a better 1.1.0 goes out as a canary, stage by stage, its gates judging it against 1.0.0;
3. a silently wrong 1.2.0 (a normalisation bug: finite, well-formed and wrong) goes out as a
   canary and is stopped at its first stage by the prediction-shift gate, and rolled back.

It ends with what the fleet measured (latency, drift, accuracy per profile and version) and
what happened and why; the dashboard's URL is printed, and ``--keep`` leaves it all running.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from edge_agent.serving.client import AgentClient
from fleet_server.client import ApiClient
from fleet_server.demo.agents import LocalAgent, start_agents, wait_until
from fleet_server.demo.digits import Digits, Network, draw_digits, export_onnx, fold_scale
from fleet_server.server import EmbeddedStack
from fleet_server.settings import Settings

MODEL = "digits"
#: Two devices of each profile, as a small fleet has them.
DEVICES = [
    ("x86-01", "x86-64-avx2"),
    ("x86-02", "x86-64-avx2"),
    ("pi5-01", "raspberry-pi-5"),
    ("pi5-02", "raspberry-pi-5"),
    ("orin-01", "jetson-orin-nano"),
    ("orin-02", "jetson-orin-nano"),
]
#: One device, then half, then all.
STAGES = [16, 50, 100]
#: The canaries' gates: no failed install or agent rollback, few errors, and, against the
#: version each replaces, the same predictions and no lost accuracy. (No fleet latency gate
#: here: six devices share this machine's cores, so one's latency is its neighbours' load.)
GATES = {
    "max_install_failure_pct": 0,
    "max_agent_rollback_pct": 0,
    "max_error_rate": 0.01,
    "max_prediction_shift": 0.25,
    "max_accuracy_drop": 0.05,
    "min_requests": 100,
    "min_labels": 60,
}
ACTIVE = {"in_progress", "paused", "awaiting_approval"}
#: The Raspberry Pis' cameras see the digits through glare (dimmer strokes on a brighter
#: background) that the calibration data never had: input drift, measured per profile.
GLARE = {"pi5-01": (0.9, 0.08), "pi5-02": (0.9, 0.08)}


#: Requests a second to each device, and how long each canary stage bakes.
RATE_PER_DEVICE = 25.0
BAKE_S = 12.0


@dataclass
class Traffic:
    """Steady requests to every device (random held-out digits), with the true label sent
    back for every other answer, as an application that learns the truth later would."""

    agents: list[LocalAgent]
    digits: Digits
    rate_per_device: float
    #: device → (gain, offset) of its camera's pixels (none: as in the calibration data).
    glare: dict[str, tuple[float, float]] = field(default_factory=dict)
    served: int = 0
    failed: int = 0
    labelled: int = 0
    errors: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for i, agent in enumerate(self.agents):
            t = threading.Thread(target=self._run, args=(agent, i), daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def totals(self) -> tuple[int, int, int, list[str]]:
        """Served, failed, labels accepted, and the first few errors."""
        with self._lock:
            return self.served, self.failed, self.labelled, list(self.errors)

    def _count(self, served: int = 0, labelled: int = 0, error: str | None = None) -> None:
        with self._lock:
            self.served += served
            self.labelled += labelled
            if error is not None:
                self.failed += 1
                if len(self.errors) < 5:
                    self.errors.append(error)

    def _run(self, agent: LocalAgent, seed: int) -> None:
        client = AgentClient(f"http://127.0.0.1:{agent.serving_port}", timeout_s=10)
        rng = np.random.default_rng(100 + seed)
        pending: list[tuple[str, int | list[int]]] = []
        gap = 1.0 / self.rate_per_device
        gain, offset = self.glare.get(agent.device_id, (1.0, 0.0))
        images = np.clip(self.digits.images * gain + offset, 0, 1).astype(np.float32)
        next_at = time.monotonic()
        try:
            while not self._stop.is_set():
                i = int(rng.integers(len(self.digits.labels)))
                try:
                    client.predict(MODEL, {"image": images[i : i + 1]})
                    self._count(served=1)
                    rid = client.last_request_id
                    if rid is not None and rng.random() < 0.5:
                        pending.append((rid, int(self.digits.labels[i])))
                    if len(pending) >= 10:
                        self._count(labelled=client.feedback(MODEL, pending)["accepted"])
                        pending.clear()
                except Exception as e:  # counted and shown: the demo promises none
                    self._count(error=f"{agent.device_id}: {e}")
                    pending.clear()
                next_at += gap
                self._stop.wait(max(0.0, next_at - time.monotonic()))
        finally:
            client.close()


def _gate_text(g: dict[str, Any]) -> Text:
    if not g.get("applies", True):
        return Text("n/a", style="dim")
    if g["ok"] is None:
        return Text("waiting", style="yellow")
    return Text("ok", style="green") if g["ok"] else Text("BREACH", style="bold red")


def _progress(rollout: dict[str, Any]) -> Group:
    head = Text.assemble(
        (f"{rollout['strategy']} rollout {rollout['id']} of {MODEL} {rollout['version']}: ", ""),
        (rollout["state"], "bold"),
        (f"  stage {rollout['stage'] + 1}/{len(rollout['stages'])}", ""),
    )
    stages = Table("stage", "share", "state", "devices", box=None, pad_edge=False)
    for s in rollout["stages"]:
        counts = ", ".join(f"{k} {v}" for k, v in s["counts"].items() if v)
        stages.add_row(str(s["index"] + 1), f"{s['percent']:g} %", s["state"], counts)
    gates = Table("gate", "figure", "threshold", "", "detail", box=None, pad_edge=False)
    for g in rollout["gates"]:
        value = "-" if g["value"] is None else f"{g['value']:.4g}"
        gates.add_row(g["gate"], value, f"{g['threshold']:g}", _gate_text(g), g["detail"][:90])
    devices = Table("device", "profile", "stage", "state", "agent", box=None, pad_edge=False)
    for t in rollout["targets"]:
        devices.add_row(t["device_id"], t["profile"], str(t["stage"] + 1), t["state"],
                        t.get("device_state") or "-")  # fmt: skip
    parts: list[Any] = [head, stages]
    if rollout["gates"]:
        parts.append(gates)
    parts.append(devices)
    return Group(*parts)


def _follow(
    api: ApiClient, rollout: dict[str, Any], console: Console, timeout_s: float
) -> dict[str, Any]:
    """A live view of the rollout until it ends (or waits for a person)."""
    deadline = time.monotonic() + timeout_s
    with Live(_progress(rollout), console=console, refresh_per_second=4, transient=False) as live:
        while rollout["state"] in ACTIVE and time.monotonic() < deadline:
            if rollout["state"] == "awaiting_approval":
                break
            time.sleep(0.5)
            rollout = api.get(f"/v1/rollouts/{rollout['id']}")
            live.update(_progress(rollout))
    return rollout


def _parity_table(api: ApiClient, rollout: dict[str, Any], runtimes: dict[str, list[str]]) -> Table:
    """The builds a rollout used: each one's parity with the uploaded ONNX."""
    version = rollout["version"]
    used = {t["bundle_sha256"] for t in rollout["targets"]}
    seen = api.get(f"/v1/models/{MODEL}/versions/{version}/overview")
    table = Table("profile", "artifact", "top-1 agreement", "max |Δ|", "rel. L2", "speed-up",
                  "size", title=f"builds of {MODEL} {version}: parity with the original ONNX "
                  "on its calibration set")  # fmt: skip
    for b in seen["bundles"]:
        if b["bundle_sha256"] not in used:
            continue
        p = b["parity"]
        artifact = f"{b['runtime']} {b['precision']}"
        if b["profile"].startswith("jetson") and "tensorrt" not in runtimes.get(b["profile"], ()):
            artifact += " (TensorRT absent here: ONNX Runtime fallback)"
        table.add_row(
            b["profile"],
            artifact,
            "-" if p["top1_agreement"] is None else f"{p['top1_agreement']:.1%}",
            "-" if p["max_abs_error"] is None else f"{p['max_abs_error']:.2e}",
            "-" if p["rel_l2_error"] is None else f"{p['rel_l2_error']:.2e}",
            "-" if p["speedup"] is None else f"{p['speedup']:.2f}x",
            f"{b['size'] / 1024:.0f} KiB",
        )
    return table


def _built(api: ApiClient, builds: list[str]) -> bool:
    states = [api.get(f"/v1/builds/{b}")["state"] for b in builds]
    if "failed" in states:
        raise RuntimeError(f"a build failed: {states}")
    return all(s == "succeeded" for s in states)


def _enough_predictions(api: ApiClient, version: str, per_profile: int) -> bool:
    rows = api.get(f"/v1/telemetry/models/{MODEL}", params={"version": version, "since_s": 600})
    profiles = {p for _, p in DEVICES}
    have = {r["profile"]: r["requests"] for r in rows}
    return all(have.get(p, 0) >= per_profile for p in profiles)


def _drift_note(
    rows: list[dict[str, Any]], alerts: list[dict[str, Any]], threshold: float = 0.25
) -> str:
    """Which profiles' inputs drifted from the calibration data, from the fleet's figures."""
    worst: dict[str, float] = {}
    for r in rows:
        for d in r["drift"]:
            if d["io"] == "input" and d["psi"] is not None:
                worst[r["profile"]] = max(worst.get(r["profile"], 0.0), d["psi"])
    drifted = {p: v for p, v in sorted(worst.items()) if v > threshold}
    if not drifted:
        return (
            f"input drift: no profile's inputs moved from the calibration data (PSI ≤ {threshold})"
        )
    named = ", ".join(f"{p} (PSI {v:.2f})" for p, v in drifted.items())
    alerted = sorted({a["profile"] for a in alerts if a["kind"] == "drift"})
    said = f"drift alerts open for {', '.join(alerted)}" if alerted else "no drift alert (yet)"
    return f"input drift above {threshold}: {named}; {said} (edgefleet alerts list)"


def _closing_table(api: ApiClient, since_s: float) -> tuple[Table, list[dict[str, Any]]]:
    table = Table("version", "profile", "devices", "requests", "errors", "p50 ms", "p95 ms",
                  "input drift (PSI)", "accuracy (labels)",
                  title=f"what the fleet measured (edgefleet telemetry show {MODEL})")  # fmt: skip
    rows = api.get(f"/v1/telemetry/models/{MODEL}", params={"since_s": since_s})
    for r in sorted(rows, key=lambda r: (r["version"], r["profile"])):
        lat = r["latency_ms"]
        drift = [d["psi"] for d in r["drift"] if d["io"] == "input" and d["psi"] is not None]
        accuracy = f"{r['accuracy']:.1%} ({r['labelled']})" if r["labelled"] else "-"
        table.add_row(
            r["version"], r["profile"], str(r["devices"]), str(r["requests"]), str(r["errors"]),
            "-" if lat["p50"] is None else f"{lat['p50']:.3f}",
            "-" if lat["p95"] is None else f"{lat['p95']:.3f}",
            "-" if not drift else f"{max(drift):.3f}",
            accuracy,
        )  # fmt: skip
    return table, rows


def _why(rollout: dict[str, Any]) -> str:
    kinds = ("gate_breach", "completed", "aborted", "awaiting_approval", "failed")
    last = next((e for e in reversed(rollout["events"]) if e["kind"] in kinds), None)
    return last["message"] if last else rollout.get("reason") or "-"


@dataclass(frozen=True)
class Versions:
    """The three versions as ONNX files, their calibration set, and the digits the devices
    will be shown (held out from training)."""

    files: dict[str, Path]
    calibration: Path
    field: Digits


def _train(root: Path, console: Console) -> Versions:
    console.rule("a digit reader, trained here")
    t0 = time.monotonic()
    train, field_digits = draw_digits(6000, seed=1), draw_digits(1000, seed=2)
    models = root / "models"
    net = Network(seed=1)
    net.train(train, 3, seed=1)
    first_acc = net.accuracy(field_digits)
    files = {"1.0.0": export_onnx(net, models / "digits-1.0.0.onnx", "digits CNN 1.0.0")}
    net.train(train, 3, seed=2, lr=0.002)
    second_acc = net.accuracy(field_digits)
    files["1.1.0"] = export_onnx(net, models / "digits-1.1.0.onnx", "digits CNN 1.1.0")
    wrong = fold_scale(net, 255.0)
    files["1.2.0"] = export_onnx(wrong, models / "digits-1.2.0.onnx", "digits CNN 1.2.0")
    calibration = models / "calibration.npz"
    np.savez(calibration, image=draw_digits(1024, seed=3).images[:, None])  # a feed per sample
    console.print(
        f"trained a CNN on {len(train.labels)} drawn digits in {time.monotonic() - t0:.1f}s: "
        f"1.0.0 reads {first_acc:.1%} of 1000 held-out digits right, 1.1.0 (trained longer) "
        f"{second_acc:.1%}; 1.2.0 is 1.1.0 exported with a normalisation bug (it expects "
        "pixels in 0..255; devices send 0..1)"
    )
    return Versions(files, calibration, field_digits)


def _upload(api: ApiClient, versions: Versions) -> None:
    described = {"1.0.0": ("digits CNN", None), "1.1.0": ("digits CNN, trained longer", "1.0.0"),
                 "1.2.0": ("digits CNN, re-exported", "1.1.0")}  # fmt: skip
    for version, path in versions.files.items():
        description, parent = described[version]
        api.upload_model(path, MODEL, version, description, calibration=versions.calibration,
                         output_kinds={"probs": "class_scores"},
                         parents=[parent] if parent else None)  # fmt: skip


def _prebuild(api: ApiClient) -> tuple[list[str], dict[str, list[str]]]:
    """Build 1.1.0 and 1.2.0 while 1.0.0 rolls out (two build workers), for the runtimes the
    devices have, as their rollouts will ask. Returns the build ids and those runtimes."""
    runtimes = {p: sorted(api.get(f"/v1/devices/{d}").get("runtimes") or {}) for d, p in DEVICES}
    builds = [
        api.post("/v1/builds", json={"model": MODEL, "version": version, "profile": profile,
                                     "runtimes": installed})["id"]
        for version in ("1.1.0", "1.2.0")
        for profile, installed in sorted(runtimes.items())
    ]  # fmt: skip
    return builds, runtimes


def _canary(api: ApiClient, console: Console, version: str) -> dict[str, Any]:
    body = {"model": MODEL, "version": version, "selector": "fleet=demo", "strategy": "canary",
            "stages": STAGES, "bake_s": BAKE_S, "gates": GATES, "max_bake_s": 120}  # fmt: skip
    return _follow(api, api.post("/v1/rollouts", json=body), console, 400)


def _closing(
    api: ApiClient,
    console: Console,
    agents: list[LocalAgent],
    rollouts: tuple[dict[str, Any], dict[str, Any], dict[str, Any]],
    traffic: Traffic,
    started: float,
) -> bool:
    """What the fleet measured, what happened and why; True when the story came out as told:
    1.1.0 everywhere, 1.2.0 stopped at its first stage by the prediction shift, no request
    lost."""
    first, good, bad = rollouts
    console.rule("the closing figures")
    figures, rows = _closing_table(api, time.monotonic() - started + 60)
    console.print(figures)
    console.print(_drift_note(rows, api.get("/v1/alerts", params={"model": MODEL})))
    # The canary's device was given 1.1.0 back; it may still be switching.
    for agent in agents:
        with contextlib.suppress(TimeoutError):  # reported below
            agent.wait_serving(MODEL, "1.1.0", timeout_s=30)
    serving = [(a.serving(MODEL) or {}).get("version") for a in agents]
    outcome = Table("rollout", "version", "strategy", "ended", "why",
                    title="what happened, and why")  # fmt: skip
    for r in rollouts:
        outcome.add_row(r["id"], r["version"], r["strategy"], r["state"], _why(r))
    console.print(outcome)
    breach = next((e for e in bad["events"] if e["kind"] == "gate_breach"), None)
    reached = [t["device_id"] for t in bad["targets"] if t["state"] == "reverted"]
    good_ok = first["state"] == good["state"] == "completed" and set(serving) == {"1.1.0"}
    bad_ok = (
        bad["state"] == "aborted"
        and bad["stage"] == 0
        and breach is not None
        and "max_prediction_shift" in breach["message"]
        and len(reached) == 1
    )
    console.print(
        f"1.2.0 reached {len(reached)} device(s) ({', '.join(reached) or '-'}), given 1.1.0 "
        f"back; {len(agents) - len(reached)} never received it"
    )
    served, failed, labelled, errors = traffic.totals()
    console.print(
        f"requests served during the rollouts: {served}, failed: {failed}; labels sent back: "
        f"{labelled}"
    )
    for error in errors:
        console.print(f"  {error}", style="red")
    ok = good_ok and bad_ok and failed == 0
    stopped = (
        "stopped at its first stage by the prediction-shift gate"
        if bad_ok
        else f"ended {bad['state']} at stage {bad['stage'] + 1}"
    )
    console.rule(
        Text.assemble(("ok" if ok else "FAILED", "green" if ok else "red"))
        + f": 1.1.0 serving on {serving.count('1.1.0')} of {len(agents)} devices; 1.2.0 "
        + f"{stopped}; {time.monotonic() - started:.0f}s in all"
    )
    return ok


def run_demo(workdir: Path | None, console: Console, *, keep: bool = False) -> int:
    if not console.is_terminal:  # a log file or CI: tables as wide as a terminal shows them
        console.width = max(console.width, 140)
    root = workdir or Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    console.rule(Text("edgefleet demo", style="bold"))
    settings = Settings(data_dir=root / "server", port=0, broker_port=0, env="development",
                        build_workers=2, telemetry_bucket_s=10)  # fmt: skip
    agents: list[LocalAgent] = []
    traffic: Traffic | None = None
    started = time.monotonic()
    try:
        with EmbeddedStack(settings) as stack:
            assert stack.broker is not None
            console.print(
                f"fleet server  {stack.url}  (SQLite, artifacts in {settings.artifacts_dir})"
            )
            console.print(f"MQTT broker   {stack.mqtt_url}  ({stack.broker.backend}, embedded)")
            api = ApiClient(stack.url, stack.admin_token)
            versions = _train(root, console)
            _upload(api, versions)

            console.rule("six devices, three profiles")
            # Six devices share this machine's cores: a neighbour's swap or a build shows up
            # as a latency spike that a real device, with its CPU to itself, would not see.
            # Probation still compares latency, with 20 ms of slack.
            start_agents(api, root, DEVICES, {"site": "lab", "fleet": "demo"}, agents,
                         probation_window_s=3, probation="latency_slack_ms = 20\n")  # fmt: skip
            console.print(", ".join(f"{a.device_id} ({a.profile})" for a in agents))
            builds, runtimes = _prebuild(api)

            console.rule(f"{MODEL} 1.0.0 to the whole fleet")
            first = api.post("/v1/rollouts", json={"model": MODEL, "version": "1.0.0",
                                                   "selector": "fleet=demo"})  # fmt: skip
            first = _follow(api, first, console, 300)
            if first["state"] != "completed":
                return _failed(console, agents, f"1.0.0 rollout ended {first['state']}")
            console.print(_parity_table(api, first, runtimes))
            # Builds compete with the devices for this machine's CPUs: none runs under the
            # canaries, whose devices judge latency on probation.
            wait_until(lambda: _built(api, builds), 300, "the builds of 1.1.0 and 1.2.0")
            traffic = Traffic(agents, versions.field, RATE_PER_DEVICE, glare=GLARE)
            traffic.start()
            console.print(
                f"steady traffic: {RATE_PER_DEVICE:g} requests/s to each device, the true label "
                "sent back for half of the answers; the Raspberry Pis' cameras see glare the "
                "calibration data never had (their inputs drift)"
            )
            wait_until(lambda: _enough_predictions(api, "1.0.0", 250), 120,
                       "1.0.0's predictions on every profile")  # fmt: skip

            console.rule(f"{MODEL} 1.1.0 as a canary: {STAGES} % of the fleet")
            good = _canary(api, console, "1.1.0")
            console.print(_parity_table(api, good, runtimes))

            console.rule(f"{MODEL} 1.2.0 as a canary: finite, well-formed, and wrong")
            wait_until(lambda: _enough_predictions(api, "1.1.0", 250), 120,
                       "1.1.0's predictions on every profile")  # fmt: skip
            bad = _canary(api, console, "1.2.0")
            breach = next((e for e in bad["events"] if e["kind"] == "gate_breach"), None)
            if breach is not None:
                console.print(Text(f"stopped: {breach['message']}", style="bold"))

            time.sleep(2.5)  # the last telemetry interval reaches the server
            traffic.stop()
            ok = _closing(api, console, agents, (first, good, bad), traffic, started)
            console.print(
                f"dashboard: {stack.url}/ui  (sign in with the admin token in "
                f"{settings.admin_token_file})"
            )
            if keep:
                traffic = Traffic(agents, versions.field, RATE_PER_DEVICE, glare=GLARE)
                traffic.start()
                _wait_for_interrupt(console)
            return 0 if ok else 1
    finally:
        if traffic is not None:
            traffic.stop()
        for agent in agents:
            agent.stop()
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def _wait_for_interrupt(console: Console) -> None:
    console.print("--keep: everything stays up, traffic included; Ctrl-C ends it")
    # A TERM (a service manager, `kill`) ends it as Ctrl-C does: the agents are stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _failed(console: Console, agents: list[LocalAgent], why: str) -> int:
    console.print(why, style="red")
    for agent in agents:
        console.print(f"--- {agent.device_id} log ---\n{agent.log_tail(15)}")
    return 1
