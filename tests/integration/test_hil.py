"""Hardware-in-the-loop with every real part: the server, a real Mosquitto, real ``edge-agent``
processes on the rig (on this host, or each in its own network namespace), the runner's relay
in their path, and the CLI as a subprocess.

- A ``local`` rig and a ``netns`` rig each run every built-in scenario and write JUnit and HTML
  reports a person can read.
- A rollout whose HIL stage fails never publishes a desired state to any fleet device (a
  subscriber on the broker sees none); one that passes goes on to the fleet; a runner killed
  mid-job fails the stage at its deadline; a verdict from a runner that does not hold the job
  is refused and changes nothing.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from converters.onnx.samples import mlp_classifier, nan_classifier
from fleet_server.client import ApiClient, ApiError
from fleet_server.server import EmbeddedStack
from hil.report import write_reports
from hil.rig import wait_until
from hil.rigfile import load_rig, parse_rig
from hil.runner import HilRun, RunResult
from tests.conftest import ADMIN_TOKEN
from tests.integration.test_api import enroll

pytestmark = pytest.mark.slow
RIGS = Path(__file__).resolve().parents[2] / "hil" / "rigs"
SCENARIOS = [
    "rollout", "bad-version", "power-loss", "link-cut", "slow-link", "broker-restart",
    "tampered-bundle", "offline-stage", "power-cycles",
]  # fmt: skip


def _versions(api: ApiClient, root: Path) -> None:
    # hidden=512: a bundle of ~60 KB, so a download has a middle for the link to be cut in.
    api.upload_model(mlp_classifier(root / "v1.onnx", hidden=512, seed=1), "clf", "1.0.0")
    api.upload_model(mlp_classifier(root / "v2.onnx", hidden=512, seed=2), "clf", "1.1.0")


def _run_every_scenario(stack: EmbeddedStack, rig_file: Path, tmp_path: Path) -> RunResult:
    api = ApiClient(stack.url, ADMIN_TOKEN)
    _versions(api, tmp_path)
    broker = stack.broker
    assert broker is not None

    def restart_broker() -> None:
        broker.stop()
        broker.start()

    result = HilRun(
        api, stack.url, load_rig(rig_file), model="clf", version="1.1.0",
        state_dir=tmp_path / "rig", restart_broker=restart_broker, work_dir=tmp_path / "work",
    ).run()  # fmt: skip
    paths = write_reports(result, tmp_path / "out")
    failures = {
        (s.name, c.device): c.messages for s in result.scenarios for c in s.cases if c.messages
    }
    assert result.error is None and not failures, failures
    assert [s.name for s in result.scenarios] == SCENARIOS
    assert result.baseline == "1.0.0"

    suite = ET.parse(paths["junit"]).getroot()
    devices = len(load_rig(rig_file).devices)
    assert suite.get("tests") == str(len(SCENARIOS) * devices)
    assert suite.get("failures") == "0" and suite.get("skipped") == "0"
    names = {(c.get("classname"), c.get("name")) for c in suite.iter("testcase")}
    rig = load_rig(rig_file).name
    assert (f"hil.{rig}.power-loss", load_rig(rig_file).devices[0].id) in names

    evidence = {
        (s.name, c.device): "\n".join(c.evidence) for s in result.scenarios for c in s.cases
    }
    for device in (d.id for d in load_rig(rig_file).devices):
        assert "resuming download at" in evidence["link-cut", device]
        assert "digest_mismatch" in evidence["tampered-bundle", device]
        assert "NaN/inf" in evidence["bad-version", device]
        assert "power cut while the new version was on probation" in evidence["power-loss", device]
        assert evidence["power-cycles", device].count("power cycle") == 5
    page = paths["html"].read_text()
    assert "data:image/png;base64," in page  # the latency chart, embedded
    assert "PROBATION → COMMITTED" in page and "passed" in page
    return result


def test_a_local_rig_runs_every_built_in_scenario(
    private_stack: EmbeddedStack, tmp_path: Path
) -> None:
    result = _run_every_scenario(private_stack, RIGS / "local.toml", tmp_path)
    assert {v for _, v, _ in result.latencies} >= {"1.0.0", "1.1.0"}


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)")
def test_a_netns_rig_runs_every_built_in_scenario(
    private_stack: EmbeddedStack, tmp_path: Path
) -> None:
    if shutil.which("nft") is None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "nftables"], check=False)
    result = _run_every_scenario(private_stack, RIGS / "netns.toml", tmp_path)
    shaped = [e for s in result.scenarios if s.name == "slow-link" for c in s.cases
              for e in c.evidence]  # fmt: skip
    assert any("tc tbf: 1000 kbit/s" in e and "nft: 2.0 % of packets dropped" in e for e in shaped)
    # The namespaces are gone afterwards.
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "efh-" not in listed


def test_a_power_hook_that_fails_fails_the_scenario_naming_the_device(
    private_stack: EmbeddedStack, tmp_path: Path
) -> None:
    api = ApiClient(private_stack.url, ADMIN_TOKEN)
    _versions(api, tmp_path)
    rig = parse_rig(
        'name = "hooks"\n[[devices]]\nid = "hook-dev"\nprofile = "x86-64-avx2"\nkind = "local"\n'
        'power_off = "false"\n'
    )
    result = HilRun(
        api, private_stack.url, rig, model="clf", version="1.1.0", scenarios=["power-loss"],
        state_dir=tmp_path / "rig", work_dir=tmp_path / "work",
    ).run()  # fmt: skip
    [case] = result.scenarios[0].cases
    assert case.status == "failed" and not result.passed
    assert "rig 'hooks', device 'hook-dev': power_off hook 'false' failed with exit status 1" in (
        " ".join(case.messages)
    )


# --- HIL as a rollout stage -------------------------------------------------------------------------


class Desired:
    """Every desired-state document the broker delivers, by device id."""

    def __init__(self, stack: EmbeddedStack) -> None:
        self.seen: queue.Queue[str] = queue.Queue()
        self.ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: (
            c.subscribe("edgefleet/v1/devices/+/desired", qos=1),
            self.ready.set(),
        )
        self.client.on_message = lambda c, u, m: self.seen.put(m.topic.split("/")[3])
        host, port = stack.mqtt_url.removeprefix("mqtt://").split(":")
        self.client.connect(host, int(port))
        self.client.loop_start()
        assert self.ready.wait(5)

    def devices(self) -> set[str]:
        out = set()
        while not self.seen.empty():
            out.add(self.seen.get())
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _cli(stack: EmbeddedStack, *args: str, **kw: object) -> subprocess.Popen[str]:
    env = {**os.environ, "EDGEFLEET_TOKEN": ADMIN_TOKEN, "EDGEFLEET_SERVER": stack.url,
           "COLUMNS": "200"}  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-c", "from fleet_server.cli import main; main()", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **kw,  # type: ignore[call-overload]
    )  # fmt: skip


def _rig_file(tmp_path: Path, uid: str) -> Path:
    path = tmp_path / "rig.toml"
    # The rig's device carries the fleet's label too: a selector must still not reach it.
    path.write_text(
        f'name = "bench-{uid}"\n[[devices]]\nid = "rig-{uid}"\nprofile = "x86-64-avx2"\n'
        'kind = "local"\nlabels = { ring = "fleet" }\n'
    )
    return path


def test_a_rollout_waits_for_its_rig_and_a_failing_rig_never_reaches_the_fleet(
    stack: EmbeddedStack, api: ApiClient, tmp_path: Path, uid: str
) -> None:
    _versions(api, tmp_path)
    api.upload_model(nan_classifier(tmp_path / "nan.onnx"), "clf", "2.0.0")
    fleet = [f"fleet-{i}-{uid}" for i in range(2)]
    for device_id in fleet:
        enroll(api, device_id, ring="fleet")
    rig_file = _rig_file(tmp_path, uid)
    added = _cli(stack, "hil", "rigs", "add", str(rig_file))
    assert added.wait(60) == 0, added.stdout.read() if added.stdout else ""
    watcher = Desired(stack)
    runner_args = ("hil", "runner", "--rig", str(rig_file), "--once",
                   "--work-dir", str(tmp_path / "jobs"), "--state-dir", str(tmp_path / "rig"))  # fmt: skip
    try:
        # A candidate that emits NaN: the rig fails it, the fleet never hears of it.
        bad = api.post("/v1/rollouts", json={
            "model": "clf", "version": "2.0.0", "selector": "ring=fleet",
            "hil": {"rig": f"bench-{uid}", "scenarios": ["rollout"], "timeout_s": 300},
        })  # fmt: skip
        assert bad["state"] == "in_progress" and bad["hil"]["state"] == "pending"
        assert bad["stages"][0]["state"] == "waiting_for_hil"
        assert sorted(t["device_id"] for t in bad["targets"]) == fleet  # not the rig's device
        run = _cli(stack, *runner_args)
        out = run.communicate(timeout=240)[0]
        assert run.returncode == 1, out
        # The verdict wakes the engine; its next step (a moment later) aborts the rollout.
        ended = wait_until(
            lambda: (r := api.get(f"/v1/rollouts/{bad['id']}"))["state"] != "in_progress" and r,
            10,
            "the engine to act on the rig's verdict",
        )
        assert ended["state"] == "aborted", ended["reason"]
        assert f"HIL stage on rig bench-{uid} failed" in ended["reason"]
        assert f"/v1/hil/jobs/{ended['hil']['id']}/report.html" in ended["reason"]
        assert "hil_failed" in [e["kind"] for e in ended["events"]]
        report = api.text(ended["hil"]["report_url"])
        assert "<h1>HIL run on rig" in report and "failed" in report
        junit = ET.fromstring(api.text(ended["hil"]["junit_url"]))
        assert junit.get("failures") == "1"
        seen = watcher.devices()
        assert f"rig-{uid}" in seen  # the rig's device was deployed to…
        assert not seen & set(fleet)  # …and no fleet device was

        # A good candidate passes the rig; then the fleet's stage begins.
        good = api.post("/v1/rollouts", json={
            "model": "clf", "version": "1.1.0", "selector": "ring=fleet",
            "hil": {"rig": f"bench-{uid}", "scenarios": ["rollout"], "timeout_s": 300},
        })  # fmt: skip
        assert not watcher.devices() & set(fleet)
        run = _cli(stack, *runner_args)
        out = run.communicate(timeout=240)[0]
        assert run.returncode == 0, out
        wait_until(lambda: set(fleet) <= watcher.devices() | _notified(api, good["id"]), 30,
                   "the fleet to be notified after the rig passed")  # fmt: skip
        after = api.get(f"/v1/rollouts/{good['id']}")
        assert after["hil"]["state"] == "passed"
        kinds = [e["kind"] for e in after["events"]]
        assert kinds.index("hil_passed") < len(kinds)
    finally:
        watcher.close()


def _notified(api: ApiClient, rollout_id: str) -> set[str]:
    r = api.get(f"/v1/rollouts/{rollout_id}")
    return {t["device_id"] for t in r["targets"] if t.get("phase") == "notified"}


def test_a_runner_killed_mid_job_fails_the_stage_at_its_deadline(
    stack: EmbeddedStack, api: ApiClient, tmp_path: Path, uid: str
) -> None:
    _versions(api, tmp_path)
    enroll(api, f"fleet-{uid}", ring="fleet")
    rig_file = _rig_file(tmp_path, uid)
    api.post("/v1/hil/rigs", json={
        "name": f"bench-{uid}", "devices": [{"id": f"rig-{uid}", "profile": "x86-64-avx2",
                                             "kind": "local"}],
    })  # fmt: skip
    watcher = Desired(stack)
    rollout = api.post("/v1/rollouts", json={
        "model": "clf", "version": "1.1.0", "selector": "ring=fleet",
        "hil": {"rig": f"bench-{uid}", "timeout_s": 20},
    })  # fmt: skip
    job_id = rollout["hil"]["id"]
    run = _cli(stack, "hil", "runner", "--rig", str(rig_file), "--once", "--work-dir",
               str(tmp_path / "jobs"), "--state-dir", str(tmp_path / "rig"),
               start_new_session=True)  # fmt: skip
    try:
        wait_until(lambda: api.get(f"/v1/hil/jobs/{job_id}")["state"] == "running", 60,
                   "the runner to claim the job")  # fmt: skip
        # Another runner (it never claimed the job) cannot answer for it.
        with pytest.raises(ApiError) as refused:
            api.post(f"/v1/hil/jobs/{job_id}/verdict",
                     data={"lease": "not-the-lease", "passed": "true"},
                     files={"junit": ("junit.xml", b"<testsuite/>"),
                            "report": ("report.html", b"<p>passed</p>")})  # fmt: skip
        assert refused.value.status == 409
        assert api.get(f"/v1/hil/jobs/{job_id}")["state"] == "running"
        os.killpg(run.pid, signal.SIGKILL)  # the runner and the rig's agents with it
        run.wait(10)
        ended = wait_until(
            lambda: (r := api.get(f"/v1/rollouts/{rollout['id']}"))["state"] == "aborted" and r,
            60, "the HIL stage to time out",
        )  # fmt: skip
        assert "timed_out" in ended["reason"] and ended["hil"]["state"] == "timed_out"
        assert f"fleet-{uid}" not in watcher.devices()
        # The rig is free again: a claim finds nothing left to run.
        claim = api._send("POST", f"/v1/hil/rigs/bench-{uid}/claim", json={"runner": "other"})
        assert claim.status_code == 204
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        watcher.close()


def test_a_rollout_naming_an_unknown_rig_is_refused_and_changes_nothing(
    api: ApiClient, tmp_path: Path, uid: str
) -> None:
    _versions(api, tmp_path)
    enroll(api, f"fleet-{uid}", ring="fleet")
    before = api.get("/v1/rollouts")
    with pytest.raises(ApiError) as e:
        api.post("/v1/rollouts", json={
            "model": "clf", "version": "1.1.0", "selector": "ring=fleet",
            "hil": {"rig": "no-such-rig"},
        })  # fmt: skip
    assert e.value.status == 404 and "hil rigs add" in e.value.message
    assert api.get("/v1/rollouts") == before


def test_an_emulated_raspberry_pi_serves_the_int8_tflite_bundle_like_x86_litert(
    private_stack: EmbeddedStack, tmp_path: Path
) -> None:
    """The real agent and the real aarch64 LiteRT wheel under qemu-user, on the TFLite int8
    artifact the converters build for the Raspberry Pi profiles (the arm64 root is cached
    under .toolchains/ after the first run)."""
    import numpy as np

    for tool, package in (("qemu-aarch64-static", "qemu-user-static"),
                          ("mmdebstrap", "mmdebstrap")):  # fmt: skip
        if shutil.which(tool) is None and os.geteuid() == 0:
            subprocess.run(["apt-get", "install", "-y", "-qq", package], check=False)
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install {package})")
    api = ApiClient(private_stack.url, ADMIN_TOKEN)
    calibration = tmp_path / "calibration.npz"
    rng = np.random.default_rng(0)
    np.savez(calibration, x=rng.standard_normal((64, 16)).astype(np.float32))
    api.upload_model(mlp_classifier(tmp_path / "v1.onnx", seed=1), "clf", "1.0.0",
                     calibration=calibration)  # fmt: skip
    result = HilRun(
        api, private_stack.url, load_rig(RIGS / "qemu-aarch64.toml"), model="clf",
        version="1.0.0", scenarios=["rollout"], state_dir=tmp_path / "rig",
        work_dir=tmp_path / "work",
    ).run()  # fmt: skip
    [case] = result.scenarios[0].cases
    assert result.passed, (result.error, case.messages, case.log_excerpt)
    evidence = "\n".join(case.evidence)
    assert "runs litert int8" in evidence
    assert "top-1 agreement 1.00 with the reference" in evidence
    assert "of the same artifact in LiteRT on this host" in evidence
    # It really ran on (emulated) aarch64, with the root's runtimes (no onnxruntime there).
    [machine, runtimes] = result.facts["qemu-pi4-01"]
    assert machine.startswith("platform aarch64") and "litert" in runtimes
    assert "onnxruntime" not in runtimes
    reported = api.get("/v1/devices/qemu-pi4-01")["runtimes"]
    assert set(reported) == {"litert"}
    devices = {d for d, _, _ in result.latencies}
    assert devices == {"qemu-pi4-01", "x86 LiteRT (this host)"}


def test_the_cli_runs_the_readmes_own_scenario_and_writes_the_reports(
    private_stack: EmbeddedStack, tmp_path: Path
) -> None:
    """``edgefleet hil run`` as a person runs it, with the README's example scenario file."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    example = readme.split("# my_scenarios.py\n", 1)[1].split("```", 1)[0]
    (tmp_path / "my_scenarios.py").write_text(example)
    _versions(ApiClient(private_stack.url, ADMIN_TOKEN), tmp_path)
    rig = tmp_path / "bench.toml"
    rig.write_text('name = "cli-bench"\n[[devices]]\nid = "cli-dev"\nprofile = "x86-64-avx2"\n'
                   'kind = "local"\n')  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", "from fleet_server.cli import main; main()", "hil", "run",
         "--rig", str(rig), "--model", "clf", "--version", "1.1.0", "--out", str(tmp_path / "out"),
         "--scenarios-from", str(tmp_path / "my_scenarios.py"), "--scenario", "restart-twice",
         "--scenario", "rollout", "--state-dir", str(tmp_path / "state"),
         "--server", private_stack.url],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "EDGEFLEET_TOKEN": ADMIN_TOKEN, "COLUMNS": "200",
             "EDGEFLEET_HIL_LOCK_DIR": str(tmp_path / "locks")},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "restart-twice" in done.stdout and "passed" in done.stdout
    suite = ET.parse(tmp_path / "out" / "junit.xml").getroot()
    cases = {c.get("classname"): c for c in suite.iter("testcase")}
    assert set(cases) == {"hil.cli-bench.restart-twice", "hil.cli-bench.rollout"}
    assert suite.get("failures") == "0"
    page = (tmp_path / "out" / "report.html").read_text()
    assert "restarted twice" in page and "the candidate survives two power cycles" in page
