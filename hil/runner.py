"""The HIL runner: one run of scenarios on one rig against a real fleet server.

A run holds the rig (:mod:`hil.lease`), prepares every device (a device that cannot start fails
the run with a :class:`~hil.rigfile.RigFileError` before anything else happens), puts a relay
between each device and the server, enrolls devices that have no identity yet (labelled
``hil-rig=<name>``: a selector's cohort never includes them), starts their agents, runs each
scenario and records, per scenario and device, a verdict with its evidence, the lifecycle
timeline (from the agent's log) and the predict latencies per version. The agents are stopped
and the rig torn down whatever happens; :mod:`hil.report` writes ``junit.xml`` and
``report.html`` from the :class:`RunResult`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import secrets
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

import hil.builtin  # noqa: F401 (registers the built-in scenarios)
from firmware_profiles import default_catalog
from fleet_server.client import ApiClient, ApiError
from hil.devices import RigDevice, make_device
from hil.relay import Relay
from hil.rigfile import RigFileError, RigSpec
from hil.scenario import SCENARIOS, Context, Scenario

__all__ = ["CaseResult", "HilRun", "RunResult", "ScenarioResult", "supported"]

log = logging.getLogger(__name__)
RIG_LABEL = "hil-rig"
TRANSITION = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ [\w.]+: slot (\S+): (\w+) -> (\w+) \((\w+)\)"
)


@dataclass
class CaseResult:
    """One scenario on one device."""

    device: str
    status: str  # passed | failed | skipped
    messages: list[str] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)
    log_excerpt: str = ""
    #: (epoch seconds, from state, to state, event) from the agent's log.
    timeline: list[tuple[float, str, str, str]] = field(default_factory=list)


@dataclass
class ScenarioResult:
    name: str
    summary: str
    duration_s: float
    cases: list[CaseResult]

    @property
    def passed(self) -> bool:
        return all(c.status != "failed" for c in self.cases)


@dataclass
class RunResult:
    rig: RigSpec
    model: str
    version: str
    baseline: str | None
    started_at: datetime
    scenarios: list[ScenarioResult] = field(default_factory=list)
    latencies: list[tuple[str, str, float]] = field(default_factory=list)
    #: A rig that could not start: the reason (every scenario then fails).
    error: str | None = None
    #: …because of the rig file or the machine (a missing tool, no root): exit status 2.
    config_error: bool = False
    #: Device id → what it said of itself once prepared (platform, runtimes).
    facts: dict[str, list[str]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.error is None and all(s.passed for s in self.scenarios)

    def summary(self) -> dict[str, Any]:
        return {
            "rig": self.rig.name,
            "model": self.model,
            "version": self.version,
            "baseline": self.baseline,
            "passed": self.passed,
            "error": self.error,
            "scenarios": {
                s.name: {
                    "passed": s.passed,
                    "duration_s": round(s.duration_s, 2),
                    "devices": {c.device: c.status for c in s.cases},
                }
                for s in self.scenarios
            },
        }


def supported(scenario: Scenario, devices: list[RigDevice], fleet: set[str]) -> str | None:
    """Why the scenario cannot run on these devices (None: it can)."""
    for need in sorted(scenario.needs):
        if need in ("baseline", "broker_restart"):
            if need not in fleet:
                return {
                    "baseline": "needs a baseline version (the model has none before the "
                    "candidate; pass --baseline)",
                    "broker_restart": "needs a broker_restart hook ([hooks] in the rig file)",
                }[need]
        elif missing := [d.id for d in devices if need not in d.capabilities]:
            return f"needs '{need}', which {', '.join(missing)} cannot do"
    return None


class HilRun:
    def __init__(
        self,
        api: ApiClient,
        server_url: str,
        rig: RigSpec,
        *,
        model: str,
        version: str,
        baseline: str | None = None,
        scenarios: list[str] | None = None,
        state_dir: Path,
        restart_broker: Callable[[], None] | None = None,
        work_dir: Path,
    ) -> None:
        self.api = api
        self.server_url = server_url.rstrip("/")
        self.rig = rig
        self.model = model
        self.version = version
        self.baseline = baseline
        self.wanted = scenarios
        self.state_dir = state_dir
        self.restart_broker = restart_broker
        self.work_dir = work_dir
        self.devices: list[RigDevice] = [
            make_device(rig.name, spec, state_dir / spec.id, i)
            for i, spec in enumerate(rig.devices)
        ]
        self._onnx: dict[str, Path] = {}
        self._manifests: dict[str, dict[str, Any]] = {}
        self._bad: str | None = None
        #: Tags the versions this run uploads (copies no device has had).
        self.run_id = secrets.token_hex(3)

    # --- the run -------------------------------------------------------------------------------
    def run(self) -> RunResult:
        result = RunResult(
            self.rig, self.model, self.version, self.baseline, datetime.now().astimezone()
        )
        scenarios: list[Scenario] = []
        try:
            scenarios = self._scenarios()
            self._check_version()
            if self.baseline is None:
                self.baseline = self._previous_version()
                result.baseline = self.baseline
            if self.wanted:  # asked for by name: one that cannot run here is an error
                for scenario in scenarios:
                    why_not = supported(scenario, self.devices, self._fleet())
                    if why_not is not None:
                        raise RigFileError(
                            self.rig.name, f"scenario {scenario.name!r} cannot run here: {why_not}"
                        )
            for device in self.devices:
                device.prepare()
                result.facts[device.id] = list(device.facts)
            self._connect()
        except (RigFileError, ApiError, OSError, TimeoutError, RuntimeError) as e:
            # A rig that cannot start fails every scenario: it never passes one.
            result.error = getattr(e, "message", None) or str(e)
            result.config_error = isinstance(e, RigFileError)
            for scenario in scenarios or [Scenario("rig", "the rig starts", ())]:
                result.scenarios.append(
                    ScenarioResult(scenario.name, scenario.summary, 0.0, [
                        CaseResult(d.id, "failed", [f"the rig could not start: {result.error}"])
                        for d in self.devices
                    ])
                )  # fmt: skip
            self._shutdown()
            return result
        try:
            context = self._context()
            fleet = self._fleet()
            for scenario in scenarios:
                result.scenarios.append(self._run_one(scenario, context, fleet))
            result.latencies = context.latencies
        finally:
            self._shutdown()
        return result

    def _fleet(self) -> set[str]:
        """What the fleet side offers the scenarios' needs."""
        fleet = {"baseline"} if self.baseline else set()
        if self.restart_broker is not None:
            fleet.add("broker_restart")
        return fleet

    def _scenarios(self) -> list[Scenario]:
        if not self.wanted:
            return list(SCENARIOS.values())
        unknown = [n for n in self.wanted if n not in SCENARIOS]
        if unknown:
            raise RigFileError(
                self.rig.name,
                f"unknown scenario {unknown[0]!r}; known: {', '.join(SCENARIOS)}",
            )
        return [SCENARIOS[n] for n in self.wanted]

    def _check_version(self) -> None:
        self.api.get(f"/v1/models/{self.model}/versions/{self.version}")

    def _previous_version(self) -> str | None:
        versions = self.api.get(f"/v1/models/{self.model}")["versions"]
        ordered = sorted(versions, key=lambda v: v["created_at"])
        names = [v["version"] for v in ordered if "+hil." not in v["version"]]
        if self.version not in names:
            return None
        i = names.index(self.version)
        return names[i - 1] if i > 0 else None

    def _connect(self) -> None:
        """Relays, enrollment, agents started."""
        http = urlsplit(self.server_url)
        http_host, http_port = http.hostname or "127.0.0.1", http.port or 80
        upstream_file = self.state_dir / "upstream.json"
        mqtt: tuple[str, int] | None = None
        if upstream_file.exists():
            saved = json.loads(upstream_file.read_text())
            if saved.get("server") == self.server_url:
                mqtt = (saved["mqtt_host"], int(saved["mqtt_port"]))
        for device in self.devices:
            device.relay = Relay(device.relay_host())
            http_relay = device.relay.forward(http_host, http_port)
            relay_url = f"http://{device.relay_host()}:{http_relay}"
            known = self._known_to_server(device.id)
            if device.enrolled() and (not known or mqtt is None):
                # State from another server (or a wiped one): start this device afresh.
                shutil.rmtree(device.state_dir, ignore_errors=True)
                device.prepare()
            if device.enrolled():
                device.reuse()
            else:
                if known:
                    raise RigFileError(
                        self.rig.name, "is enrolled on the server but its rig state is gone "
                        f"({device.state_dir}); give the device another id or restore its state",
                        device=device.id,
                    )  # fmt: skip
                token = self.api.post(
                    "/v1/enrollment-tokens",
                    json={
                        "profile": device.spec.profile,
                        "labels": {**device.spec.labels, RIG_LABEL: self.rig.name},
                    },
                )["token"]
                # The broker the server names at enrollment is where the relay forwards.
                broker = urlsplit(device.enroll(relay_url, token))
                mqtt = mqtt or (broker.hostname or "127.0.0.1", broker.port or 1883)
            assert mqtt is not None
            mqtt_relay = device.relay.forward(*mqtt)
            device.point_at(relay_url, device.relay_host(), mqtt_relay)
        if mqtt is not None:
            upstream_file.parent.mkdir(parents=True, exist_ok=True)
            upstream_file.write_text(
                json.dumps({"server": self.server_url, "mqtt_host": mqtt[0], "mqtt_port": mqtt[1]})
            )
        for device in self.devices:
            device.start()
        for device in self.devices:
            device.wait_ready(120)

    def _known_to_server(self, device_id: str) -> bool:
        try:
            self.api.get(f"/v1/devices/{device_id}")
            return True
        except ApiError as e:
            if e.status == 404:
                return False
            raise

    def _shutdown(self) -> None:
        for device in self.devices:
            with contextlib.suppress(Exception):
                device.stop()
            with contextlib.suppress(Exception):
                device.teardown()
            if device.relay is not None:
                device.relay.close()
                device.relay = None

    # --- one scenario --------------------------------------------------------------------------
    def _context(self) -> Context:
        inputs = self._inputs()
        ctx = Context(
            api=self.api,
            devices=self.devices,
            model=self.model,
            version=self.version,
            baseline=self.baseline,
            slot=self.model,
            restart_broker=self.restart_broker,
            reference=self._reference,
            inputs=inputs,
            tolerance=self._tolerance,
            make_bad_version=self._make_bad_version,
            make_copy=self._make_copy,
            same_artifact=self._same_artifact,
            describe=self._describe,
        )
        return ctx

    def _run_one(self, scenario: Scenario, base: Context, fleet: set[str]) -> ScenarioResult:
        why_not = supported(scenario, self.devices, fleet)
        if why_not is not None:
            return ScenarioResult(scenario.name, scenario.summary, 0.0, [
                CaseResult(d.id, "skipped", [why_not]) for d in self.devices
            ])  # fmt: skip
        # Evidence, rollouts and latencies of this scenario alone (its figures join the run's
        # at the end).
        ctx = dataclasses.replace(base, failures={}, evidence={}, rollouts=[], latencies=[])
        offsets = {d.id: len(d.logs()) for d in self.devices}
        started, wall = time.monotonic(), time.time()
        log.info("HIL %s: scenario %s", self.rig.name, scenario.name)
        for step in scenario.steps:
            try:
                step(ctx)
            except Exception as e:
                reason = f"{type(e).__name__}: {e}"
                for device in self.devices:
                    ctx.fail(device, f"step {step.__name__} failed: {reason}")
                log.info("scenario %s failed:\n%s", scenario.name, traceback.format_exc())
                break
        with contextlib.suppress(Exception):
            ctx.end_rollouts()
        for device in self.devices:  # a scenario leaves every agent running for the next
            if not device.running():
                with contextlib.suppress(Exception):
                    device.start()
                    device.wait_ready(120)
        base.latencies.extend(ctx.latencies)
        cases = []
        for device in self.devices:
            text = device.logs()[offsets[device.id] :]
            failures = ctx.failures.get(device.id, [])
            cases.append(
                CaseResult(
                    device.id,
                    "failed" if failures else "passed",
                    failures,
                    ctx.evidence.get(device.id, []),
                    _excerpt(text),
                    [t for t in _timeline(text, self.model) if t[0] >= wall - 1],
                )
            )
        return ScenarioResult(scenario.name, scenario.summary, time.monotonic() - started, cases)

    # --- reference predictions -----------------------------------------------------------------
    def _onnx_file(self, version: str) -> Path:
        if version not in self._onnx:
            path = self.work_dir / f"{self.model}-{version}.onnx"
            path.parent.mkdir(parents=True, exist_ok=True)
            response = self.api._send("GET", f"/v1/models/{self.model}/versions/{version}/onnx")
            path.write_bytes(response.content)
            self._onnx[version] = path
        return self._onnx[version]

    def _reference(self, version: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import onnxruntime as ort

        session = ort.InferenceSession(
            str(self._onnx_file(version)), providers=["CPUExecutionProvider"]
        )
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(None, feeds), strict=True))

    def _inputs(self) -> dict[str, np.ndarray]:
        spec = self.api.get(f"/v1/models/{self.model}/versions/{self.version}")
        rng = np.random.default_rng(19)
        feeds = {}
        for item in spec["inputs"]:
            shape = [d if isinstance(d, int) and d > 0 else 4 for d in item.get("shape") or []]
            dtype = np.dtype(item.get("dtype", "float32"))
            if dtype.kind == "f":
                feeds[item["name"]] = rng.standard_normal(shape).astype(dtype)
            else:
                feeds[item["name"]] = rng.integers(0, 4, shape).astype(dtype)
        return feeds

    def _active_manifest(self, device: RigDevice) -> dict[str, Any] | None:
        """The manifest of the bundle the device reports active (manifests cached by digest:
        a bundle never changes), or None before it has reported one."""
        try:
            d = self.api.get(f"/v1/devices/{device.id}")
            sha = d["reported"]["slots"][self.model]["active"]["bundle_sha256"]
        except (ApiError, KeyError, TypeError):
            return None
        if sha not in self._manifests:
            self._manifests[sha] = {**self.api.get(f"/v1/bundles/{sha}/manifest"), "sha": sha}
        return self._manifests[sha]

    def _describe(self, device: RigDevice) -> str:
        m = self._active_manifest(device)
        if m is None:
            return "(unknown: no report yet)"
        return (f"{m['runtime']['name']} {m['precision']} "
                f"({m['artifact']}, bundle {m['sha'][:12]})")  # fmt: skip

    def _tolerance(self, version: str, device: RigDevice) -> dict[str, float | None]:
        m = self._active_manifest(device)
        precision = str(m.get("precision", "fp32")) if m else "fp32"
        return default_catalog().get(device.spec.profile).parity.for_precision(precision)

    def _make_bad_version(self) -> str:
        """The candidate with every float output multiplied by NaN, uploaded beside it (once
        a run; an earlier run's upload is used as it is)."""
        if self._bad is None:
            self._bad = self._upload_bad_version()
        return self._bad

    def _upload_bad_version(self) -> str:
        import onnx
        from onnx import TensorProto, helper

        bad = f"{self.version}+hil.nan"
        try:
            self.api.get(f"/v1/models/{self.model}/versions/{bad}")
            return bad
        except ApiError as e:
            if e.status != 404:
                raise
        model = onnx.load(str(self._onnx_file(self.version)))
        graph = model.graph
        for out in graph.output:
            if out.type.tensor_type.elem_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
                continue
            raw = f"{out.name}__hil_raw"
            for node in graph.node:
                node.output[:] = [raw if o == out.name else o for o in node.output]
            nan = helper.make_tensor(f"{out.name}__hil_nan", out.type.tensor_type.elem_type,
                                     [], [float("nan")])  # fmt: skip
            graph.initializer.append(nan)
            graph.node.append(helper.make_node("Mul", [raw, nan.name], [out.name]))
        path = self.work_dir / f"{self.model}-{bad}.onnx"
        onnx.save(model, str(path))
        self.api.upload_model(
            path,
            self.model,
            bad,
            f"{self.model} {self.version} with NaN outputs, made by a HIL run",
        )
        return bad

    def _same_artifact(
        self, device: RigDevice, feeds: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], list[float]] | None:
        """The device's active artifact run here in the same runtime, when it is LiteRT."""
        from edge_agent.bundle.archive import open_bundle
        from edge_agent.runtimes import LoadOptions, get_runtime

        reported = self.api.get(f"/v1/devices/{device.id}")["reported"]["slots"][self.model]
        sha = reported["active"]["bundle_sha256"]
        if reported["active"].get("runtime") != "litert":
            return None
        path = self.work_dir / "bundles" / f"{sha}.efb"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self.api._send("GET", f"/v1/bundles/{sha}").content)
        extracted = self.work_dir / "bundles" / sha
        with open_bundle(path) as bundle:
            if not extracted.exists():
                extracted.mkdir()
                bundle.extract_verified(extracted)
            artifact = extracted / bundle.manifest.artifact
        model = get_runtime("litert").load(artifact, LoadOptions(threads=1))
        try:
            outputs = model.run(feeds)  # and warm
            times = []
            for _ in range(20):
                started = time.perf_counter()
                model.run(feeds)
                times.append((time.perf_counter() - started) * 1000)
            return outputs, times
        finally:
            model.close()

    def _make_copy(self, tag: str) -> str:
        copy = f"{self.version}+hil.{self.run_id}.{tag}"
        self.api.upload_model(
            self._onnx_file(self.version), self.model, copy,
            f"{self.model} {self.version} under another version, made by a HIL run on "
            f"{self.rig.name} so that its devices download a bundle they have not got",
        )  # fmt: skip
        return copy


def _excerpt(text: str, lines: int = 30) -> str:
    kept = [line for line in text.splitlines() if " DEBUG " not in line]
    return "\n".join(kept[-lines:])


def _timeline(text: str, slot: str) -> list[tuple[float, str, str, str]]:
    out = []
    for line in text.splitlines():
        m = TRANSITION.match(line)
        if m and m.group(2) == slot:
            at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").astimezone()
            out.append((at.timestamp(), m.group(3), m.group(4), m.group(5)))
    return out
